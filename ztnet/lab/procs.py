"""Long-lived lab processes: started inside a namespace, detached, logged to a file.

The lab's controller, daemons and services must outlive `ztnet lab up`, so unlike
:class:`ztnet.lab.servers.NetnsProcess` (a pipe and a reader thread in the parent) they run in
their own session with stdout and stderr in a log file, and readiness is read from that log
(a ``READY`` line, a daemon's ``bundle applied`` JSON event …). Each one is recorded as a
:class:`ProcRecord` whose ``start_time`` (from /proc/PID/stat) tells a reused pid from ours, so
`lab down` never signals a stranger.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from ztnet.errors import LabError
from ztnet.lab.netns import nsenter_argv, poll_until

ROOT = Path(__file__).resolve().parents[2]
_LOG_TAIL = 2000  # characters of a log quoted in an error

# Popen objects of the processes this process started, so stopping one also reaps it (a
# killed child would otherwise stay a zombie until we exit, and look alive in /proc).
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True, slots=True)
class ProcRecord:
    name: str  # "controller", "daemon host-a", "api" …
    pid: int
    start_time: int  # field 22 of /proc/PID/stat: ticks since boot
    netns: str
    log: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ProcRecord:
        return cls(str(obj["name"]), int(obj["pid"]), int(obj["start_time"]), str(obj["netns"]),
                   str(obj["log"]))


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of ``pid``, None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after its closing one
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def alive(record: ProcRecord) -> bool:
    stat = _stat(record.pid)
    return stat is not None and stat[0] != "Z" and stat[1] == record.start_time


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of lab processes: ztnet importable from any cwd, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    env.pop("NOTIFY_SOCKET", None)  # never let a lab daemon notify whoever started us
    env.update(extra or {})
    return env


def ztnet_argv(*args: str) -> list[str]:
    """``ztnet ARGS`` with this interpreter, so the checkout under test is what runs."""
    return [sys.executable, "-m", "ztnet.cli", *args]


def spawn(name: str, netns: str, argv: Sequence[str], log: Path,
          env: Mapping[str, str] | None = None) -> ProcRecord:
    """Start ``argv`` inside ``netns``, detached, output appended to ``log``."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(nsenter_argv(netns, argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=child_env(env), cwd="/",
                                start_new_session=True)
    _children[proc.pid] = proc
    # nsenter execs the command, so its pid is the process's; read the start time at once
    stat = _stat(proc.pid)
    return ProcRecord(name, proc.pid, stat[1] if stat else 0, netns, str(log))


def log_text(record: ProcRecord) -> str:
    try:
        return Path(record.log).read_text(errors="replace")
    except OSError:
        return ""


def _tail(record: ProcRecord) -> str:
    text = log_text(record).strip()
    return text[-_LOG_TAIL:] if text else "(no output)"


def wait_log(record: ProcRecord, match: Callable[[str], bool], timeout: float,
             what: str) -> str:
    """The first line of ``record``'s log that ``match``es; LabError with the log's tail if
    the process exits first or ``timeout`` passes (readiness is awaited, never slept)."""

    def check() -> str | None:
        for line in log_text(record).splitlines():
            if match(line):
                return line
        if not alive(record):
            raise LabError(f"lab: {record.name} exited before {what}:\n{_tail(record)}")
        return None

    try:
        return poll_until(check, timeout, f"{record.name}: {what}")
    except LabError as exc:
        if "timed out" in str(exc):
            raise LabError(f"{exc}\n{_tail(record)}") from None
        raise


def json_event(name: str, **fields: object) -> Callable[[str], bool]:
    """A :func:`wait_log` matcher for a JSON log line (``--log-format json``)."""

    def match(line: str) -> bool:
        if not line.startswith("{"):
            return False
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return False
        return bool(obj.get("event") == name and all(obj.get(k) == v for k, v in fields.items()))

    return match


def stop(records: Sequence[ProcRecord], timeout: float = 5.0) -> None:
    """SIGTERM every live record (so logs are flushed and sockets closed), SIGKILL what is
    left after ``timeout``, and reap our own children."""
    live = [r for r in records if alive(r)]
    for record in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for record in live:
        proc = _children.get(record.pid)
        if proc is not None:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            continue
        _wait_gone(record, deadline)
        if alive(record):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
    for record in records:
        proc = _children.pop(record.pid, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_gone(record: ProcRecord, deadline: float) -> None:
    def gone() -> bool | None:
        return None if alive(record) else True

    with contextlib.suppress(LabError):
        poll_until(gone, max(0.0, deadline - time.monotonic()), f"{record.name} to exit")


def run(argv: Sequence[str], *, netns: str | None = None, timeout: float = 60.0,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short command (in ``netns``) to completion; the caller checks the outcome."""
    full = nsenter_argv(netns, argv) if netns else list(argv)
    return subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=child_env(), check=False)


def run_ok(argv: Sequence[str], what: str, **options: Any) -> str:
    """:func:`run`, raising LabError with the command's stderr unless it exits 0."""
    done = run(argv, **options)
    if done.returncode != 0:
        raise LabError(f"lab: {what} failed (exit {done.returncode}): "
                       f"{(done.stderr or done.stdout).strip()}")
    return done.stdout


class Terminated(Exception):
    """SIGTERM or SIGINT arrived in a lab child process (a server, the DNS responder)."""


@contextlib.contextmanager
def selector_until_terminated() -> Iterator[selectors.BaseSelector]:
    """The selector of a lab child's serve loop: SIGTERM and SIGINT raise
    :class:`Terminated` in the main thread, which ends the loop quietly, and every socket
    registered with the selector is closed on the way out."""

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    sel = selectors.DefaultSelector()
    try:
        yield sel
    except Terminated:
        pass
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
