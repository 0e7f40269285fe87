"""Agent cgroups: an agent *is* membership of <root>/agents/<name>.

Children inherit the cgroup across fork, setsid and daemonizing, and an
unprivileged process cannot write to the root-owned cgroup files, so it
cannot leave. The cgroup id (the directory's inode number on cgroup v2) is
what the BPF programs see.
"""

from __future__ import annotations

import errno
import os
import select
import time
from dataclasses import dataclass
from pathlib import Path

from ztnet.errors import IdentityError
from ztnet.grants.model import AGENT_NAME_RE
from ztnet.instance import Instance


def check_agent_name(name: str) -> str:
    if not AGENT_NAME_RE.match(name):
        raise IdentityError(
            f"identity: agent name {name!r} is not a DNS label "
            "(lower-case letters, digits and '-', at most 63 characters)"
        )
    return name


def ensure_agent_cgroup(instance: Instance, agent: str) -> Path:
    path = instance.agent_cgroup(check_agent_name(agent))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdentityError(f"identity: cannot create cgroup {path}: {exc.strerror}") from exc
    return path


def cgroup_id(path: Path) -> int:
    return os.stat(path).st_ino


def agent_cgroups(instance: Instance) -> dict[str, Path]:
    if not instance.agents_dir.is_dir():
        return {}
    return {entry.name: entry for entry in sorted(instance.agents_dir.iterdir())
            if entry.is_dir() and AGENT_NAME_RE.match(entry.name)}


def _subtree(path: Path) -> list[Path]:
    """path and every cgroup below it, deepest first."""
    found = [Path(dirpath) for dirpath, _dirs, _files in os.walk(path)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def pids(path: Path) -> list[int]:
    """Live processes in the cgroup and below it."""
    result: list[int] = []
    for cgroup in _subtree(path) if path.is_dir() else []:
        try:
            text = (cgroup / "cgroup.procs").read_text()
        except FileNotFoundError:
            continue
        result.extend(int(line) for line in text.split())
    return sorted(result)


def join(path: Path, pid: int = 0) -> None:
    """Move ``pid`` (0: the caller) into the cgroup."""
    try:
        (path / "cgroup.procs").write_text(f"{pid or os.getpid()}\n")
    except OSError as exc:
        raise IdentityError(f"identity: cannot join {path}: {exc.strerror}") from exc


def set_frozen(path: Path, frozen: bool) -> None:
    """Freeze (or thaw) every process of the cgroup and below (``cgroup.freeze``): a
    frozen process runs no code until thawed, and it cannot undo this itself."""
    try:
        (path / "cgroup.freeze").write_text("1\n" if frozen else "0\n")
    except OSError as exc:
        raise IdentityError(f"identity: cannot {'freeze' if frozen else 'thaw'} {path}: "
                            f"{exc.strerror}") from exc


def is_frozen(path: Path) -> bool:
    try:
        return (path / "cgroup.freeze").read_text().strip() == "1"
    except OSError:
        return False


def kill_all(path: Path, timeout: float = 10.0) -> None:
    """SIGKILL every process in the subtree (cgroup.kill) and wait until it is
    empty, so a torn-down agent never runs unconfined."""
    if not path.is_dir():
        return
    kill_file = path / "cgroup.kill"
    if kill_file.exists():
        kill_file.write_text("1\n")
    else:  # kernels before 5.14
        for pid in pids(path):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    if not wait_unpopulated(path, timeout):
        raise IdentityError(f"identity: processes in {path} survived SIGKILL")


def wait_unpopulated(path: Path, timeout: float) -> bool:
    """Wait until no process is left in the subtree: cgroup.events signals
    each change of its ``populated`` line with POLLPRI."""
    deadline = time.monotonic() + timeout
    events = path / "cgroup.events"
    with open(events, "rb", buffering=0) as handle:
        poller = select.poll()
        poller.register(handle, select.POLLPRI | select.POLLERR)
        while True:
            handle.seek(0)
            if b"populated 0" in handle.read():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(remaining * 1000)


def remove_tree(path: Path) -> None:
    for cgroup in _subtree(path) if path.is_dir() else []:
        try:
            cgroup.rmdir()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise IdentityError(f"identity: cannot remove {cgroup}: {exc.strerror}") from exc


@dataclass(frozen=True, slots=True)
class AgentProcess:
    pid: int
    comm: str


def agent_processes(path: Path) -> list[AgentProcess]:
    result = []
    for pid in pids(path):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        result.append(AgentProcess(pid, comm))
    return result
