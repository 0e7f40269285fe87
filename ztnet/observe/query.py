"""Reading flow logs: filters, history across rotated files, and follow.

``FlowReader(path, flt)`` yields parsed, matching records from the JSONL
files a ``JsonlSink`` writes; lines that do not parse are counted in
``malformed`` and skipped (a reader never stops at a damaged line).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ztnet.durations import parse_duration
from ztnet.observe.records import EventType, FlowRecord, RecordDecoder, Verdict, parse_time
from ztnet.observe.tail import LineTail

# Hubble's verdict words are accepted too
_VERDICT_WORDS = {"allowed": Verdict.ALLOWED, "forwarded": Verdict.ALLOWED,
                  "denied": Verdict.DENIED, "dropped": Verdict.DENIED, "audit": Verdict.AUDIT}
_NS = 1_000_000_000


def parse_verdict(text: str) -> Verdict:
    try:
        return _VERDICT_WORDS[text.lower()]
    except KeyError:
        raise ValueError(f"bad verdict {text!r}: expected allowed, denied or audit") from None


def parse_kind(text: str) -> EventType:
    try:
        return EventType(text.lower().replace("-", "_"))
    except ValueError:
        kinds = ", ".join(kind.value for kind in EventType)
        raise ValueError(f"bad kind {text!r}: expected one of {kinds}") from None


def parse_since(text: str, now: float | None = None) -> int:
    """``10m`` (that long ago) or an RFC 3339 time -> Unix ns."""
    now = time.time() if now is None else now
    try:
        return int(now * _NS) - parse_duration(text) * _NS
    except ValueError as duration_error:
        try:
            return parse_time(text)
        except ValueError:
            raise ValueError(f"{duration_error}, or an RFC 3339 time") from None


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """Empty sets and None match everything."""

    agents: frozenset[str] = field(default_factory=frozenset)
    verdict: Verdict | None = None
    since_ns: int | None = None
    kinds: frozenset[EventType] = field(default_factory=frozenset)

    def matches(self, record: FlowRecord) -> bool:
        return ((not self.agents or record.agent.name in self.agents)
                and (self.verdict is None or record.verdict == self.verdict)
                and (self.since_ns is None or record.time_ns >= self.since_ns)
                and (not self.kinds or record.event_type in self.kinds))


class FlowReader:
    """``history(last=N)`` then ``follow(stop)``, like ``hubble observe``."""

    def __init__(self, path: Path, flt: FlowFilter | None = None, *,
                 poll_interval: float = 1.0) -> None:
        self.path = Path(path)
        self.filter = flt or FlowFilter()
        self.malformed = 0
        self._tail = LineTail(self.path, poll_interval=poll_interval)

    def _parse(self, lines: Iterable[bytes]) -> Iterator[FlowRecord]:
        decode = RecordDecoder().decode
        for line in lines:
            try:
                record = decode(line)
            except ValueError:
                self.malformed += 1
                continue
            if self.filter.matches(record):
                yield record

    def history(self, *, last: int | None = None) -> Iterator[FlowRecord]:
        """Matching records so far, oldest first; only the last ``last`` if given."""
        since = self.filter.since_ns
        # a rotated file written to last before `since` holds nothing newer (1 s of slack
        # for the kernel-to-wall clock conversion)
        newer_than = None if since is None else since / _NS - 1.0
        records = self._parse(self._tail.history(newer_than=newer_than))
        if last is None:
            yield from records
        else:
            yield from collections.deque(records, maxlen=last)

    def follow(self, stop: threading.Event) -> Iterator[FlowRecord]:
        """Matching records appended from now on (or after ``history``)."""
        yield from self._parse(self._tail.follow(stop))

    def close(self) -> None:
        self._tail.close()


def read_flows(path: Path, flt: FlowFilter | None = None) -> list[FlowRecord]:
    """Every matching record of ``path`` and its rotated files, oldest first."""
    reader = FlowReader(path, flt)
    try:
        return list(reader.history())
    finally:
        reader.close()
