"""``ztnet policy plan``: replay recorded flows against a candidate policy.

Every distinct attempt among the records (ztnet.observe.evidence) is judged again with the
reference evaluator (``ztnet.grants.evaluate.decide``, the function the kernel is tested
against) under the candidate's grants and modes, on the host it was recorded on (host
selectors apply when the hosts' labels are known). The plan lists, per agent:

* ``refused``: attempts that went ahead (ALLOWED, or AUDIT in audit mode) and the candidate
  would refuse with EPERM: what breaks when it is enforced;
* ``audited``: attempts the candidate's grants do not cover but its audit mode lets through;
* ``allowed``: attempts that were refused and the candidate would let through;
* ``unused``: the candidate's grants that no recorded attempt would use.

Grant windows play no part: each rule is judged as a live grant (the controller renews them).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ztnet.grants.evaluate import Decision, allowed_by, decide
from ztnet.grants.model import AgentMode, Grant
from ztnet.observe.evidence import FlowGroup, FlowKey, group_flows
from ztnet.observe.jsonfields import format_rfc3339
from ztnet.observe.records import FlowRecord
from ztnet.policy.compile import compile_grants
from ztnet.policy.document import Policy
from ztnet.policy.selectors import for_host

_TTL = 3600.0  # any ttl: every grant is judged live at the instant it was compiled for


@dataclass(frozen=True, slots=True)
class Outcome:
    """A recorded attempt and what the candidate does with it (``grant``: the grant that
    allows it, if one does)."""

    group: FlowGroup
    decision: Decision
    grant: Grant | None


@dataclass(slots=True)
class AgentPlan:
    agent: str
    refused: list[Outcome] = field(default_factory=list)
    audited: list[Outcome] = field(default_factory=list)
    allowed: list[Outcome] = field(default_factory=list)
    unchanged: int = 0
    unused: list[Grant] = field(default_factory=list)
    in_candidate: bool = True


@dataclass(frozen=True, slots=True)
class Plan:
    records: int
    attempts: int
    agents: tuple[AgentPlan, ...]
    selectors_applied: bool

    @property
    def refused(self) -> list[Outcome]:
        return [outcome for agent in self.agents for outcome in agent.refused]


class _Candidate:
    """The candidate's grants and modes on each host (selectors applied when labels are known)."""

    def __init__(self, policy: Policy, host_labels: Mapping[str, Mapping[str, str]] | None,
                 now: float) -> None:
        self.policy = policy
        self.host_labels = host_labels
        self.now = now
        self._by_host: dict[str, tuple[tuple[Grant, ...], dict[str, AgentMode]]] = {}
        self.all_grants = tuple(compile_grants(policy, now=now, default_ttl=_TTL))

    def on(self, host: str) -> tuple[tuple[Grant, ...], dict[str, AgentMode]]:
        cached = self._by_host.get(host)
        if cached is None:
            policy = self.policy
            if self.host_labels is not None:
                policy = for_host(policy, host, self.host_labels.get(host, {}))
            grants = tuple(compile_grants(policy, now=self.now, default_ttl=_TTL))
            cached = self._by_host[host] = (
                grants, {agent.name: agent.mode for agent in policy.agents})
        return cached


def plan(records: Iterable[FlowRecord], candidate: Policy, *,
         host_labels: Mapping[str, Mapping[str, str]] | None = None,
         now: float | None = None) -> Plan:
    """The plan of ``candidate`` against ``records`` (see the module docstring).
    ``host_labels``: every host's labels, to apply host selectors; None ignores them."""
    records = list(records)
    when = time.time() if now is None else now
    target = _Candidate(candidate, host_labels, when)
    groups = group_flows(records)
    names = {agent.name for agent in candidate.agents}
    plans = {name: AgentPlan(name) for name in sorted(names)}
    used: set[int] = set()
    for key in sorted(groups):
        group = groups[key]
        agent_plan = plans.get(key.agent)
        if agent_plan is None:
            agent_plan = plans[key.agent] = AgentPlan(key.agent, in_candidate=False)
        grants, modes = target.on(key.host)
        decision, grant = decide(grants, key.agent, modes.get(key.agent, AgentMode.ENFORCE),
                                 key.proto, key.address, key.port, when)
        used |= {g.grant_id for g in grants if _uses(g, key, when)}
        outcome = Outcome(group, decision, grant)
        if group.went_ahead and decision is Decision.DENIED:
            agent_plan.refused.append(outcome)
        elif group.went_ahead and decision is Decision.AUDIT:
            agent_plan.audited.append(outcome)
        elif not group.went_ahead and decision is not Decision.DENIED:
            agent_plan.allowed.append(outcome)
        else:
            agent_plan.unchanged += 1
    for grant in target.all_grants:
        if grant.grant_id not in used:
            plans[grant.agent].unused.append(grant)
    return Plan(len(records), len(groups), tuple(plans[name] for name in sorted(plans)),
                host_labels is not None)


def _uses(grant: Grant, key: FlowKey, when: float) -> bool:
    return grant.agent == key.agent and \
        allowed_by((grant,), key.agent, key.proto, key.address, key.port, when) is not None


# --- output ------------------------------------------------------------------------------


def _grant_text(grant: Grant) -> str:
    ports = "" if grant.ports is None else f" ports {grant.ports}"
    return f"{grant.label} {grant.proto} {grant.network}{ports}"


def _group_dict(outcome: Outcome) -> dict[str, Any]:
    group, key = outcome.group, outcome.group.key
    return {
        "host": key.host, "proto": key.proto, "destination": key.destination, "port": key.port,
        "attempts": group.count, "recorded": dict(sorted(group.verdicts.items())),
        "first_seen": format_rfc3339(group.first_ns), "last_seen": format_rfc3339(group.last_ns),
        "record_ids": list(group.record_ids), "candidate": outcome.decision.value,
        "grant": outcome.grant.label if outcome.grant else None,
    }


def to_dict(result: Plan, source: str) -> dict[str, Any]:
    return {
        "source": source, "records": result.records, "attempts": result.attempts,
        "host_selectors_applied": result.selectors_applied,
        "agents": [{
            "agent": agent.agent, "in_candidate": agent.in_candidate,
            "refused": [_group_dict(o) for o in agent.refused],
            "audited": [_group_dict(o) for o in agent.audited],
            "allowed": [_group_dict(o) for o in agent.allowed],
            "unchanged": agent.unchanged,
            "unused_grants": [{"id": g.label, "proto": str(g.proto), "to": str(g.network),
                               "ports": "any" if g.ports is None else str(g.ports)}
                              for g in agent.unused],
        } for agent in result.agents],
    }


def render(result: Plan, source: str) -> list[str]:
    """The plan for people (every cell that came from a record is escaped by the caller's
    ``ztnet.text.escape``-ing writer: host names and addresses are validated, ids are uuids)."""
    lines = [f"plan: {result.attempts} distinct attempts in {result.records} flow records "
             f"({source})"]
    if not result.selectors_applied:
        lines.append("plan: host selectors not applied (the hosts' labels are not known "
                     "here): every agent's rules are judged on every host")
    refused = sum(len(agent.refused) for agent in result.agents)
    lines.append(f"plan: {refused} attempts would start being refused" if refused
                 else "plan: nothing that went ahead would be refused")
    for agent in result.agents:
        head = f"agent {agent.agent}"
        if not agent.in_candidate:
            head += " (not in the candidate: it would have no network at all)"
        lines += ["", head]
        sections = (("would be refused (EPERM) — went ahead before", agent.refused),
                    ("would go ahead as AUDIT (audit mode, no grant)", agent.audited),
                    ("would be let through — refused before", agent.allowed))
        for title, outcomes in sections:
            if outcomes:
                lines.append(f"  {title}:")
                lines += [_outcome_line(o) for o in outcomes]
        if agent.unused:
            lines.append("  grants nobody used:")
            lines += [f"    {_grant_text(g)}" for g in agent.unused]
        if agent.unchanged:
            lines.append(f"  unchanged: {agent.unchanged} attempts")
    return lines


def _outcome_line(outcome: Outcome) -> str:
    group = outcome.group
    seen = f"{format_rfc3339(group.first_ns)[:19]} .. {format_rfc3339(group.last_ns)[11:19]}"
    via = f" via {outcome.grant.label}" if outcome.grant else ""
    return (f"    {group.key.describe():<34} on {group.key.host}  {group.count}x "
            f"({group.verdict_text()})  {seen}{via}  e.g. {group.record_ids[0]}")
