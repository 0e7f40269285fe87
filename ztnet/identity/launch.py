"""`ztnet run`: put the caller in an agent cgroup, check enforcement, drop
privileges and exec the agent. The order matters: join first, then check
that programs are attached, so nothing can run between the check and the
confinement; the process that execs is already confined."""

from __future__ import annotations

import ctypes
import os
import pwd
from collections.abc import Callable, Sequence

from ztnet.errors import IdentityError, NotAttached
from ztnet.identity import cgroups
from ztnet.instance import Instance

PR_SET_NO_NEW_PRIVS = 38


def set_no_new_privs() -> None:
    """No setuid binary or file capability can give the agent privileges back
    (a setcap'd ping would otherwise bring CAP_NET_RAW)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise IdentityError(f"identity: prctl(NO_NEW_PRIVS) failed: "
                            f"{os.strerror(ctypes.get_errno())}")


def drop_to_user(user: str) -> None:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise IdentityError(f"identity: no such user {user!r}") from None
    os.initgroups(entry.pw_name, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.getuid() != entry.pw_uid or os.geteuid() != entry.pw_uid:
        raise IdentityError(f"identity: could not become {user}")
    os.environ.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)


def run_agent(
    instance: Instance,
    agent: str,
    argv: Sequence[str],
    *,
    user: str | None,
    is_enforcing: Callable[[Instance], bool],
) -> None:
    """Never returns: execs ``argv`` confined as ``agent``, or raises."""
    if not argv:
        raise IdentityError("identity: no command given (ztnet run --agent NAME -- CMD …)")
    if os.geteuid() != 0:
        raise IdentityError("identity: `ztnet run` must start as root to join the agent cgroup "
                            "(use --user to run the agent itself unprivileged)")
    path = cgroups.ensure_agent_cgroup(instance, agent)
    cgroups.join(path)
    if not is_enforcing(instance):
        raise NotAttached(
            f"datapath: no ztnet programs are attached at {instance.cgroup_root}; refusing "
            f"to start agent {agent!r} unconfined (start `ztnet daemon` first)"
        )
    if user is not None:
        drop_to_user(user)
    set_no_new_privs()
    try:
        os.execvp(argv[0], list(argv))
    except OSError as exc:
        raise IdentityError(f"identity: cannot execute {argv[0]!r}: {exc.strerror}") from exc
