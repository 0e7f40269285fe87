"""Command-line parsing only: every command delegates to a function in a
module below, and every ZtnetError becomes a one-line message and an exit
code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ztnet.errors import ZtnetError

Handler = Callable[[argparse.Namespace], int]


def _command(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    help_text: str,
    example: str,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


# --- keys and policy (grants layer) -------------------------------------------------


def add_keys_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`ztnet keys init DIR`."""
    keys = _command(
        sub, "keys", "Manage the Ed25519 grant-signing key.", "ztnet keys init /etc/ztnet/keys"
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    init = _command(
        keys_sub,
        "init",
        "Create DIR/signing.key (private, mode 0600) and DIR/signing.pub; "
        "never overwrites an existing key.",
        "ztnet keys init /etc/ztnet/keys",
    )
    init.add_argument("dir", metavar="DIR", help="directory for the key pair (created 0700)")

    def keys_init(args: argparse.Namespace) -> int:
        from ztnet.grants import commands  # imported late: keeps `ztnet --help` light

        return commands.keys_init(args.dir)

    init.set_defaults(handler=keys_init)


def add_policy_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`ztnet policy check|compile|verify`."""
    from ztnet.policy.document import parse_duration

    def duration(text: str) -> int:
        try:
            return parse_duration(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    policy = _command(
        sub,
        "policy",
        "Validate a policy file, compile it into a signed bundle, verify a bundle.",
        "ztnet policy check examples/policy.toml",
    )
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)

    check = _command(
        policy_sub,
        "check",
        "Validate POLICY (reporting every problem) and print a summary.",
        "ztnet policy check examples/policy.toml",
    )
    check.add_argument("policy", metavar="POLICY", help="policy file (TOML)")

    def policy_check(args: argparse.Namespace) -> int:
        from ztnet.grants import commands

        return commands.policy_check(args.policy)

    check.set_defaults(handler=policy_check)

    compile_ = _command(
        policy_sub,
        "compile",
        "Compile POLICY into a bundle of expiring grants for one host, signed with KEY.",
        "ztnet policy compile examples/policy.toml --key keys/signing.key --host web-1 "
        "--ttl 5m --out web-1.bundle",
    )
    compile_.add_argument("policy", metavar="POLICY", help="policy file (TOML)")
    compile_.add_argument("--key", required=True, help="signing key (signing.key)")
    compile_.add_argument("--host", required=True, help="host name the bundle is for")
    compile_.add_argument("--out", required=True, metavar="BUNDLE", help="bundle file to write")
    compile_.add_argument(
        "--version",
        type=int,
        help="policy version, must grow with every bundle (default: current Unix time, s)",
    )
    compile_.add_argument(
        "--ttl", type=duration, default=300, help="lifetime of rules without a ttl (default 5m)"
    )
    compile_.add_argument(
        "--bundle-ttl",
        type=duration,
        help="how long the bundle itself is fresh (default: until its first grant expires)",
    )
    compile_.add_argument(
        "--issuer", default="ztnet-cli", help="issuer name recorded in the bundle"
    )

    def policy_compile(args: argparse.Namespace) -> int:
        from ztnet.grants import commands

        return commands.policy_compile(
            args.policy,
            key_path=args.key,
            host=args.host,
            out_path=args.out,
            version=args.version,
            default_ttl=args.ttl,
            bundle_ttl=args.bundle_ttl,
            issuer=args.issuer,
        )

    compile_.set_defaults(handler=policy_compile)

    verify = _command(
        policy_sub,
        "verify",
        "Verify BUNDLE against trusted public keys and show its grants; "
        "exits nonzero with the reason if it would be refused.",
        "ztnet policy verify web-1.bundle --trust keys/signing.pub --host web-1",
    )
    verify.add_argument("bundle", metavar="BUNDLE", help="bundle file")
    verify.add_argument(
        "--trust",
        action="append",
        required=True,
        metavar="PUBKEY",
        help="trusted public key (signing.pub); repeat to trust several",
    )
    verify.add_argument("--host", help="check the bundle is for this host (default: not checked)")
    verify.add_argument(
        "--min-version", type=int, default=1, help="refuse bundles older than this version"
    )

    def policy_verify(args: argparse.Namespace) -> int:
        from ztnet.grants import commands

        return commands.policy_verify(
            args.bundle, trust=args.trust, host=args.host, min_version=args.min_version
        )

    verify.set_defaults(handler=policy_verify)


# --- datapath and agents ----------------------------------------------------------


def add_datapath_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`ztnet run`, `agents`, `teardown`, `status`, `debug`."""
    p = _command(sub, "run", "Run a command as an agent, confined by the datapath.",
                 "ztnet run --agent research-bot --user nobody -- curl https://10.0.2.7/")
    _instance_option(p)
    p.add_argument("--agent", required=True, help="agent name (a DNS label)")
    p.add_argument("--user", help="drop to this user (and its groups) after joining the cgroup")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS…]")
    p.set_defaults(handler=_cmd_run)

    p = _command(sub, "agents", "List agents: cgroup, live processes, live grants.",
                 "ztnet agents --instance host-a")
    _instance_option(p)
    p.set_defaults(handler=_cmd_agents)

    p = _command(sub, "status", "Show whether enforcement is in place, and its counters.",
                 "ztnet status")
    _instance_option(p)
    p.set_defaults(handler=_cmd_status)

    p = _command(sub, "teardown", "Remove ztnet from the kernel: kill agents, detach "
                 "programs, unpin maps, remove cgroups.", "ztnet teardown --yes")
    _instance_option(p)
    p.add_argument("--yes", action="store_true", help="really remove enforcement")
    p.set_defaults(handler=_cmd_teardown)

    p = _command(sub, "demo", "The whole story in one command (root): brings the lab up "
                 "(controller, enrolled daemons, services; `ztnet lab`), applies the lab policy, "
                 "runs a scripted agent with live flow traces, revokes its grant, prints a "
                 "summary and tears the lab down; exits non-zero if any step misbehaves.",
                 "sudo ztnet demo")
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    p.add_argument("--local", action="store_true", help="the older single-host showcase "
                   "instead: one datapath, no controller")
    p.add_argument("--name", default="ztlab", help="lab name (several labs can coexist; "
                   "default ztlab)")
    p.set_defaults(handler=_cmd_demo)

    p = _command(sub, "debug", "Debugging aids.", "ztnet debug dump-bpf")
    debug = p.add_subparsers(dest="debug_command", metavar="WHAT", required=True)
    d = _command(debug, "dump-bpf", "Print the exact BPF translation unit and cflags.",
                 "ztnet debug dump-bpf --instance host-a")
    _instance_option(d)
    d.set_defaults(handler=_cmd_dump_bpf)


def _instance_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instance", default=None,
                        help="instance name, for several daemons on one kernel (default: default)")


def _cmd_run(args: argparse.Namespace) -> int:
    from ztnet.datapath.loader import is_enforcing
    from ztnet.identity.launch import run_agent
    from ztnet.instance import Instance

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    run_agent(Instance.resolve(args.instance), args.agent, argv, user=args.user,
              is_enforcing=is_enforcing)
    return 0  # not reached: run_agent execs


def _cmd_agents(args: argparse.Namespace) -> int:
    from ztnet.datapath.datapath import Datapath
    from ztnet.identity import cgroups
    from ztnet.instance import Instance

    instance = Instance.resolve(args.instance)
    with Datapath.inspect(instance) as datapath:
        live = datapath.live_grant_counts()
    rows = [("AGENT", "CGROUP", "PIDS", "LIVE GRANTS")]
    for name, path in cgroups.agent_cgroups(instance).items():
        procs = cgroups.agent_processes(path)
        pids = ",".join(f"{p.pid}({p.comm})" for p in procs) or "-"
        rows.append((name, str(path), pids, str(live.get(name, 0))))
    _print_table(rows)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from ztnet.datapath.datapath import Datapath
    from ztnet.datapath.loader import attached_counts, is_enforcing
    from ztnet.instance import Instance

    instance = Instance.resolve(args.instance)
    enforcing = is_enforcing(instance)
    print(f"instance:   {instance.name}")
    print(f"cgroup:     {instance.cgroup_root}")
    print(f"pins:       {instance.pin_dir}")
    print(f"enforcing:  {'yes' if enforcing else 'NO'}")
    for program, count in attached_counts(instance).items():
        print(f"  {program:<12} {count} attached")
    if enforcing:
        with Datapath.inspect(instance) as datapath:
            print(f"generation: {datapath.generation}")
            print(f"grants:     {len(datapath.grants())}")
            for name, value in datapath.counters().items():
                print(f"  {name:<14} {value}")
    return 0 if enforcing else 1


def _cmd_teardown(args: argparse.Namespace) -> int:
    from ztnet.datapath.datapath import teardown
    from ztnet.instance import Instance

    instance = Instance.resolve(args.instance)
    if not args.yes:
        print(f"this kills every agent under {instance.cgroup_root} and removes enforcement; "
              "run again with --yes", file=sys.stderr)
        return 1
    teardown(instance)
    print(f"removed instance {instance.name}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.local:
        from ztnet.lab.showcase import run_showcase

        return run_showcase()
    from ztnet.lab.demo import run_demo

    return run_demo(args.name, keep=args.keep)


def _cmd_dump_bpf(args: argparse.Namespace) -> int:
    from ztnet.datapath.loader import dump_program_source
    from ztnet.instance import Instance

    print(dump_program_source(Instance.resolve(args.instance)))
    return 0


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


# --- controller (gRPC) ------------------------------------------------------------


def add_controller_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`ztnet controller init|serve|token create|admin-cert|revoke-host`, the operator
    commands `hosts`, `revoke` and `flows`, and, on groups other functions create,
    `policy apply|show` and `agents --controller` (docs/controller.md)."""
    import os
    from typing import Any

    from ztnet.policy.document import parse_duration

    def duration(text: str) -> int:
        try:
            return parse_duration(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def limit_or_off(text: str) -> int:
        """A duration, or 0/off for no limit."""
        return 0 if text in ("0", "off") else duration(text)

    def state_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--state", required=True, type=Path, metavar="DIR",
                            help="the controller's state directory")

    def operator_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--controller", metavar="ADDR", default=None,
                            help="the controller's mutual-TLS HOST:PORT (default: "
                            "$ZTNET_CONTROLLER)")
        parser.add_argument("--credentials", metavar="DIR", default=None,
                            help="admin credential directory from `controller admin-cert` "
                            "(default: $ZTNET_CREDENTIALS)")

    def with_admin(args: argparse.Namespace, run: Callable[..., int], *rest: object,
                   **options: object) -> int:
        from ztnet.controller.admin_client import AdminClient, resolve

        address, credentials = resolve(args.controller, args.credentials)
        with AdminClient(address, credentials) as client:
            return run(client, *rest, **options)

    controller = _command(sub, "controller", "Run and administer the controller: the CA, "
                          "enrollment tokens, admin credentials and the gRPC server.",
                          "ztnet controller init --state /var/lib/ztnet-controller "
                          "--trust-domain example.org")
    group = controller.add_subparsers(dest="controller_command", metavar="COMMAND",
                                      required=True)

    p = _command(group, "init", "Create a state directory: a CA for mutual TLS, a grant-"
                 "signing key, the server certificate and the database. Never overwrites.",
                 "ztnet controller init --state /var/lib/ztnet-controller "
                 "--trust-domain example.org --san ctl.example.org")
    state_option(p)
    p.add_argument("--trust-domain", required=True, metavar="DOMAIN",
                   help="SPIFFE trust domain (policies must name the same one)")
    p.add_argument("--san", action="append", default=[], metavar="NAME",
                   help="extra DNS name or IP address for the server certificate (repeat); "
                   "localhost, 127.0.0.1 and ::1 are always included")

    def init(args: argparse.Namespace) -> int:
        from ztnet.controller import commands

        return commands.controller_init(args.state, args.trust_domain, sans=tuple(args.san))

    p.set_defaults(handler=init)

    p = p_serve = _command(group, "serve", "Serve the node and admin APIs (gRPC, mutual TLS), push "
                 "signed grants to every connected host, renew them before they expire.",
                 "ztnet controller serve --state /var/lib/ztnet-controller "
                 "--listen 0.0.0.0:7443 --enroll-listen 0.0.0.0:7444")
    state_option(p)
    p.add_argument("--listen", required=True, metavar="ADDR",
                   help="mutual-TLS HOST:PORT for daemons and operators (port 0: any)")
    p.add_argument("--enroll-listen", metavar="ADDR", default=None,
                   help="server-authenticated TLS HOST:PORT where hosts without a "
                   "certificate can Enroll (default: enrollment off)")
    p.add_argument("--policy", type=Path, metavar="FILE",
                   help="apply this policy at start if it is newer than the stored one")
    p.add_argument("--grant-ttl", type=duration, default=300, metavar="DURATION",
                   help="lifetime of grants whose rule has no ttl; bundles are renewed at "
                   "half their lifetime (default 5m)")
    p.add_argument("--host-cert-ttl", type=duration, default=86400, metavar="DURATION",
                   help="lifetime of host certificates (default 24h)")
    p.add_argument("--apply-timeout", type=duration, default=10, metavar="DURATION",
                   help="how long ApplyPolicy and Revoke wait for hosts by default (10s)")
    p.add_argument("--ready-file", type=Path, metavar="FILE",
                   help="write {pid, listen, enroll_listen} as JSON here once serving")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--flow-retention", type=limit_or_off, default=7 * 86400,
                   metavar="DURATION", help="delete flow records older than this (default "
                   "7d; 0: keep them)")
    p.add_argument("--flow-max-rows", type=int, default=10_000_000, metavar="N",
                   help="keep at most N flow records, deleting the oldest (default "
                   "10000000, about 15 GB of disk; 0: no limit)")
    p.add_argument("--flow-prune-interval", type=duration, default=60, metavar="DURATION",
                   help="how often retention runs (default 1m)")
    p.add_argument("--metrics", metavar="ADDR", default=None,
                   help="serve Prometheus metrics at http://ADDR/metrics (e.g. "
                   "127.0.0.1:9465; default: off)")

    def serve(args: argparse.Namespace) -> int:
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before gRPC's core starts
        from ztnet import logs
        from ztnet.controller.flows import Retention
        from ztnet.controller.server import ServeConfig
        from ztnet.controller.server import serve as run_server

        if args.flow_max_rows < 0:
            p_serve.error("--flow-max-rows: must be 0 (no limit) or more")
        logs.setup(args.log_format)
        return run_server(ServeConfig(
            state=args.state, listen=args.listen, enroll_listen=args.enroll_listen,
            policy=args.policy, grant_ttl=args.grant_ttl, host_cert_ttl=args.host_cert_ttl,
            apply_timeout=args.apply_timeout, ready_file=args.ready_file,
            retention=Retention(max_age=args.flow_retention, max_rows=args.flow_max_rows,
                                interval=args.flow_prune_interval),
            metrics=args.metrics))

    p.set_defaults(handler=serve)

    p = _command(group, "token", "Enrollment tokens.",
                 "ztnet controller token create --state DIR --host web-1")
    tokens = p.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    p = _command(tokens, "create", "Print a one-time enrollment token for HOST and the CA "
                 "fingerprint, the two things `ztnet enroll` needs.",
                 "ztnet controller token create --state DIR --host web-1 --ttl 15m --json")
    state_option(p)
    p.add_argument("--host", required=True, help="the host this token may enroll")
    p.add_argument("--ttl", type=duration, default=900, metavar="DURATION",
                   help="how long the token is valid (default 15m)")
    p.add_argument("--json", action="store_true",
                   help='print {"token": …, "ca_fingerprint": …}')

    def token_create(args: argparse.Namespace) -> int:
        from ztnet.controller import commands

        return commands.token_create(args.state, args.host, ttl=args.ttl, as_json=args.json)

    p.set_defaults(handler=token_create)

    p = _command(group, "admin-cert", "Write an admin credential directory (admin.key, "
                 "admin.pem, ca.pem) for the operator commands.",
                 "ztnet controller admin-cert --state DIR --out ~/.ztnet/admin --name alice")
    state_option(p)
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="directory to write (created 0700)")
    p.add_argument("--name", default="admin", help="who holds it (in the SPIFFE id)")
    p.add_argument("--ttl", type=duration, default=30 * 86400, metavar="DURATION",
                   help="lifetime (default 30d)")

    def admin_cert(args: argparse.Namespace) -> int:
        from ztnet.controller import commands

        return commands.admin_cert(args.state, args.out, name=args.name, ttl=args.ttl)

    p.set_defaults(handler=admin_cert)

    p = _command(group, "revoke-host", "Revoke every certificate of HOST (a lost or "
                 "compromised host); it must enroll again with a new token.",
                 "ztnet controller revoke-host --state DIR --host web-1")
    state_option(p)
    p.add_argument("--host", required=True)

    def revoke_host(args: argparse.Namespace) -> int:
        from ztnet.controller import commands

        return commands.revoke_host(args.state, args.host)

    p.set_defaults(handler=revoke_host)

    # --- operator commands (admin API over mutual TLS) ---
    p = _command(sub, "hosts", "List enrolled hosts: applied version, in sync, connected, "
                 "last seen, last rejection.", "ztnet hosts --controller ctl:7443 "
                 "--credentials ~/.ztnet/admin")
    operator_options(p)

    def hosts(args: argparse.Namespace) -> int:
        from ztnet.controller import admin_client

        return with_admin(args, admin_client.hosts)

    p.set_defaults(handler=hosts)

    p = _command(sub, "revoke", "Revoke one grant, or every grant, of an agent on every host "
                 "at once (established connections are cut); --restore lifts it.",
                 "ztnet revoke --agent research-bot --grant g-0123456789abcdef")
    operator_options(p)
    p.add_argument("--agent", required=True)
    p.add_argument("--grant", default="", metavar="ID", help="grant id g-… (default: all)")
    p.add_argument("--restore", action="store_true", help="lift the revocation instead")

    def revoke(args: argparse.Namespace) -> int:
        from ztnet.controller import admin_client

        return with_admin(args, admin_client.revoke, args.agent, args.grant,
                          restore=args.restore)

    p.set_defaults(handler=revoke)

    p = p_flows = _command(
        sub, "flows", "Query the flow records every host reported to the controller: the "
        "newest N matching flows, shown in time order with the table of `ztnet observe`.",
        "ztnet flows --controller ctl:7443 --agent research-bot --verdict denied --since 1h")
    operator_options(p)
    p.add_argument("--host", default="", help="only flows of this host")
    p.add_argument("--agent", default="", metavar="NAME", help="only this agent")
    p.add_argument("--verdict", metavar="allowed|denied", help="only this verdict")
    p.add_argument("--kind", metavar="KIND", help="only connect, sendmsg or flow_end records")
    p.add_argument("--since", metavar="WHEN",
                   help="only flows since then: a duration ago (30s, 10m, 2h) or RFC 3339")
    p.add_argument("--until", metavar="WHEN", help="only flows before then (same forms)")
    p.add_argument("--limit", type=int, default=100, metavar="N",
                   help="the newest N matching flows (default 100, at most 10000)")
    p.add_argument("--json", action="store_true",
                   help="one JSON record per line, in the schema of docs/flows.md")

    def flows(args: argparse.Namespace) -> int:
        from ztnet.controller import admin_client
        from ztnet.observe import query
        from ztnet.observe.commands import use_color
        from ztnet.v1 import admin_pb2

        if not 1 <= args.limit <= 10_000:
            p_flows.error("--limit: must be between 1 and 10000")
        try:
            request = admin_pb2.QueryFlowsRequest(
                host=args.host, agent=args.agent, limit=args.limit,
                verdict=query.parse_verdict(args.verdict).value if args.verdict else "",
                event_type=query.parse_kind(args.kind).value if args.kind else "",
                since_ns=max(0, query.parse_since(args.since)) if args.since else 0,
                until_ns=max(0, query.parse_since(args.until)) if args.until else 0)
        except ValueError as exc:
            p_flows.error(str(exc))
        return with_admin(args, admin_client.flows, request, as_json=args.json,
                          color=use_color(sys.stdout))

    p.set_defaults(handler=flows)

    def extend_policy(policy_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        p = _command(policy_sub, "apply", "Validate POLICY on the controller, store it as a "
                     "new version and push it to every connected host; prints which hosts "
                     "acknowledged or rejected it.", "ztnet policy apply examples/policy.toml "
                     "--controller ctl:7443 --credentials ~/.ztnet/admin")
        p.add_argument("policy", type=Path, metavar="POLICY", help="policy file (TOML)")
        operator_options(p)
        p.add_argument("--wait", type=duration, default=0, metavar="DURATION",
                       help="how long to wait for hosts (default: the controller's)")

        def apply(args: argparse.Namespace) -> int:
            from ztnet.controller import admin_client

            return with_admin(args, admin_client.policy_apply, args.policy,
                              wait=float(args.wait))

        p.set_defaults(handler=apply)

        p = _command(policy_sub, "show", "Print the controller's current policy (its version "
                     "on stderr).", "ztnet policy show --controller ctl:7443")
        operator_options(p)

        def show(args: argparse.Namespace) -> int:
            from ztnet.controller import admin_client

            return with_admin(args, admin_client.policy_show)

        p.set_defaults(handler=show)

    def agents_from_controller(args: argparse.Namespace) -> int:
        from ztnet.controller import admin_client

        return with_admin(args, admin_client.agents)

    class ControllerMode(argparse.Action):
        """`agents --controller [ADDR]`: the controller's view instead of the local one
        (without ADDR: $ZTNET_CONTROLLER). Switching the handler here keeps the local
        default untouched, whoever sets it and whenever."""

        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                     values: object, option_string: str | None = None) -> None:
            namespace.controller = values if isinstance(values, str) else None
            namespace.handler = agents_from_controller

    def extend_agents(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--controller", nargs="?", action=ControllerMode, metavar="ADDR",
                            help="list the controller's agents instead (mutual TLS; ADDR "
                            "defaults to $ZTNET_CONTROLLER)")
        parser.add_argument("--credentials", metavar="DIR", default=None,
                            help="admin credential directory (default: $ZTNET_CREDENTIALS)")

    def when_added(name: str, extend: Callable[[argparse.ArgumentParser], None]) -> None:
        """Call ``extend`` on the sub-command ``name`` once it exists."""
        if name in sub.choices:
            extend(sub.choices[name])
            return
        add_parser = sub.add_parser

        def add_and_extend(command: str, **kwargs: Any) -> argparse.ArgumentParser:
            parser: argparse.ArgumentParser = add_parser(command, **kwargs)
            if command == name:
                extend(parser)
            return parser

        setattr(sub, "add_parser", add_and_extend)  # noqa: B010  (an instance override)

    def when_grouped(parser: argparse.ArgumentParser) -> None:
        """Call extend_policy on ``parser``'s sub-command group once it exists."""
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                extend_policy(action)
                return
        add_subparsers = parser.add_subparsers

        def add_and_extend(**kwargs: Any) -> argparse._SubParsersAction:  # type: ignore[type-arg]
            group: argparse._SubParsersAction = add_subparsers(**kwargs)  # type: ignore[type-arg]
            extend_policy(group)
            return group

        setattr(parser, "add_subparsers", add_and_extend)  # noqa: B010  (an instance override)

    # `policy` and `agents` belong to functions build_parser calls after this one, so they
    # are extended when they are created (or at once, should the order change).
    when_added("policy", when_grouped)
    when_added("agents", extend_agents)


def add_node_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`ztnet enroll` (node side of the controller work)."""
    p = _command(sub, "enroll", "Enroll this host with a controller: generate the host key "
                 "here, pin the controller's CA by its fingerprint, exchange the one-time "
                 "token and a CSR for a host certificate and the grant-signing key.",
                 "ztnet enroll --controller ctl.example:7444 --token=TOKEN "
                 "--ca-fingerprint 3f5a… --state /var/lib/ztnet")
    p.add_argument("--controller", required=True, metavar="ADDR",
                   help="the controller's enrollment HOST:PORT (`serve --enroll-listen`)")
    p.add_argument("--token", required=True, help="one-time token (`controller token "
                   "create`); write --token=TOKEN if it starts with '-'")
    p.add_argument("--ca-fingerprint", required=True, metavar="SHA256",
                   help="hex SHA-256 of the controller's CA certificate (DER), printed with "
                   "the token; nothing is sent to a controller that does not match it")
    p.add_argument("--state", required=True, type=Path, metavar="DIR",
                   help="state directory for the credentials (created 0700)")
    p.add_argument("--host", default=None, help="this host's name (default: hostname)")

    def enroll(args: argparse.Namespace) -> int:
        from ztnet.daemon.enroll import enroll as run_enroll

        identity = run_enroll(args.controller, args.token, args.ca_fingerprint, args.state,
                              host=args.host)
        print(f"enrolled {identity.host} as {identity.spiffe_id}; credentials in {args.state}")
        print("next: ztnet daemon --controller HOST:PORT --state "
              f"{args.state}  (the controller's mutual-TLS --listen port, not the enrollment port)")
        return 0

    p.set_defaults(handler=enroll)


def add_daemon_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _command(sub, "daemon", "Enforce signed grant bundles on this host: verify, apply "
                 "atomically; follow the controller (after `ztnet enroll`), or a bundle file "
                 "reloaded on SIGHUP or when it changes.",
                 "ztnet daemon --controller ctl.example:7443 --state /var/lib/ztnet\n"
                 "  ztnet daemon --trust /etc/ztnet/signing.pub --bundle /etc/ztnet/bundle.json")
    _instance_option(p)
    p.add_argument("--controller", metavar="ADDR", help="controller HOST:PORT to subscribe to "
                   "(credentials, trust and host name come from the enrolled --state)")
    p.add_argument("--trust", action="append", type=Path, metavar="PUBKEY", default=[],
                   help="grant-signing public key to trust (repeat for key rotation; "
                   "needed without --controller)")
    p.add_argument("--bundle", type=Path, help="signed bundle file to enforce and watch")
    p.add_argument("--state", type=Path, default=None,
                   help="state directory (default /var/lib/ztnet[-INSTANCE])")
    p.add_argument("--host", default=None, help="this host's name (default: hostname); must "
                   "match the bundle's audience")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--resync", type=float, default=30.0, metavar="SECONDS",
                   help="period of the level-triggered re-install (default 30)")
    p.add_argument("--backoff-max", type=float, default=30.0, metavar="SECONDS",
                   help="longest wait between reconnects to the controller (default 30)")
    p.add_argument("--metrics", metavar="ADDR", default=None,
                   help="serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9464)")
    p.add_argument("--no-flows", action="store_true",
                   help="do not record flows (<state>/flows.jsonl) or the audit trail")
    p.add_argument("--spool-max", type=_spool_size, default="64M", metavar="SIZE",
                   help="controller mode: bound of <state>/spool, the flow records not yet "
                   "acknowledged by the controller; when full the oldest are dropped and "
                   "counted (default 64M)")
    p.set_defaults(handler=_cmd_daemon)


def _spool_size(text: str) -> int:
    from ztnet.daemon.spool import parse_size

    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size < 1 << 20:
        raise argparse.ArgumentTypeError(f"the spool needs at least 1M, not {text}")
    return size


def _cmd_daemon(args: argparse.Namespace) -> int:
    import socket

    from ztnet import logs
    from ztnet.daemon.service import Daemon, DaemonConfig

    logs.setup(args.log_format)
    suffix = f"-{args.instance}" if args.instance and args.instance != "default" else ""
    state = args.state or Path(f"/var/lib/ztnet{suffix}")
    if args.controller:
        from ztnet.daemon.credentials import controller_settings

        settings = controller_settings(state, host=args.host, bundle=args.bundle)
        config = DaemonConfig(trust=[settings.signing_key, *args.trust], bundle=None,
                              state=state, host=settings.host, instance=args.instance,
                              resync_seconds=args.resync, controller=args.controller,
                              trust_domain=settings.trust_domain,
                              backoff_cap=args.backoff_max, flows=not args.no_flows,
                              metrics_listen=args.metrics, spool_max_bytes=args.spool_max)
    else:
        config = DaemonConfig(trust=args.trust, bundle=args.bundle, state=state,
                              host=args.host or socket.gethostname(), instance=args.instance,
                              resync_seconds=args.resync, flows=not args.no_flows,
                              metrics_listen=args.metrics)
    return Daemon(config).run()


def add_observe_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`ztnet observe`, `ztnet audit verify`."""
    obs = _command(sub, "observe", "Show flows the local daemon recorded (like `hubble observe`): "
                 "the last 20, or all since --since; --follow streams new ones.",
                 "ztnet observe --agent research-bot --verdict denied --since 10m --follow")
    _instance_option(obs)
    obs.add_argument("--state", type=Path, default=None, metavar="DIR",
                   help="the daemon's state directory (default /var/lib/ztnet[-INSTANCE])")
    obs.add_argument("--file", type=Path, default=None, metavar="PATH",
                   help="flow log to read (default: DIR/flows.jsonl)")
    obs.add_argument("-f", "--follow", action="store_true", help="keep printing new flows")
    obs.add_argument("--agent", action="append", default=[], metavar="NAME",
                   help="only this agent (repeat for several)")
    obs.add_argument("--verdict", metavar="allowed|denied", help="only this verdict")
    obs.add_argument("--kind", action="append", default=[], metavar="KIND",
                   help="only connect, sendmsg or flow_end records (repeat for several)")
    obs.add_argument("--since", metavar="WHEN",
                   help="only flows since then: a duration ago (30s, 10m, 2h) or RFC 3339")
    obs.add_argument("--last", type=int, default=None, metavar="N",
                   help="history to show: the last N matching flows (default 20 without "
                   "--since, all with it; 0 = none)")
    obs.add_argument("--json", action="store_true",
                   help="one JSON record per line, in the schema of docs/flows.md")

    def observe(args: argparse.Namespace) -> int:
        from ztnet.observe import commands, query

        try:
            flt = query.FlowFilter(
                agents=frozenset(args.agent),
                verdict=query.parse_verdict(args.verdict) if args.verdict else None,
                since_ns=query.parse_since(args.since) if args.since else None,
                kinds=frozenset(query.parse_kind(kind) for kind in args.kind))
        except ValueError as exc:
            obs.error(str(exc))
        last = args.last if args.last is not None else (
            None if args.since else commands.DEFAULT_LAST)
        options = commands.ObserveOptions(
            path=commands.flows_path(file=args.file, state=args.state, instance=args.instance),
            filter=flt, follow=args.follow, json=args.json, last=last,
            color=commands.use_color(sys.stdout))
        return commands.observe(options, sys.stdout, sys.stderr)

    obs.set_defaults(handler=observe)

    p = _command(sub, "audit", "Work with the tamper-evident audit trail.",
                 "ztnet audit verify /var/lib/ztnet/audit.jsonl")
    audit = p.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    v = _command(audit, "verify", "Check FILE's hash chain and its head: prints OK and the "
                 "record count, or the first problem (edit, deletion, reordering, truncation) "
                 "with its line number and exits 1.",
                 "ztnet audit verify /var/lib/ztnet/audit.jsonl")
    v.add_argument("file", type=Path, metavar="FILE", help="audit log (audit.jsonl)")
    v.add_argument("--head", metavar="SEQ:HASH", help="check against this head recorded "
                   "elsewhere instead of FILE.head")

    def audit_verify(args: argparse.Namespace) -> int:
        from ztnet.observe.commands import audit_verify as run

        return run(args.file, sys.stdout, head=args.head)

    v.set_defaults(handler=audit_verify)


def add_lab_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`ztnet lab up|down|status` (docs/lab.md)."""
    lab = _command(sub, "lab", "A multi-host lab on this machine (root): network namespaces "
                   "on a bridge with a controller, agent hosts each running an enrolled "
                   "daemon, an internal API, an exfiltration sink and a DNS resolver.",
                   "sudo ztnet lab up --hosts 2")
    group = lab.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)

    def checked(make: Callable[[str], object]) -> Callable[[str], object]:
        def parse(text: str) -> object:
            try:
                return make(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        return parse

    def lab_name(text: str) -> str:
        from ztnet.lab.topology import Topology

        return Topology(text).name  # validates

    def host_count(text: str) -> int:
        from ztnet.lab.topology import Topology

        return Topology(agent_hosts=int(text)).agent_hosts

    def name_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--name", default="ztlab", type=checked(lab_name),
                            help="lab name: labs with different names coexist (default ztlab)")

    p = _command(group, "up", "Build the lab and start everything in it; returns once every "
                 "daemon enforces the lab policy. Idempotent.", "sudo ztnet lab up --hosts 3")
    name_option(p)
    p.add_argument("--hosts", type=checked(host_count), default=2, metavar="N",
                   help="number of agent hosts (1-8, default 2)")

    def up(args: argparse.Namespace) -> int:
        from ztnet.lab.commands import lab_up

        return lab_up(args.name, args.hosts)

    p.set_defaults(handler=up)

    d = _command(group, "down", "Remove everything the lab owns (processes, namespaces, "
                 "daemon instances, run directory), even after a crashed `lab up`.",
                 "sudo ztnet lab down")
    name_option(d)

    def down(args: argparse.Namespace) -> int:
        from ztnet.lab.commands import lab_down

        return lab_down(args.name)

    d.set_defaults(handler=down)

    s = _command(group, "status", "Show the lab's hosts, addresses, processes and "
                 "enforcement; exits 1 unless everything is up.", "sudo ztnet lab status")
    name_option(s)
    s.add_argument("--json", action="store_true", help="machine-readable")

    def status(args: argparse.Namespace) -> int:
        from ztnet.lab.commands import lab_status

        return lab_status(args.name, as_json=args.json)

    s.set_defaults(handler=status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ztnet",
        description="Zero-trust egress for AI agents: network paths exist only while a "
        "signed, expiring grant allows them, enforced in the kernel with eBPF.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_daemon_commands(sub)
    add_controller_commands(sub)
    add_node_commands(sub)
    add_datapath_commands(sub)
    add_keys_commands(sub)
    add_policy_commands(sub)
    add_observe_commands(sub)
    add_lab_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ZtnetError as exc:
        print(f"ztnet: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
