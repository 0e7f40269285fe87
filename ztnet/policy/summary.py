"""Plain-text rendering of a policy for `ztnet policy check`."""

from __future__ import annotations

from ztnet.durations import format_duration
from ztnet.grants.model import AgentMode, ByteBudget
from ztnet.policy.document import Policy
from ztnet.text import format_table


def summarize(policy: Policy, *, default_ttl: float = 300.0) -> str:
    """Header, one table row per allow rule, and notes on rules that will be
    merged and agents that have no access at all."""
    agents = len(policy.agents)
    header = (
        f"policy {policy.source}: trust domain {policy.trust_domain}, "
        f"{agents} agent{'s' if agents != 1 else ''}, "
        f"{policy.rule_count} rule{'s' if policy.rule_count != 1 else ''}"
    )
    rows: list[list[str]] = []
    notes: list[str] = []
    for agent in policy.agents:
        if agent.hosts is not None:
            notes.append(f"note: agents.{agent.name} is sent only to {agent.hosts.describe()}")
        if agent.mode is AgentMode.AUDIT:
            notes.append(f"note: agents.{agent.name} is in AUDIT mode: what its rules do not "
                         "allow goes ahead (recorded as AUDIT) except loopback and link-local; "
                         "it has open egress")
        if not agent.allow:
            access = "open egress (audit mode)" if agent.mode is AgentMode.AUDIT else \
                "no network access"
            rows.append([agent.name, "-", "-", f"(no rules: {access})", "", "", ""])
            continue
        seen: dict[tuple[str, str, str], int] = {}
        for index, rule in enumerate(agent.allow):
            first = seen.setdefault(rule.canonical(), index)
            if first != index:
                notes.append(
                    f"note: agents.{agent.name}.allow[{index}] repeats allow[{first}]; "
                    "they become one grant with the longer ttl"
                )
            ttl = format_duration(rule.ttl) if rule.ttl is not None else "default"
            if rule.budget is not None:
                notes.append(f"note: agents.{agent.name}.allow[{index}] has a byte budget: "
                             + _budget_text(rule.budget))
            rows.append(
                [
                    agent.name,
                    str(index),
                    str(rule.proto),
                    str(rule.to) + (" (private answers kept)" if rule.allow_private else ""),
                    rule.ports_text,
                    ttl,
                    rule.comment,
                ]
            )
    parts = [header]
    if rows:
        table = format_table(["AGENT", "#", "PROTO", "TO", "PORTS", "TTL", "COMMENT"], rows)
        parts.append(table)
    parts.extend(notes)
    parts.append(
        f"default ttl {format_duration(default_ttl)}; everything not listed is denied "
        "(no implicit loopback or metadata access)"
        + ("; audit-mode agents excepted" if any(a.mode is AgentMode.AUDIT
                                                 for a in policy.agents) else "")
    )
    return "\n".join(parts)


def _size(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size and count % size == 0:
            return f"{count // size} {unit}"
    return f"{count} bytes"


def _budget_text(budget: ByteBudget) -> str:
    parts = []
    if budget.max_bytes_out:
        parts.append(f"{_size(budget.max_bytes_out)} out per connection")
    if budget.max_bytes_out_window:
        parts.append(f"{_size(budget.max_bytes_out_window)} out per "
                     f"{format_duration(budget.window)} over all its connections")
    return "; ".join(parts) + " (headers and retransmissions count)"
