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

    p = _command(sub, "demo", "A self-contained enforcement showcase in network namespaces "
                 "(root); exits non-zero if anything misbehaves.", "sudo ztnet demo")
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
    from ztnet.lab.showcase import run_showcase

    return run_showcase()


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
    """`ztnet controller init|serve|token create|admin-cert`, `policy apply` is added to the
    policy group by add_policy_commands' owner; `hosts`, `revoke` (controller work)."""


def add_node_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`ztnet enroll` (node side of the controller work)."""


def add_daemon_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _command(sub, "daemon", "Enforce signed grant bundles on this host: verify, apply "
                 "atomically, reload on SIGHUP or when the bundle file changes.",
                 "ztnet daemon --trust /etc/ztnet/signing.pub --bundle /etc/ztnet/bundle.json")
    _instance_option(p)
    p.add_argument("--trust", action="append", required=True, type=Path, metavar="PUBKEY",
                   help="grant-signing public key to trust (repeat for key rotation)")
    p.add_argument("--bundle", type=Path, help="signed bundle file to enforce and watch")
    p.add_argument("--state", type=Path, default=None,
                   help="state directory (default /var/lib/ztnet[-INSTANCE])")
    p.add_argument("--host", default=None, help="this host's name (default: hostname); must "
                   "match the bundle's audience")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--resync", type=float, default=30.0, metavar="SECONDS",
                   help="period of the level-triggered re-install (default 30)")
    p.set_defaults(handler=_cmd_daemon)


def _cmd_daemon(args: argparse.Namespace) -> int:
    import socket

    from ztnet.daemon import logs
    from ztnet.daemon.service import Daemon, DaemonConfig

    logs.setup(args.log_format)
    suffix = f"-{args.instance}" if args.instance and args.instance != "default" else ""
    config = DaemonConfig(trust=args.trust, bundle=args.bundle,
                          state=args.state or Path(f"/var/lib/ztnet{suffix}"),
                          host=args.host or socket.gethostname(), instance=args.instance,
                          resync_seconds=args.resync)
    return Daemon(config).run()


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
