"""The local datapath: `ztnet run` (an agent, confined), `ztnet agents`, `ztnet status`
and `ztnet teardown`.

`ztnet agents --controller [ADDR]` shows the controller's view instead of the local one
(ztnet.cli.operator). The functions below the handlers print to ``out`` (default: stdout
at call time).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from ztnet.cli import operator
from ztnet.cli.args import SubParsers, add_command, instance_option
from ztnet.instance import Instance
from ztnet.text import format_table


def register(sub: SubParsers) -> None:
    p = add_command(sub, "run", "Run a command as an agent, confined by the datapath.",
                    "ztnet run --agent research-bot --dynamic-user -- curl https://10.0.2.7/",
                    handle_run)
    instance_option(p)
    p.add_argument("--agent", required=True, help="agent name (a DNS label)")
    p.add_argument("--user", help="drop to this user (and its groups) after joining the "
                   "cgroup; refused if a process outside this agent holds its uid")
    p.add_argument("--dynamic-user", action="store_true",
                   help="run as a uid of the agent's own, allocated on first use (no account)")
    p.add_argument("--allow-root", action="store_true",
                   help="allow the agent to run as root: it is then NOT confined (it can "
                   "leave its cgroup)")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="pass this variable of the caller's environment to the agent "
                   "(repeatable; by default the agent gets only the documented minimal set)")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS…]")

    p = add_command(sub, "agents", "List agents: cgroup, live processes, live grants.",
                    "ztnet agents --instance host-a", handle_agents)
    p.add_argument("--controller", nargs="?", const="", default=None, metavar="ADDR",
                   help="list the controller's agents instead (mutual TLS; ADDR defaults to "
                   "$ZTNET_CONTROLLER)")
    p.add_argument("--credentials", metavar="DIR", default=None,
                   help="admin credential directory (default: $ZTNET_CREDENTIALS)")
    instance_option(p)

    p = add_command(sub, "status", "Show whether enforcement is in place, and its counters.",
                    "ztnet status", handle_status)
    instance_option(p)

    p = add_command(sub, "teardown", "Remove ztnet from the kernel: kill agents, detach "
                    "programs, unpin maps, remove cgroups.", "ztnet teardown --yes",
                    handle_teardown)
    instance_option(p)
    p.add_argument("--yes", action="store_true", help="really remove enforcement")


# --- handlers: the parsed command line -> the functions below ------------------------


def handle_run(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return run(Instance.resolve(args.instance), args.agent, argv, user=args.user,
               dynamic_user=args.dynamic_user, allow_root=args.allow_root, env_names=args.env)


def handle_agents(args: argparse.Namespace) -> int:
    if args.controller is None:  # no --controller: this host's datapath
        return agents(Instance.resolve(args.instance))
    # `--controller` alone ("") means $ZTNET_CONTROLLER
    return operator.with_admin(args.controller or None, args.credentials, operator.agents)


def handle_status(args: argparse.Namespace) -> int:
    return status(Instance.resolve(args.instance))


def handle_teardown(args: argparse.Namespace) -> int:
    return teardown(Instance.resolve(args.instance), confirmed=args.yes)


# --- what the commands do ------------------------------------------------------------


def run(instance: Instance, agent: str, argv: Sequence[str], *, user: str | None = None,
        dynamic_user: bool = False, allow_root: bool = False,
        env_names: Sequence[str] = ()) -> int:
    """Exec ``argv`` as ``agent`` (docs/agents.md); returns only when `ztnet run` has to
    stay (the agent's pty relay or a shell job) with the agent's exit code, or fails with
    a ZtnetError."""
    from ztnet.datapath.loader import is_enforcing
    from ztnet.identity.launch import run_agent

    return run_agent(instance, agent, argv, user=user, is_enforcing=is_enforcing,
                     dynamic_user=dynamic_user, allow_root=allow_root, env_names=env_names)


def agents(instance: Instance, *, out: TextIO | None = None) -> int:
    from ztnet.datapath.datapath import Datapath
    from ztnet.identity import cgroups

    with Datapath.inspect(instance) as datapath:
        live = datapath.live_grant_counts()
        audited = datapath.audited()
    rows = []
    for name, path in cgroups.agent_cgroups(instance).items():
        procs = cgroups.agent_processes(path)
        pids = ",".join(f"{p.pid}({p.comm})" for p in procs) or "-"
        mode = "audit" if name in audited else "enforce"
        rows.append((name, str(path), pids, str(live.get(name, 0)), mode))
    print(format_table(("AGENT", "CGROUP", "PIDS", "LIVE GRANTS", "MODE"), rows),
          file=_out(out))
    return 0


def status(instance: Instance, *, out: TextIO | None = None) -> int:
    """Exit 0 when the instance enforces, 1 when it does not."""
    from ztnet.datapath.datapath import Datapath
    from ztnet.datapath.loader import attached_counts, is_enforcing

    out = _out(out)
    enforcing = is_enforcing(instance)
    print(f"instance:   {instance.name}", file=out)
    print(f"cgroup:     {instance.cgroup_root}", file=out)
    print(f"pins:       {instance.pin_dir}", file=out)
    print(f"enforcing:  {'yes' if enforcing else 'NO'}", file=out)
    for program, count in attached_counts(instance).items():
        print(f"  {program:<12} {count} attached", file=out)
    if enforcing:
        with Datapath.inspect(instance) as datapath:
            print(f"generation: {datapath.generation}", file=out)
            print(f"grants:     {sum(datapath.live_grant_counts().values())}", file=out)
            for name, value in datapath.counters().items():
                print(f"  {name:<14} {value}", file=out)
    return 0 if enforcing else 1


def teardown(instance: Instance, *, confirmed: bool, out: TextIO | None = None) -> int:
    """Remove the instance from the kernel; without ``confirmed`` only say what it would do
    (exit 1)."""
    from ztnet.datapath.datapath import teardown as remove

    if not confirmed:
        print(f"this kills every agent under {instance.cgroup_root} and removes enforcement; "
              "run again with --yes", file=sys.stderr)
        return 1
    remove(instance)
    print(f"removed instance {instance.name}", file=_out(out))
    return 0


def _out(out: TextIO | None) -> TextIO:
    return out if out is not None else sys.stdout
