"""`ztnet policy plan` and `ztnet policy suggest`: recorded flows against a candidate
policy, and a draft policy from recorded flows (docs/policy.md, "Plans and suggestions").

Flows come from the controller's flow store (the admin API's QueryFlows, as `ztnet flows`)
or, with ``--flows FILE``, from a daemon's flow log and its rotated files. What the commands
compute lives in ztnet.observe.replay and ztnet.observe.suggest; the functions here fetch,
call and print, and tests call them directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ztnet.cli import operator
from ztnet.cli.args import SubParsers, UsageError, add_command, operator_options
from ztnet.errors import ConfigError
from ztnet.fsutil import replace_atomic
from ztnet.text import escape

if TYPE_CHECKING:
    from ztnet.controller.admin_client import AdminClient
    from ztnet.observe.records import FlowRecord
    from ztnet.observe.suggest import Collapse

DEFAULT_SINCE = "24h"


def register(group: SubParsers) -> None:
    p = add_command(group, "plan", "Replay recorded flows against NEW_POLICY with the reference "
                    "evaluator: per agent, what would start being refused, what would be let "
                    "through, and the grants nobody used.",
                    "ztnet policy plan new.toml --since 24h --controller ctl:7443", handle_plan)
    p.add_argument("policy", type=Path, metavar="NEW_POLICY", help="candidate policy (TOML)")
    _source_options(p)
    p.add_argument("--agent", default="", help="only this agent's flows")
    p.add_argument("--json", action="store_true", help="one JSON document")

    p = add_command(group, "suggest", "Write a least-privilege policy for AGENT from what it "
                    "was observed to do, with the evidence of every rule, for human review.",
                    "ztnet policy suggest --agent research-bot --since 24h --collapse /24 "
                    "--out research-bot.toml", handle_suggest)
    p.add_argument("--agent", required=True, help="the agent to write rules for")
    _source_options(p)
    p.add_argument("--collapse", metavar="/N[,/M]",
                   help="widen addresses to networks: /24 (IPv4), /64 (IPv6), or both "
                   "(default: exact addresses)")
    p.add_argument("--trust-domain", help="the policy's trust domain (default: from the "
                   "records' SPIFFE ids)")
    p.add_argument("--out", type=Path, help="write the policy here (default: stdout)")


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", default=DEFAULT_SINCE,
                   help=f"records this recent: a duration or an RFC 3339 time (default "
                   f"{DEFAULT_SINCE})")
    p.add_argument("--flows", type=Path, metavar="FILE",
                   help="a daemon's flow log (flows.jsonl, with its rotated files) instead of "
                   "the controller")
    operator_options(p)


# --- handlers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flows:
    """Records, where they came from, and the hosts' labels when known (controller only)."""

    records: list[FlowRecord]
    source: str
    host_labels: dict[str, dict[str, str]] | None


def _since_ns(text: str) -> int:
    from ztnet.observe.query import parse_since

    try:
        return max(0, parse_since(text))
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from None


def _with_flows(args: argparse.Namespace, agent: str, run: Callable[[Flows], int]) -> int:
    since_ns = _since_ns(args.since)
    if args.flows is not None:
        if args.controller or args.credentials:
            raise UsageError("--flows reads a local flow log: give it or --controller, not both")
        return run(local_flows(args.flows, agent=agent, since_ns=since_ns))
    return operator.with_admin(args.controller, args.credentials,
                               lambda client: run(controller_flows(client, agent=agent,
                                                                   since_ns=since_ns)))


def handle_plan(args: argparse.Namespace) -> int:
    return _with_flows(args, args.agent, lambda flows: policy_plan(
        args.policy, flows, since=args.since, as_json=args.json))


def handle_suggest(args: argparse.Namespace) -> int:
    from ztnet.observe.suggest import Collapse

    try:
        collapse = Collapse.parse(args.collapse) if args.collapse else Collapse()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return _with_flows(args, args.agent, lambda flows: policy_suggest(
        flows, agent=args.agent, since=args.since, collapse=collapse,
        trust_domain=args.trust_domain, out_path=args.out))


# --- flow sources -------------------------------------------------------------------------


def local_flows(path: Path, *, agent: str = "", since_ns: int = 0) -> Flows:
    from ztnet.observe.query import FlowFilter, FlowReader

    if not path.exists():
        raise ConfigError(f"flows: {path}: no such flow log")
    reader = FlowReader(path, FlowFilter(agents=frozenset({agent} if agent else ()),
                                         since_ns=since_ns))
    try:
        records = list(reader.history())
    finally:
        reader.close()
    if reader.malformed:
        sys.stderr.write(f"flows: skipped {reader.malformed} lines of {escape(str(path))} that "
                         "are not flow records\n")
    return Flows(records, f"flow log {path}", None)


def controller_flows(client: AdminClient, *, agent: str = "", since_ns: int = 0) -> Flows:
    from ztnet.observe.records import from_json

    records, skipped = [], 0
    for data in client.flow_history(agent=agent, since_ns=since_ns):
        try:
            records.append(from_json(data))
        except ValueError:  # a newer schema on the controller
            skipped += 1
    if skipped:
        sys.stderr.write(f"flows: skipped {skipped} records this ztnet cannot read\n")
    records.sort(key=lambda record: (record.time_ns, record.uuid))
    labels = {host.name: dict(host.labels) for host in client.list_hosts().hosts}
    return Flows(records, f"controller {client.address}", labels)


# --- what the commands do -----------------------------------------------------------------


def policy_plan(policy_path: str | os.PathLike[str], flows: Flows, *, since: str = "",
                as_json: bool = False, now: float | None = None,
                out: TextIO | None = None) -> int:
    """`ztnet policy plan`: prints the plan; returns 0 (a plan is information, not a verdict)."""
    from ztnet.observe import replay
    from ztnet.policy.document import load_policy

    candidate = load_policy(policy_path)
    result = replay.plan(flows.records, candidate, host_labels=flows.host_labels, now=now)
    source = f"{flows.source}, since {since}" if since else flows.source
    out = out if out is not None else sys.stdout
    if as_json:
        out.write(json.dumps(replay.to_dict(result, source), indent=2) + "\n")
    else:
        out.write("".join(escape(line) + "\n" for line in replay.render(result, source)))
    return 0


def policy_suggest(flows: Flows, *, agent: str, since: str = "",
                   collapse: Collapse | None = None, trust_domain: str | None = None,
                   out_path: Path | None = None, out: TextIO | None = None) -> int:
    """`ztnet policy suggest`: the draft policy, to ``out_path`` or stdout."""
    from ztnet.grants.model import is_dns_name
    from ztnet.observe.suggest import Collapse, dns_names, suggest

    records = [record for record in flows.records if record.agent.name == agent]
    domain = trust_domain or _trust_domain(records)
    if domain is None:
        raise ConfigError(f"suggest: no flow records of agent {agent} to learn the trust "
                          "domain from; give --trust-domain")
    if not is_dns_name(domain):
        raise UsageError(f"--trust-domain: {domain!r} is not a lower-case DNS name")
    text = suggest(records, agent, domain,
                   collapse=collapse or Collapse(),
                   dns=dns_names(records), source=flows.source, since=since,
                   now_ns=time.time_ns())
    if out_path is not None:
        replace_atomic(out_path, text.encode())
        sys.stderr.write(f"suggest: wrote {escape(str(out_path))} from {len(records)} records "
                         f"of {agent}; review it before applying it\n")
    else:
        (out if out is not None else sys.stdout).write(text)
    return 0


def _trust_domain(records: list[FlowRecord]) -> str | None:
    for record in records:
        spiffe = record.agent.spiffe_id
        if spiffe.startswith("spiffe://"):
            return spiffe[len("spiffe://"):].partition("/")[0]
    return None
