"""`ztnet run`: start a command as an agent, confined by the datapath.

What the agent gets, in order (docs/agents.md, docs/threat-model.md):

1. Nothing of the operator's session: a new session, and a pseudo-terminal of its own when
   the caller is on a terminal (``identity.terminal``), so TIOCSTI cannot type into the
   operator's shell.
2. Its cgroup, joined first; then the check that the programs are attached, so nothing
   runs between the check and the confinement: the process that execs is already confined.
3. A uid no process outside its cgroup holds (``identity.uids``), never root unless the
   operator says ``--allow-root``: a root agent can write ``cgroup.procs`` and leave, detach
   the programs, open AF_PACKET sockets.
4. no_new_privs, so no setuid binary or file capability gives privileges back.
5. No descriptor of the caller's above 2 (a socket created outside the agent's cgroup is
   judged as its creator's, i.e. not at all), and a minimal environment
   (``identity.environment``).
6. The system-call filter (``identity.seccomp``), last, then exec.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from ztnet.errors import IdentityError, NotAttached
from ztnet.identity import cgroups, environment, seccomp, terminal, uids
from ztnet.identity.uids import AgentUser
from ztnet.instance import Instance

PR_SET_NO_NEW_PRIVS = 38
ROOT_REFUSED = (
    "identity: refusing to run agent {agent!r} as root (uid 0 or gid 0): a root agent can "
    "leave its cgroup (write another cgroup.procs), detach the programs and open AF_PACKET "
    "sockets, so nothing confines it; give --user NAME or --dynamic-user, or --allow-root "
    "to run it unconfined knowingly")


DYNAMIC_USER = "dynamic"
"""For callers that build `ztnet run` command lines (the lab, tests): a uid of the agent's
own (``--dynamic-user``)."""


def run_user_flags(user: str | None) -> list[str]:
    """`ztnet run` flags for ``user``: None is root (``--allow-root``: not confined),
    :data:`DYNAMIC_USER` a dynamic uid, anything else ``--user NAME``."""
    if user is None:
        return ["--allow-root"]
    if user == DYNAMIC_USER:
        return ["--dynamic-user"]
    return ["--user", user]


def set_no_new_privs() -> None:
    """No setuid binary or file capability can give the agent privileges back
    (a setcap'd ping would otherwise bring CAP_NET_RAW)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise IdentityError(f"identity: prctl(NO_NEW_PRIVS) failed: "
                            f"{os.strerror(ctypes.get_errno())}")


def become(user: AgentUser) -> None:
    if user.dynamic:
        os.setgroups([])
    elif user.uid != 0:
        os.initgroups(user.name, user.gid)
    os.setgid(user.gid)
    os.setuid(user.uid)
    if os.getuid() != user.uid or os.geteuid() != user.uid:
        raise IdentityError(f"identity: could not become {user.name} (uid {user.uid})")


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """Everything decided before anything changes; :func:`confine_and_exec` carries it out."""

    instance: Instance
    agent: str
    argv: tuple[str, ...]
    user_name: str | None
    dynamic_user: bool
    allow_root: bool
    env_names: tuple[str, ...]
    caller_env: Mapping[str, str]


def resolve_user(plan: LaunchPlan) -> AgentUser:
    """Call under uids.launch_lock (a dynamic uid is allocated here)."""
    if plan.dynamic_user:
        return uids.dynamic_user(plan.instance, plan.agent)
    return uids.static_user(plan.user_name) if plan.user_name else uids.root_user()


def confine_and_exec(plan: LaunchPlan, is_enforcing: Callable[[Instance], bool],
                     on_terminal: bool) -> NoReturn:
    with uids.launch_lock():
        user = resolve_user(plan)
        if user.is_root and not plan.allow_root:
            raise IdentityError(ROOT_REFUSED.format(agent=plan.agent))
        if not user.is_root:
            uids.check_exclusive(user, plan.instance, plan.agent)
        env = environment.agent_environment(user, plan.agent, plan.env_names, plan.caller_env,
                                            on_terminal=on_terminal)
        path = cgroups.ensure_agent_cgroup(plan.instance, plan.agent)
        cgroups.join(path)
        if not is_enforcing(plan.instance):
            raise NotAttached(
                f"datapath: no ztnet programs are attached at {plan.instance.cgroup_root}; "
                f"refusing to start agent {plan.agent!r} unconfined (start `ztnet daemon` first)"
            )
        become(user)
    # From here on the agent's uid is visible inside its cgroup: the lock can go.
    set_no_new_privs()
    terminal.flush_stdio()
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    seccomp.install()
    try:
        os.execvpe(plan.argv[0], list(plan.argv), env)
    except OSError as exc:
        raise IdentityError(f"identity: cannot execute {plan.argv[0]!r}: {exc.strerror}") from exc


def run_agent(
    instance: Instance,
    agent: str,
    argv: Sequence[str],
    *,
    user: str | None,
    is_enforcing: Callable[[Instance], bool],
    dynamic_user: bool = False,
    allow_root: bool = False,
    env_names: Sequence[str] = (),
    caller_env: Mapping[str, str] | None = None,
) -> int:
    """Exec ``argv`` confined as ``agent`` (never returns), or, when `ztnet run` has to
    stay to keep the agent off the caller's terminal or session, return its exit code."""
    if not argv:
        raise IdentityError("identity: no command given (ztnet run --agent NAME -- CMD …)")
    if user is not None and dynamic_user:
        raise IdentityError("identity: --user and --dynamic-user exclude each other")
    if os.geteuid() != 0:
        raise IdentityError("identity: `ztnet run` must start as root to join the agent cgroup "
                            "(use --user or --dynamic-user to run the agent itself unprivileged)")
    cgroups.check_agent_name(agent)
    source = dict(os.environ if caller_env is None else caller_env)
    plan = LaunchPlan(instance, agent, tuple(argv), user, dynamic_user, allow_root,
                      tuple(environment.check_env_names(env_names, source)), source)
    if user is not None:
        uids.static_user(user)  # an unknown user is refused before anything changes
    if terminal.terminal_fds():
        return terminal.relay(lambda: confine_and_exec(plan, is_enforcing, True))
    try:
        os.setsid()
    except PermissionError:  # a process-group leader (a shell job) cannot: fork first
        return terminal.supervise(lambda: confine_and_exec(plan, is_enforcing, False))
    confine_and_exec(plan, is_enforcing, False)
