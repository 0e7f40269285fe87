"""One uid per agent: who an agent runs as, and proof that no one else runs as it.

Two processes with the same uid can ptrace each other and open each other's
``/proc/PID/mem``; no cgroup boundary stops that. So before `ztnet run` becomes a
uid it checks, under a host-wide lock, that no process outside this agent's cgroup
holds that uid (real, effective, saved or filesystem), and it keeps the lock until it
has itself become the uid inside the cgroup, so a concurrent `ztnet run` of another
agent sees it and refuses.

Dynamic users (``--dynamic-user``, like systemd's DynamicUser=) need no account: each
(instance, agent) gets a uid of its own from :data:`DYNAMIC_BASE` …, never one in the
password or group database or held by a process, recorded in :data:`ALLOCATIONS` (one
file per uid, created exclusively) and released by ``ztnet teardown``.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ztnet import fsutil
from ztnet.errors import IdentityError
from ztnet.instance import Instance

# Far above the system (< 1000), login (1000-60000), systemd-dynamic (61184-65519) and
# usual subordinate (/etc/subuid, from 100000 in blocks of 65536) ranges, below 2^31 for
# software that keeps uids in a signed int.
DYNAMIC_BASE = 0x60000000
DYNAMIC_SIZE = 0x10000
ALLOCATIONS = Path("/run/ztnet-uids")
LOCK = ALLOCATIONS / ".lock"


@dataclass(frozen=True, slots=True)
class AgentUser:
    """Whom the agent runs as."""

    uid: int
    gid: int
    name: str
    home: str
    dynamic: bool = False

    @property
    def is_root(self) -> bool:
        return self.uid == 0 or self.gid == 0


def static_user(name: str) -> AgentUser:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise IdentityError(f"identity: no such user {name!r}") from None
    return AgentUser(entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir)


def root_user() -> AgentUser:
    return AgentUser(0, 0, "root", pwd.getpwuid(0).pw_dir)


@contextmanager
def launch_lock() -> Iterator[None]:
    """Host-wide: held from the uid check until the caller has become the uid."""
    ALLOCATIONS.mkdir(mode=0o755, exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _owner(instance: Instance, agent: str) -> str:
    return f"{instance.name}/{agent}\n"


def _allocations() -> dict[int, str]:
    found: dict[int, str] = {}
    if not ALLOCATIONS.is_dir():
        return found
    for entry in ALLOCATIONS.iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = entry.read_text()
            except OSError:
                continue
    return found


def _known_to_system(uid: int) -> bool:
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def dynamic_user(instance: Instance, agent: str) -> AgentUser:
    """The agent's uid, allocated on first use. Call under :func:`launch_lock`."""
    owner = _owner(instance, agent)
    taken = _allocations()
    name = f"ztnet-{agent}"[:32]
    for uid, holder in taken.items():
        if holder == owner:
            return AgentUser(uid, uid, name, "/", dynamic=True)
    held = set(processes_by_uid())
    start = zlib.crc32(owner.encode()) % DYNAMIC_SIZE
    for step in range(DYNAMIC_SIZE):
        uid = DYNAMIC_BASE + (start + step) % DYNAMIC_SIZE
        if uid in taken or uid in held or _known_to_system(uid):
            continue
        try:
            fsutil.create_new(ALLOCATIONS / str(uid), owner.encode(), 0o644)
        except FileExistsError:
            continue
        except OSError as exc:
            raise IdentityError(f"identity: cannot record uid {uid} for agent {agent!r} "
                                f"in {ALLOCATIONS}: {exc.strerror}") from exc
        return AgentUser(uid, uid, name, "/", dynamic=True)
    raise IdentityError(f"identity: no free dynamic uid left in {DYNAMIC_BASE}-"
                        f"{DYNAMIC_BASE + DYNAMIC_SIZE - 1}")


def release_instance(instance: Instance) -> list[int]:
    """Forget the dynamic uids of the instance's agents (after they were killed)."""
    prefix = f"{instance.name}/"
    released = []
    with launch_lock():
        for uid, holder in _allocations().items():
            if holder.startswith(prefix):
                (ALLOCATIONS / str(uid)).unlink(missing_ok=True)
                released.append(uid)
    return sorted(released)


def _status_uids(pid: str) -> set[int]:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("Uid:"):
                return {int(field) for field in line.split()[1:]}
    return set()


def _cgroup_path(pid: str) -> str:
    with open(f"/proc/{pid}/cgroup") as handle:
        for line in handle:
            if line.startswith("0::"):
                return line[3:].strip()
    return ""


def processes_by_uid() -> dict[int, list[tuple[int, str]]]:
    """uid -> [(pid, cgroup v2 path)] over every live process, by any of its four uids."""
    result: dict[int, list[tuple[int, str]]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            uids = _status_uids(pid)
            cgroup = _cgroup_path(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        for uid in uids:
            result.setdefault(uid, []).append((int(pid), cgroup))
    return result


def check_exclusive(user: AgentUser, instance: Instance, agent: str) -> None:
    """Refuse a uid that any process outside the agent's cgroup (and its children) holds.
    Call under :func:`launch_lock`."""
    own = "/" + str(instance.agent_cgroup(agent).relative_to(instance.cgroup_mount))
    strangers = [(pid, cgroup) for pid, cgroup in processes_by_uid().get(user.uid, [])
                 if cgroup != own and not cgroup.startswith(own + "/")]
    if strangers:
        pid, cgroup = strangers[0]
        raise IdentityError(
            f"identity: uid {user.uid} ({user.name}) is already used by {len(strangers)} "
            f"process(es) outside agent {agent!r} (pid {pid} in cgroup {cgroup!r}); agents "
            "sharing a uid can ptrace each other and read each other's memory: give each "
            "agent a user of its own (--user) or use --dynamic-user")
