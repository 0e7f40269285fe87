"""Detection and response over the controller's admin API (docs/detection.md):
`ztnet quarantine`, `ztnet release`, `ztnet quarantines`, `ztnet alerts [--follow]` and
`ztnet baseline show|reset`. Options as for the other operator commands
(``--controller``/``--credentials`` or ``ZTNET_CONTROLLER``/``ZTNET_CREDENTIALS``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, TextIO

from ztnet.cli.args import SubParsers, add_command, add_group, operator_options
from ztnet.cli.operator import _print, _report, with_admin
from ztnet.text import escape, format_table, format_time

if TYPE_CHECKING:
    from ztnet.controller.admin_client import AdminClient
    from ztnet.v1 import admin_pb2


def register(sub: SubParsers) -> None:
    p = add_command(sub, "quarantine", "Deny an agent everything on every host (or one) at "
                    "once: its connections are cut, its processes optionally frozen, until "
                    "`ztnet release`.", 'ztnet quarantine --agent research-bot --reason '
                    '"TICKET-7: scanning"', handle_quarantine)
    operator_options(p)
    p.add_argument("--agent", required=True)
    p.add_argument("--host", default="", help="only on this host (default: every host)")
    p.add_argument("--reason", required=True, help="why (shown in listings, audited)")
    p.add_argument("--freeze", action="store_true",
                   help="also freeze the agent's processes (cgroup.freeze) until released")

    p = add_command(sub, "release", "Lift an agent's quarantine (every host): its policy's "
                    "grants come back with fresh windows. Audited.",
                    'ztnet release --agent research-bot --reason "TICKET-7 resolved"',
                    handle_release)
    operator_options(p)
    p.add_argument("--agent", required=True)
    p.add_argument("--reason", default="", help="why (audited)")

    p = add_command(sub, "quarantines", "List the quarantines in force.",
                    "ztnet quarantines", handle_quarantines)
    operator_options(p)

    p = add_command(sub, "alerts", "List the detectors' alerts (agent, host, detector, "
                    "evidence flow ids, action); --follow keeps printing new ones.",
                    "ztnet alerts --follow --agent research-bot", handle_alerts)
    operator_options(p)
    p.add_argument("--agent", default="", help="only this agent's alerts")
    p.add_argument("--follow", action="store_true", help="keep printing new alerts")
    p.add_argument("--limit", type=int, default=100, metavar="N",
                   help="the newest N alerts (default 100)")
    p.add_argument("--json", action="store_true", help="one JSON object per alert")

    p = add_command(sub, "baseline", "Show or reset an agent's behavioural baseline.",
                    "ztnet baseline show research-bot")
    group = add_group(p, "baseline_command")
    show = add_command(group, "show", "Show what the agent's baseline holds.",
                       "ztnet baseline show research-bot", handle_baseline_show)
    operator_options(show)
    show.add_argument("agent")
    show.add_argument("--json", action="store_true", help="the stored JSON")
    reset = add_command(group, "reset", "Start the agent's baseline over: learning again "
                        "from its next flow, or --from-policy (its reviewed rules, complete "
                        "at once).", "ztnet baseline reset research-bot --from-policy",
                        handle_baseline_reset)
    operator_options(reset)
    reset.add_argument("agent")
    reset.add_argument("--from-policy", action="store_true",
                       help="seed it from the agent's rules in the current policy")


def handle_quarantine(args: argparse.Namespace) -> int:
    return with_admin(args.controller, args.credentials,
                      lambda client: quarantine(client, args.agent, host=args.host,
                                                reason=args.reason, freeze=args.freeze))


def handle_release(args: argparse.Namespace) -> int:
    return with_admin(args.controller, args.credentials,
                      lambda client: release(client, args.agent, args.reason))


def handle_quarantines(args: argparse.Namespace) -> int:
    return with_admin(args.controller, args.credentials, quarantines)


def handle_alerts(args: argparse.Namespace) -> int:
    return with_admin(args.controller, args.credentials,
                      lambda client: alerts(client, agent=args.agent, follow=args.follow,
                                            limit=args.limit, as_json=args.json))


def handle_baseline_show(args: argparse.Namespace) -> int:
    return with_admin(args.controller, args.credentials,
                      lambda client: baseline_show(client, args.agent, as_json=args.json))


def handle_baseline_reset(args: argparse.Namespace) -> int:
    return with_admin(args.controller, args.credentials,
                      lambda client: baseline_reset(client, args.agent,
                                                    from_policy=args.from_policy))


# --- what the commands print -----------------------------------------------------------


def quarantine(client: AdminClient, agent: str, *, host: str = "", reason: str,
               freeze: bool = False, out: TextIO | None = None) -> int:
    response = client.quarantine(agent, host=host, reason=reason, freeze=freeze)
    where = f"on host {host}" if host else "on every host"
    return _report(f"agent {agent} quarantined {where}: version {response.version}",
                   response.version, response.results, out)


def release(client: AdminClient, agent: str, reason: str = "", *,
            out: TextIO | None = None) -> int:
    response = client.release(agent, reason)
    return _report(f"agent {agent} released ({len(response.released)} quarantine(s) lifted): "
                   f"version {response.version}", response.version, response.results, out)


def quarantines(client: AdminClient, *, out: TextIO | None = None) -> int:
    rows = [(q.agent, q.host or "(every host)", q.actor + (f" (alert {q.alert_id})"
                                                           if q.alert_id else ""),
             "yes" if q.freeze else "no", format_time(q.since), q.reason)
            for q in client.list_quarantines().quarantines]
    _print(out, format_table(("AGENT", "HOST", "BY", "FROZEN", "SINCE", "REASON"), rows)
           if rows else "no agent is quarantined")
    return 0


def alert_line(alert: admin_pb2.Alert) -> str:
    evidence = ",".join(alert.evidence[:4]) + (f",… ({len(alert.evidence)})"
                                               if len(alert.evidence) > 4 else "")
    return (f"{format_time(alert.time)}  #{alert.id}  {escape(alert.agent)}@"
            f"{escape(alert.host)}  {alert.detector}  {escape(alert.action)}  "
            f"{escape(alert.summary)}  evidence {evidence}")


def alert_json(alert: admin_pb2.Alert) -> str:
    return json.dumps({"id": alert.id, "time": alert.time, "agent": alert.agent,
                       "host": alert.host, "detector": alert.detector,
                       "summary": alert.summary, "evidence": list(alert.evidence),
                       "action": alert.action, "first_evidence_ns": alert.first_evidence_ns},
                      ensure_ascii=True)


def alerts(client: AdminClient, *, agent: str = "", follow: bool = False, limit: int = 100,
           as_json: bool = False, out: TextIO | None = None) -> int:
    stream = out if out is not None else sys.stdout
    render = alert_json if as_json else alert_line
    last = 0
    listed = client.list_alerts(agent=agent, limit=limit).alerts
    for alert in listed:
        last = alert.id
        print(render(alert), file=stream, flush=True)
    if not follow:
        if not listed and not as_json:
            print("no alerts", file=sys.stderr)
        return 0
    try:
        for alert in client.follow_alerts(agent=agent, after_id=last):
            print(render(alert), file=stream, flush=True)
    except BrokenPipeError:
        return 0
    return 0


def baseline_show(client: AdminClient, agent: str, *, as_json: bool = False,
                  out: TextIO | None = None) -> int:
    body = client.get_baseline(agent).baseline_json
    if as_json or not body:
        _print(out, body or f"agent {agent} has no baseline yet (it starts with its first "
               "flow)")
        return 0
    data = json.loads(body)
    state = "complete" if data["source"] == "policy" else (
        f"learning until {format_time(data['learn_until'])}")
    lines = [f"agent {agent}: {data['source']} baseline, {state}",
             f"peak bytes out a minute: {data['peak_bytes_per_minute']}",
             f"destinations ({len(data['targets'])} observed, {len(data['ranges'])} from "
             "rules)" + (" - full, no longer learning" if data.get("full") else "")]
    lines += [f"  proto {p} {escape(str(a))} port {port}" for p, a, port in data["targets"]]
    lines += [f"  proto {p or 'any'} {n} ports {lo}-{hi}" for p, n, lo, hi in data["ranges"]]
    _print(out, "\n".join(lines))
    return 0


def baseline_reset(client: AdminClient, agent: str, *, from_policy: bool = False,
                   out: TextIO | None = None) -> int:
    client.reset_baseline(agent, from_policy=from_policy)
    _print(out, f"agent {agent}: baseline " + ("seeded from the current policy's rules"
                                               if from_policy else
                                               "reset; learning again from its next flow"))
    return 0
