"""What the daemon knows that the kernel does not: agent names, the trust
domain, grant metadata, executable paths. ``records.from_event`` reads it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class GrantInfo:
    """What the daemon knows about an installed grant beyond its id."""

    policy_version: int
    key_id: str


def grant_infos(grant_ids: Iterable[int], policy_version: int, key_id: str) -> dict[int, GrantInfo]:
    """``{id: GrantInfo}`` for the grants of one verified bundle."""
    info = GrantInfo(policy_version, key_id)
    return {int(grant_id): info for grant_id in grant_ids}


def proc_exe(tgid: int) -> str:
    """``/proc/<tgid>/exe``, or "" when the process is gone or unreadable."""
    try:
        return os.readlink(f"/proc/{tgid}/exe")
    except OSError:
        return ""


class CachedExe:
    """An exe resolver that remembers the last path seen per process, so a
    flow_end of a process that has exited still names its executable.

    ``cached(tgid, comm, now)`` also spares the readlink for a process seen less than
    ``ttl`` seconds ago under the same ``comm`` (the daemon's path: at tens of thousands of
    records a second the syscall per record is a good part of the cost). An execve changes
    the comm in the usual case (to the new program's name), which then resolves at once;
    an exec that keeps the comm is seen within ``ttl``."""

    def __init__(self, resolve: Callable[[int], str] = proc_exe, size: int = 4096,
                 ttl: float = 1.0) -> None:
        self._resolve = resolve
        self._size = size
        self._ttl = ttl
        self._cache: dict[int, str] = {}
        self._fresh: dict[int, tuple[str, float, str]] = {}  # tgid -> (comm, until, exe)

    def cached(self, tgid: int, comm: str, now: float) -> str:
        entry = self._fresh.get(tgid)
        if entry is not None and entry[0] == comm and now < entry[1]:
            return entry[2]
        exe = self(tgid)
        if len(self._fresh) >= self._size:
            self._fresh.clear()  # cheap bound: it refills within one ttl
        self._fresh[tgid] = (comm, now + self._ttl, exe)
        return exe

    def __call__(self, tgid: int) -> str:
        exe = self._resolve(tgid)
        if not exe:
            return self._cache.get(tgid, "")
        self._cache.pop(tgid, None)
        self._cache[tgid] = exe
        if len(self._cache) > self._size:  # dicts keep insertion order: drop the oldest
            del self._cache[next(iter(self._cache))]
        return exe


@dataclass(frozen=True, slots=True)
class RecordContext:
    """What ``from_event`` adds to a kernel event. Build a new one (with
    ``dataclasses.replace``) when agents or grants change; keep names of
    removed agents a while, their flow_end records may still arrive."""

    host: str
    trust_domain: str
    agent_names: Mapping[int, str] = field(default_factory=dict)
    grants: Mapping[int, GrantInfo] = field(default_factory=dict)
    exe: Callable[[int], str] = proc_exe
