"""Just-in-time grants: `ztnet grant`, `ztnet grants`, `ztnet requests`, `ztnet approve`,
`ztnet deny` (operators, over the admin API) and `ztnet request-grant` (on an agent host,
through the daemon's local socket). docs/policy.md, "Just-in-time grants"."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ztnet.cli import operator
from ztnet.cli.args import SubParsers, add_command, duration, operator_options
from ztnet.durations import format_remaining
from ztnet.errors import ConfigError
from ztnet.text import escape, format_table, format_time

if TYPE_CHECKING:
    from ztnet.controller.admin_client import AdminClient


def register(sub: SubParsers) -> None:
    p = add_command(sub, "grant", "Issue a just-in-time grant outside the policy file: signed, "
                    "expiring (the kernel ends it at its ttl), pushed at once, audited.",
                    'ztnet grant --agent research-bot --to 203.0.113.7 --ports 443 --ttl 10m '
                    '--reason "TICKET-42"', handle_grant)
    operator_options(p)
    _path_options(p)
    p.add_argument("--host", action="append", default=[], metavar="HOST",
                   help="only on this host (repeat; default: where the agent's host "
                   "selector matches)")
    p.add_argument("--wait", type=duration, default=0, metavar="DURATION",
                   help="how long to wait for hosts to answer (default: the controller's)")

    p = add_command(sub, "grants", "List just-in-time grants: agent, path, time left, "
                    "reason and approver.", "ztnet grants --all", handle_grants)
    operator_options(p)
    p.add_argument("--all", action="store_true", help="also expired grants (newest 1000)")

    p = add_command(sub, "requests", "List hosts' requests for just-in-time grants "
                    "(pending first to decide with `ztnet approve` / `ztnet deny`).",
                    "ztnet requests --state pending", handle_requests)
    operator_options(p)
    p.add_argument("--state", default="", choices=("", "pending", "approved", "denied"),
                   help="only requests in this state")

    for name, verb in (("approve", "Approve"), ("deny", "Deny")):
        p = add_command(sub, name, f"{verb} a pending grant request (audited).",
                        f"ztnet {name} r-0123456789ab --note 'ok for the migration'",
                        handle_approve if name == "approve" else handle_deny)
        operator_options(p)
        p.add_argument("request_id", metavar="ID")
        p.add_argument("--note", default="", help="why (stored with the decision)")
        if name == "approve":
            p.add_argument("--ttl", type=duration, default=0, metavar="DURATION",
                           help="grant this long instead of what was asked (the policy's "
                           "[jit] max_ttl caps both)")

    p = add_command(sub, "request-grant", "Ask the controller, through this host's daemon, for "
                    "a just-in-time grant for one of this host's agents; granted at once if "
                    "the policy auto-approves it, else it waits for an operator.",
                    'ztnet request-grant --agent research-bot --to 203.0.113.7 --ports 443 '
                    '--ttl 10m --reason "fetch the dataset for TICKET-42"', handle_request)
    _path_options(p)
    p.add_argument("--socket", type=Path, default=None, metavar="PATH",
                   help="the daemon's socket (default <state>/grant-requests.sock)")
    p.add_argument("--state", type=Path, default=None, help="the daemon's state directory")
    p.add_argument("--instance", default=None, help="ztnet instance (default: default)")
    p.add_argument("--wait-decision", type=duration, default=0, metavar="DURATION",
                   help="wait this long for an operator's decision (default: do not wait)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")


def _path_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", required=True)
    p.add_argument("--to", required=True, help="IP address or CIDR")
    p.add_argument("--ports", default="", help='"443", "8000-8100" or "any"')
    p.add_argument("--proto", default="tcp", help="tcp, udp, icmp or any (default tcp)")
    p.add_argument("--ttl", type=duration, required=True, metavar="DURATION",
                   help="how long (clamped to the policy's [jit] max_ttl)")
    p.add_argument("--reason", required=True, help="why: a ticket, a task (stored, audited)")


# --- handlers -------------------------------------------------------------------------


def handle_grant(args: argparse.Namespace) -> int:
    return operator.with_admin(args.controller, args.credentials, lambda client: grant(
        client, agent=args.agent, to=args.to, ports=args.ports, proto=args.proto,
        ttl=args.ttl, reason=args.reason, hosts=args.host, wait=args.wait))


def handle_grants(args: argparse.Namespace) -> int:
    return operator.with_admin(args.controller, args.credentials,
                               lambda client: grants(client, include_expired=args.all))


def handle_requests(args: argparse.Namespace) -> int:
    return operator.with_admin(args.controller, args.credentials,
                               lambda client: requests(client, state=args.state))


def handle_approve(args: argparse.Namespace) -> int:
    return operator.with_admin(args.controller, args.credentials, lambda client: decide(
        client, args.request_id, approve=True, note=args.note, ttl=args.ttl))


def handle_deny(args: argparse.Namespace) -> int:
    return operator.with_admin(args.controller, args.credentials, lambda client: decide(
        client, args.request_id, approve=False, note=args.note))


def handle_request(args: argparse.Namespace) -> int:
    from ztnet.cli.args import daemon_state
    from ztnet.daemon.requests import SOCKET_NAME

    path = args.socket or daemon_state(args.state, args.instance) / SOCKET_NAME
    message = {"op": "request", "agent": args.agent, "to": args.to, "ports": args.ports,
               "proto": args.proto, "ttl": args.ttl, "reason": args.reason}
    return request_grant(path, message, wait=float(args.wait_decision), as_json=args.json)


# --- what the commands do ---------------------------------------------------------------


def grant(client: AdminClient, *, agent: str, to: str, ports: str, proto: str, ttl: float,
          reason: str, hosts: list[str], wait: float = 0.0, out: TextIO | None = None) -> int:
    response = client.issue_grant(agent, to, ports, proto=proto, ttl=ttl, reason=reason,
                                  hosts=hosts, wait=wait)
    g = response.grant
    return operator._report(
        f"granted {g.grant_id}: {g.agent} -> {g.proto} {g.to} ports {g.ports} until "
        f"{format_time(g.not_after)}, version {response.version}", response.version,
        response.results, out)


def grants(client: AdminClient, *, include_expired: bool = False,
           out: TextIO | None = None) -> int:
    now = time.time()
    rows = [(g.grant_id, g.agent, f"{g.proto} {g.to}", g.ports, _left(g.not_after, now),
             ",".join(g.hosts) or "(selector)", g.approver, g.requested_by, g.reason)
            for g in client.list_grants(include_expired=include_expired).grants]
    operator._print(out, format_table(("GRANT", "AGENT", "TO", "PORTS", "LEFT", "HOSTS",
                                       "APPROVER", "REQUESTED BY", "REASON"), rows))
    return 0


def requests(client: AdminClient, *, state: str = "", out: TextIO | None = None) -> int:
    found = sorted(client.list_grant_requests(state).requests,
                   key=lambda r: (r.state != "pending", -r.created_at))
    rows = [(r.id, r.state, r.host, r.agent, f"{r.proto} {r.to}", r.ports,
             format_remaining(r.ttl_seconds), format_time(r.created_at),
             r.decided_by or "-", r.grant_id or "-", r.reason) for r in found]
    operator._print(out, format_table(("REQUEST", "STATE", "HOST", "AGENT", "TO", "PORTS",
                                       "TTL", "ASKED", "DECIDED BY", "GRANT", "REASON"), rows))
    return 0


def decide(client: AdminClient, request_id: str, *, approve: bool, note: str = "",
           ttl: float = 0.0, out: TextIO | None = None) -> int:
    response = client.decide_grant_request(request_id, approve=approve, note=note, ttl=ttl)
    r = response.request
    if not approve:
        operator._print(out, escape(f"denied {r.id} ({r.agent} on {r.host} -> {r.proto} "
                                    f"{r.to} ports {r.ports})"))
        return 0
    g = response.grant
    return operator._report(
        escape(f"approved {r.id}: {g.grant_id} for {g.agent} on {r.host} until "
               f"{format_time(g.not_after)}, version {response.version}"),
        response.version, response.results, out)


def request_grant(path: Path, message: dict[str, Any], *, wait: float = 0.0,
                  as_json: bool = False, out: TextIO | None = None) -> int:
    """Exit 0 when granted, 3 while pending, 4 when denied; ConfigError on failure."""
    from ztnet.daemon.requests import ask

    answer = ask(path, message)
    deadline = time.monotonic() + wait
    while answer.get("ok") and answer.get("state") == "pending" and \
            time.monotonic() < deadline:
        time.sleep(1.0)  # polling the controller: a person decides, seconds apart
        answer = ask(path, {"op": "status", "request_id": answer.get("request_id", "")})
    if not answer.get("ok"):
        raise ConfigError(f"request-grant: {answer.get('error', 'refused')}")
    if as_json:
        operator._print(out, json.dumps(answer))
    else:
        operator._print(out, escape(
            f"{answer.get('request_id')}: {answer.get('state')}"
            + (f", grant {answer.get('grant_id')} for {answer.get('ttl')}s"
               if answer.get("grant_id") else "") + f" ({answer.get('message', '')})"))
    return {"approved": 0, "pending": 3}.get(str(answer.get("state")), 4)


def _left(not_after: float, now: float) -> str:
    return format_remaining(not_after - now) if not_after > now else "expired"

