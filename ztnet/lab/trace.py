"""Live flow traces of several lab hosts at once, printed like `ztnet observe --follow`.

One thread per agent host follows its daemon's ``flows.jsonl`` with
:class:`ztnet.observe.query.FlowReader` (inotify, survives rotation) and queues the records.
The caller prints them from its own thread (:meth:`LiveTrace.wait` prints every record as it
arrives while waiting for the one a step expects), so trace rows and the story's own lines
never interleave mid-line. Rows reuse :func:`ztnet.observe.render.cells` (escaped) with a host
column and a shorter clock; a record that touches the cloud metadata service gets an ALERT line.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from ztnet.errors import LabError
from ztnet.observe.query import FlowReader
from ztnet.observe.records import EventType, FlowRecord, Verdict
from ztnet.observe.render import cells
from ztnet.text import escape

# The metadata endpoints of the big clouds (IPv4 and AWS's IPv6 one): reaching them is how a
# compromised workload turns into stolen cloud credentials.
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("169.254.169.254"),
                                ipaddress.ip_address("fd00:ec2::254")})
_GREEN, _RED, _YELLOW, _BOLD, _RESET = "\x1b[32m", "\x1b[31m", "\x1b[33m", "\x1b[1m", "\x1b[0m"
# (title, width) of the demo's columns: `ztnet observe`'s, narrowed to fit a terminal
_COLUMNS = (("TIME", 12), ("HOST", 6), ("AGENT", 12), ("PROCESS", 13), ("TYPE", 7),
            ("VERDICT", 7), ("PROTO", 6), ("SOURCE -> DESTINATION", 36), ("GRANT / REASON", 18),
            ("BYTES", 0))


def is_metadata(record: FlowRecord) -> bool:
    try:
        return ipaddress.ip_address(record.destination) in METADATA_ADDRESSES
    except ValueError:
        return False


def header() -> str:
    return "  ".join(title.ljust(width) for title, width in _COLUMNS).rstrip()


def row(record: FlowRecord, *, color: bool = False) -> str:
    time_, agent, process, kind, verdict, proto, flow, why, size = cells(record)
    values = [time_[7:], escape(record.host), agent, process, kind, verdict, proto, flow, why, size]
    parts = [value.ljust(width) for value, (_, width) in zip(values, _COLUMNS, strict=True)]
    if color:
        shade = _GREEN if record.verdict == Verdict.ALLOWED else _RED
        parts[5] = f"{shade}{parts[5]}{_RESET}"
    return "  ".join(parts).rstrip()


def alert_line(record: FlowRecord, *, color: bool = False) -> str:
    what = "denied, no packet left" if record.verdict == Verdict.DENIED else "ALLOWED"
    text = escape(f"ALERT metadata-endpoint attempt: {record.agent.name}@{record.host} "
                  f"(pid {record.process.pid}, {record.process.comm}) -> "
                  f"{record.destination}:{record.destination_port}, the classic "
                  f"credential-theft move; {what}")
    return f"{_BOLD}{_YELLOW}{text}{_RESET}" if color else text


class LiveTrace:
    """Follow ``{host: flows.jsonl}``; every record ever seen stays in :attr:`records`."""

    def __init__(self, paths: dict[str, Path], out: TextIO, *, color: bool = False,
                 indent: str = "    ") -> None:
        self.out, self.color, self.indent = out, color, indent
        self.records: list[FlowRecord] = []
        self._printed = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._readers = {host: FlowReader(path, poll_interval=0.2) for host, path in
                         paths.items()}
        self._threads = [threading.Thread(target=self._follow, args=(reader,), daemon=True,
                                          name=f"trace-{host}")
                         for host, reader in self._readers.items()]
        self.errors: list[str] = []

    def start(self) -> LiveTrace:
        # history first (nothing yet, normally), so follow() starts at the current end
        for reader in self._readers.values():
            for _ in reader.history(last=0):
                pass
        for thread in self._threads:
            thread.start()
        return self

    def _follow(self, reader: FlowReader) -> None:
        try:
            for record in reader.follow(self._stop):
                with self._cond:
                    self.records.append(record)
                    self._cond.notify_all()
        except Exception as exc:  # a dead follower must fail the demo, not hang it
            with self._cond:
                self.errors.append(f"{reader.path}: {exc!r}")
                self._cond.notify_all()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        for reader in self._readers.values():
            reader.close()

    def print_header(self) -> None:
        self.out.write(f"{self.indent}{header()}\n")

    def _print_new(self) -> None:
        """Print records not printed yet (caller holds the condition)."""
        for record in self.records[self._printed:]:
            self.out.write(f"{self.indent}{row(record, color=self.color)}\n")
            if is_metadata(record) and record.event_type != EventType.FLOW_END:
                self.out.write(f"{self.indent}{alert_line(record, color=self.color)}\n")
        self._printed = len(self.records)
        self.out.flush()

    def mark(self) -> int:
        """A position in :attr:`records`, for :meth:`wait` to look only at what came later."""
        with self._cond:
            return len(self.records)

    def wait(self, match: Callable[[FlowRecord], bool], timeout: float = 10.0,
             what: str = "a flow record", since: int = 0) -> FlowRecord:
        """The first record from position ``since`` on that ``match``es, printing every new
        record while waiting; LabError naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._print_new()
                found = next((r for r in self.records[since:] if match(r)), None)
                if found is not None:
                    return found
                if self.errors:
                    raise LabError(f"lab: flow trace failed: {'; '.join(self.errors)}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LabError(f"lab: no flow record for {what} within {timeout:g}s")
                self._cond.wait(remaining)

    def flush(self) -> None:
        with self._cond:
            self._print_new()
