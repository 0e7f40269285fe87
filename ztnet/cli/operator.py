"""The operator's commands over the controller's admin API (mutual TLS): `ztnet hosts`,
`ztnet label`, `ztnet revoke` and `ztnet flows` are registered here; `ztnet policy apply|show` and
`ztnet agents --controller` belong to their groups (ztnet.cli.policy, ztnet.cli.run) and
call the functions below.

Every command takes the controller's mutual-TLS address and an admin credential
directory, from ``--controller``/``--credentials`` or the environment
(``ZTNET_CONTROLLER``/``ZTNET_CREDENTIALS``). The functions after the handlers are what
the commands print, given an :class:`~ztnet.controller.admin_client.AdminClient`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ztnet.cli.args import SubParsers, UsageError, add_command, operator_options
from ztnet.errors import ConfigError, ControllerError
from ztnet.text import escape, format_table, format_time, use_color

if TYPE_CHECKING:
    from ztnet.controller.admin_client import AdminClient
    from ztnet.v1 import admin_pb2

def register(sub: SubParsers) -> None:
    p = add_command(sub, "hosts", "List enrolled hosts: applied version, in sync, connected, "
                    "last seen, last rejection.", "ztnet hosts --controller ctl:7443 "
                    "--credentials ~/.ztnet/admin", handle_hosts)
    operator_options(p)

    p = add_command(sub, "label", "Change an enrolled host's labels (audited) and push at "
                    "once: host selectors in the policy then send the host the agents its "
                    "new labels select. KEY=VALUE sets a label, KEY- removes one.",
                    "ztnet label gpu-1 env=prod role=gpu zone-", handle_label)
    operator_options(p)
    p.add_argument("host", metavar="HOST")
    p.add_argument("changes", nargs="+", metavar="KEY=VALUE|KEY-")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="how long to wait for hosts to answer (default: the controller's)")

    p = add_command(sub, "revoke", "Revoke one grant, or every grant, of an agent on every "
                    "host at once (established connections are cut); --restore lifts it.",
                    "ztnet revoke --agent research-bot --grant g-0123456789abcdef",
                    handle_revoke)
    operator_options(p)
    p.add_argument("--agent", required=True)
    p.add_argument("--grant", default="", metavar="ID", help="grant id g-… (default: all)")
    p.add_argument("--restore", action="store_true", help="lift the revocation instead")

    p = add_command(
        sub, "flows", "Query the flow records every host reported to the controller: the "
        "newest N matching flows, shown in time order with the table of `ztnet observe`.",
        "ztnet flows --controller ctl:7443 --agent research-bot --verdict denied --since 1h",
        handle_flows)
    operator_options(p)
    p.add_argument("--host", default="", help="only flows of this host")
    p.add_argument("--agent", default="", metavar="NAME", help="only this agent")
    p.add_argument("--verdict", metavar="allowed|denied|audit", help="only this verdict")
    p.add_argument("--kind", metavar="KIND", help="only connect, sendmsg, flow_end or dns records")
    p.add_argument("--since", metavar="WHEN",
                   help="only flows since then: a duration ago (30s, 10m, 2h) or RFC 3339")
    p.add_argument("--until", metavar="WHEN", help="only flows before then (same forms)")
    p.add_argument("--limit", type=int, default=100, metavar="N",
                   help="the newest N matching flows (default 100, at most 10000)")
    p.add_argument("--json", action="store_true",
                   help="one JSON record per line, in the schema of docs/flows.md")


# --- handlers: the parsed command line -> the functions below ------------------------


def handle_hosts(args: argparse.Namespace) -> int:
    return with_admin(args.controller, args.credentials, hosts)


def handle_label(args: argparse.Namespace) -> int:
    from ztnet.policy.selectors import check_label_key, parse_label

    labels: dict[str, str] = {}
    remove: list[str] = []
    try:
        for change in args.changes:
            if change.endswith("-") and "=" not in change:
                remove.append(check_label_key(change[:-1]))
            else:
                key, value = parse_label(change)
                labels[key] = value
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return with_admin(args.controller, args.credentials,
                      lambda client: label(client, args.host, labels, remove, wait=args.wait))


def handle_revoke(args: argparse.Namespace) -> int:
    return with_admin(args.controller, args.credentials,
                      lambda client: revoke(client, args.agent, args.grant,
                                            restore=args.restore))


def handle_flows(args: argparse.Namespace) -> int:
    from ztnet.controller.flows import MAX_LIMIT
    from ztnet.observe import query

    if not 1 <= args.limit <= MAX_LIMIT:
        raise UsageError(f"--limit: must be between 1 and {MAX_LIMIT}")
    try:
        verdict = query.parse_verdict(args.verdict).value if args.verdict else ""
        kind = query.parse_kind(args.kind).value if args.kind else ""
        since_ns = max(0, query.parse_since(args.since)) if args.since else 0
        until_ns = max(0, query.parse_since(args.until)) if args.until else 0
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return with_admin(args.controller, args.credentials,
                      lambda client: flows(client, host=args.host, agent=args.agent,
                                           verdict=verdict, kind=kind, since_ns=since_ns,
                                           until_ns=until_ns, limit=args.limit,
                                           as_json=args.json, color=use_color(sys.stdout)))


def with_admin(controller: str | None, credentials: str | os.PathLike[str] | None,
               command: Callable[[AdminClient], int]) -> int:
    """Run ``command`` with a client of the controller at ``controller`` (else
    $ZTNET_CONTROLLER), as the admin in ``credentials`` (else $ZTNET_CREDENTIALS)."""
    from ztnet.controller.admin_client import AdminClient, resolve

    address, loaded = resolve(controller, credentials)
    with AdminClient(address, loaded) as client:
        return command(client)


# --- what the commands print -----------------------------------------------------------


def policy_apply(client: AdminClient, path: Path, *, wait: float = 0.0,
                 out: TextIO | None = None) -> int:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"policy: cannot read {path}: {exc}") from None
    response = client.apply_policy(text, wait)
    return _report(f"policy version {response.version} stored", response.version,
                   response.results, out)


def policy_show(client: AdminClient, *, out: TextIO | None = None,
                err: TextIO | None = None) -> int:
    response = client.get_policy()
    print(f"# version {response.version}, applied {format_time(response.applied_at)}",
          file=err if err is not None else sys.stderr)
    _print(out, response.policy_toml.rstrip("\n"))
    return 0


def hosts(client: AdminClient, *, out: TextIO | None = None) -> int:
    rows = []
    for host in client.list_hosts().hosts:
        nack = f"v{host.last_nack_version}: {host.last_nack_reason}" if \
            host.last_nack_version else "-"
        # an older controller sends no attestation: every host it knows is software
        identity = host.attestation or "software"
        if host.ek_hash:
            identity += f" {host.ek_hash}"
        labels = ",".join(f"{k}={v}" for k, v in sorted(host.labels.items())) or "-"
        rows.append((host.name, str(host.applied_version or "-"), _yes(host.in_sync),
                     _yes(host.connected),
                     format_time(host.last_seen) if host.last_seen else "never", identity,
                     labels, nack))
    _print(out, format_table(("HOST", "APPLIED", "IN SYNC", "CONNECTED", "LAST SEEN",
                              "IDENTITY", "LABELS", "LAST NACK"), rows))
    return 0


def label(client: AdminClient, host: str, labels: dict[str, str], remove: list[str], *,
          wait: float = 0.0, out: TextIO | None = None) -> int:
    from ztnet.policy.selectors import format_labels

    response = client.label_host(host, labels, remove, wait=wait)
    now = format_labels(dict(response.labels))
    if not response.changed:
        _print(out, f"host {host}: labels unchanged ({now})")
        return 0
    if not response.version:
        _print(out, f"host {host}: labels {now} (no policy yet: nothing pushed)")
        return 0
    return _report(f"host {host}: labels {now}, version {response.version}",
                   response.version, response.results, out)


def agents(client: AdminClient, *, out: TextIO | None = None) -> int:
    rows = [(agent.name, str(agent.rules), ",".join(agent.revoked_grants) or "-",
             agent.spiffe_id) for agent in client.list_agents().agents]
    _print(out, format_table(("AGENT", "RULES", "REVOKED", "SPIFFE ID"), rows))
    return 0


def revoke(client: AdminClient, agent: str, grant_id: str = "", *, restore: bool = False,
           out: TextIO | None = None) -> int:
    response = client.revoke(agent, grant_id, restore=restore)
    what = f"grant {grant_id} of agent {agent}" if grant_id else f"every grant of agent {agent}"
    verb = "restored" if restore else "revoked"
    return _report(f"{verb} {what}: version {response.version}", response.version,
                   response.results, out)


def flows(client: AdminClient, *, host: str = "", agent: str = "", verdict: str = "",
          kind: str = "", since_ns: int = 0, until_ns: int = 0, limit: int = 100,
          as_json: bool = False, color: bool = False, out: TextIO | None = None,
          err: TextIO | None = None) -> int:
    """The newest matching flows, printed in time order (oldest first, like
    `ztnet observe`) with the same table or JSON lines."""
    from ztnet.observe.records import from_json
    from ztnet.observe.render import Renderer

    response = client.query_flows(host=host, agent=agent, verdict=verdict, event_type=kind,
                                  since_ns=since_ns, until_ns=until_ns, limit=limit)
    err = err if err is not None else sys.stderr
    renderer = Renderer(out if out is not None else sys.stdout, json=as_json, color=color)
    skipped = 0
    granted: set[str] = set()
    try:
        for data in reversed(response.records):
            try:
                record = from_json(data)
            except ValueError:  # a newer schema on the controller: say so, carry on
                skipped += 1
                continue
            if record.grant is not None:
                granted.add(record.grant.name)
            renderer.write(record)
        renderer.flush()
    except BrokenPipeError:  # `ztnet flows | head`
        return 0
    _explain_jit(client, granted, err)
    if skipped:
        err.write(f"flows: skipped {skipped} records this ztnet cannot read\n")
    if response.truncated:
        err.write(f"flows: showing the newest {len(response.records)}; more match (narrow "
                  "the filters or raise --limit)\n")
    elif renderer.count == 0 and not as_json:
        err.write("flows: no matching flows\n")
    return 0


def _explain_jit(client: AdminClient, granted: set[str], err: TextIO) -> None:
    """Name the reason and approver of every just-in-time grant the flows shown used."""
    if not granted:
        return
    try:
        jit = [g for g in client.list_grants(include_expired=True).grants
               if g.grant_id in granted]
    except ControllerError:  # an older controller, or none of them: the table stands alone
        return
    for g in jit:
        err.write(escape(f"flows: {g.grant_id} is a just-in-time grant for {g.agent}, "
                         f"approved by {g.approver} ({g.requested_by}): {g.reason}") + "\n")


def _report(headline: str, version: int, results: Sequence[admin_pb2.HostResult],
            out: TextIO | None) -> int:
    """Each connected host's outcome; a ControllerError unless every host acknowledged."""
    if not results:
        _print(out, f"{headline}; no host is connected (hosts get it when they connect)")
        return 0
    _print(out, f"{headline}; pushed to {len(results)} connected host(s):")
    rows = [(r.host, r.outcome, str(r.version), r.reason or "") for r in results]
    _print(out, format_table(("HOST", "OUTCOME", "VERSION", "REASON"), rows))
    failed = [r for r in results if r.outcome != "ack"]
    if failed:
        names = ", ".join(f"{r.host} ({r.outcome})" for r in failed)
        raise ControllerError(f"controller: version {version} was not applied by "
                              f"{len(failed)} of {len(results)} host(s): {names}")
    return 0


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _print(out: TextIO | None, text: str) -> None:
    print(text, file=out if out is not None else sys.stdout)
