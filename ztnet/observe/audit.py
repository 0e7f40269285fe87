"""A tamper-evident audit trail: decisions and grant changes, hash-chained.

Each line is one JSON object in canonical form (sorted keys, no spaces,
ASCII) with ``seq`` (1, 2, …), ``time``, ``kind``, ``fields``, ``prev`` (the
``hash`` of the line before; 64 zeros for the first) and ``hash``: the hex
SHA-256 of the line's canonical bytes without ``hash``. Editing a line
breaks its hash; deleting or moving one breaks ``seq`` and ``prev``. Cutting
lines off the end leaves a valid chain, so every append also rewrites
``<path>.head`` (the last seq and hash, fsync'd) and ``verify`` reports a
log that ends before its head. Someone who can rewrite the log *and* its head
can forge both: ship the head's hash off the host (``verify(path, head=…)``
checks against such an anchor) to make that evident too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztnet.errors import ConfigError
from ztnet.fsutil import replace_atomic
from ztnet.observe.jsonfields import format_rfc3339
from ztnet.observe.records import FlowRecord, Verdict

logger = logging.getLogger("ztnet.observe")

GENESIS = "0" * 64
# Kinds the daemon writes (any other string is allowed too).
BUNDLE_APPLIED = "bundle.applied"
BUNDLE_RESTORED = "bundle.restored"
BUNDLE_REJECTED = "bundle.rejected"
GRANT_ADDED = "grant.added"
GRANT_REMOVED = "grant.removed"
FLOW_DENIED = "flow.denied"
DATAPATH_DRIFT = "datapath.drift"


def canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


# canonical()'s encoder, made once (json.dumps builds one per call with these options)
_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                           allow_nan=False).encode


def record_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


@dataclass(frozen=True, slots=True)
class Head:
    seq: int
    hash: str

    @classmethod
    def parse(cls, text: str) -> Head:
        """``SEQ:HASH``, or the JSON of a ``.head`` file."""
        try:
            if text.lstrip().startswith("{"):
                data = json.loads(text)
                seq, digest = data["seq"], data["hash"]
            else:
                seq_text, digest = text.strip().split(":", 1)
                seq = int(seq_text)
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"audit: bad head {text[:80]!r}: expected SEQ:HASH") from None
        if not isinstance(seq, int) or not isinstance(digest, str) or len(digest) != 64:
            raise ConfigError(f"audit: bad head {text[:80]!r}: expected SEQ:HASH")
        return cls(seq, digest)


def head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


class AuditLog:
    """Appends hash-chained records to ``path`` (created 0600). Reopening
    continues the chain; if the log ends before its head (truncated while
    we were away) numbering continues after the head, so the gap stays
    visible to ``verify``. Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                           0o600)
        self._head = self._recover()
        self._unsynced = False

    def _recover(self) -> Head:
        size = os.fstat(self._fd).st_size
        tail = os.pread(self._fd, min(size, 1 << 20), max(0, size - (1 << 20)))
        if tail and not tail.endswith(b"\n"):  # a torn write of ours: never acknowledged
            os.ftruncate(self._fd, size - (len(tail) - tail.rfind(b"\n") - 1))
            tail = tail[: tail.rfind(b"\n") + 1]
        last, damaged = Head(0, GENESIS), 0
        for line in reversed(tail.splitlines()):
            try:
                entry = json.loads(line)
                last = Head(int(entry["seq"]), str(entry["hash"]))
                break
            except (ValueError, KeyError, TypeError):
                damaged += 1
        if damaged:
            # never refuse to start over it (grants would lapse): the damage stays
            # in the file for `ztnet audit verify` to report
            logger.error("audit: %s ends with %d damaged lines; continuing after the last "
                         "intact record", self.path, damaged)
        stored = _read_head(head_path(self.path))
        if stored is not None and (stored.seq > last.seq
                                   or (stored.seq == last.seq and stored.hash != last.hash)):
            # continue after the head: missing or replaced records stay evident
            return stored
        return last

    def append(self, kind: str, fields: Mapping[str, Any], *, sync: bool = True) -> Head:
        """Write one record; with ``sync`` (the default) it is on disk, with
        the head, when this returns. Batch writers pass ``sync=False`` and
        call ``sync()`` once per batch."""
        with self._lock:
            entry: dict[str, Any] = {"seq": self._head.seq + 1, "time": format_rfc3339(
                time.time_ns()), "kind": kind, "fields": dict(fields), "prev": self._head.hash}
            entry["hash"] = record_hash(entry)
            os.write(self._fd, canonical(entry) + b"\n")
            self._head = Head(entry["seq"], entry["hash"])
            self._unsynced = True
            if sync:
                self._sync_locked()
            return self._head

    def append_many(self, kind: str, many: Iterable[Mapping[str, Any]]) -> Head:
        """``append(kind, fields, sync=False)`` for each of ``many``, written in
        large chunks (one lock, a few writes); the caller calls ``sync()``. Each
        line is the bytes ``canonical`` gives, built from one encoding of the
        fields."""
        return self.append_encoded(kind, (_ENCODE(dict(fields)) for fields in many))

    def append_encoded(self, kind: str, encoded: Iterable[str]) -> Head:
        """``append_many`` for fields already encoded: each of ``encoded`` must be
        exactly ``canonical(fields)`` (the 100,000 grant.added records of a first
        bundle, from a template). One time for the batch: its records were
        written at one moment."""
        kind_json, chunk = _ENCODE(kind), []
        with self._lock:
            seq, prev = self._head.seq, self._head.hash
            stamp = f',"time":{_ENCODE(format_rfc3339(time.time_ns()))}}}'
            for fields_json in encoded:
                seq += 1
                head = f'{{"fields":{fields_json}'
                tail = f',"kind":{kind_json},"prev":"{prev}","seq":{seq}{stamp}'
                prev = hashlib.sha256((head + tail).encode()).hexdigest()
                chunk.append(f'{head},"hash":"{prev}"{tail}\n')
                if len(chunk) >= 4096:
                    os.write(self._fd, "".join(chunk).encode())
                    chunk.clear()
            if chunk:
                os.write(self._fd, "".join(chunk).encode())
            if seq != self._head.seq:
                self._head = Head(seq, prev)
                self._unsynced = True
            return self._head

    def sync(self) -> None:
        with self._lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        if not self._unsynced:
            return
        os.fsync(self._fd)  # the log first: a head never names a record not on disk
        _write_head(head_path(self.path), self._head)
        self._unsynced = False

    @property
    def head(self) -> Head:
        return self._head

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                self._sync_locked()
                os.close(self._fd)
                self._fd = -1


def _write_head(path: Path, head: Head) -> None:
    replace_atomic(path, canonical({"seq": head.seq, "hash": head.hash}) + b"\n")


@dataclass(frozen=True, slots=True)
class LastApplied:
    """The last ``bundle.applied`` record of a trail, and how many grant records
    (``grant.added``, ``grant.removed``) follow it."""

    seq: int
    fields: Mapping[str, Any]
    grant_records: int


# A record's own kind, as canonical JSON writes it after the record's hash: a string
# value cannot hold an unescaped quote, so only a record's top level matches.
def _kind_marker(kind: str) -> bytes:
    return f'","kind":{_ENCODE(kind)},"prev":"'.encode()


def last_applied(path: Path, max_bytes: int = 64 << 20,
                 chunk: int = 4 << 20) -> LastApplied | None:
    """The trail's last ``bundle.applied`` record, searched for in its last ``max_bytes``
    (100,000 grant records are about 33 MB; give or take a chunk), read backwards
    ``chunk`` bytes at a time; None if there is none there or it does not check out (its
    hash)."""
    applied_marker = _kind_marker(BUNDLE_APPLIED)
    grant_markers = (_kind_marker(GRANT_ADDED), _kind_marker(GRANT_REMOVED))
    grant_records, carry = 0, b""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        size = end = os.fstat(fd).st_size
        while end > 0 and size - end < max_bytes:
            start = max(0, end - chunk)
            data = os.pread(fd, end - start, start) + carry
            # whole lines only: the first one may begin in the chunk before
            cut = data.find(b"\n") + 1 if start else 0
            if start and not cut:
                carry, end = data, start
                continue
            carry, lines = data[:cut], data[cut:]
            at = lines.rfind(applied_marker)
            if at < 0:
                grant_records += sum(lines.count(marker) for marker in grant_markers)
                end = start
                continue
            line_start, line_end = lines.rfind(b"\n", 0, at) + 1, lines.find(b"\n", at)
            if line_end < 0:
                return None  # not a whole line yet
            grant_records += sum(lines.count(marker, line_end) for marker in grant_markers)
            return _applied_record(lines[line_start:line_end], grant_records)
        return None
    finally:
        os.close(fd)


def _applied_record(line: bytes, grant_records: int) -> LastApplied | None:
    try:
        entry = json.loads(line)
        if entry["kind"] != BUNDLE_APPLIED or entry["hash"] != record_hash(entry) \
                or not isinstance(entry["fields"], dict) or not isinstance(entry["seq"], int):
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return LastApplied(entry["seq"], entry["fields"], grant_records)


def _read_head(path: Path) -> Head | None:
    try:
        return Head.parse(path.read_text())
    except FileNotFoundError:
        return None


class AuditSink:
    """A flow sink writing every denied decision to the audit log (one
    fsync per dispatcher batch)."""

    name = "audit"

    def __init__(self, log: AuditLog) -> None:
        self.log = log

    def configure(self, cfg: Mapping[str, Any]) -> None:
        pass

    def on_flows(self, records: list[FlowRecord]) -> None:
        for record in records:
            if record.verdict == Verdict.DENIED:
                self.on_flow(record)

    def on_flow(self, record: FlowRecord) -> None:
        if record.verdict != Verdict.DENIED:
            return
        self.log.append(FLOW_DENIED, {
            "uuid": record.uuid, "time": format_rfc3339(record.time_ns),
            "agent": record.agent.name, "event_type": str(record.event_type),
            "reason": record.drop_reason, "pid": record.process.pid,
            "comm": record.process.comm, "exe": record.process.exe, "uid": record.process.uid,
            "proto": record.proto, "destination": record.destination,
            "destination_port": record.destination_port, "suppressed": record.suppressed,
        }, sync=False)

    def flush(self) -> None:
        self.log.sync()

    def close(self) -> None:
        self.log.sync()  # the log is the daemon's: it closes it


# --- verification ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditReport:
    """``problem`` is None when the log verified; else ``line`` (1-based, 0
    for the file as a whole) and ``kind``: malformed, edited, deleted,
    reordered or truncated."""

    records: int
    last: Head
    problem: str | None = None
    line: int = 0
    kind: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(path: Path, *, head: Head | None = None) -> AuditReport:
    """Check the whole chain, then that it reaches ``head`` (default: the
    ``<path>.head`` side file)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"audit: cannot read {path}: {exc.strerror}") from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    anchor = head if head is not None else _read_head(head_path(path))
    last, notes = Head(0, GENESIS), list[str]()

    def fail(number: int, kind: str, problem: str) -> AuditReport:
        return AuditReport(number - 1, last, problem, number, kind, tuple(notes))

    for number, raw in enumerate(lines, start=1):
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict) or canonical(entry) != raw:
                raise ValueError("not a canonical audit record")
            seq, prev, digest = entry["seq"], entry["prev"], entry["hash"]
            if not isinstance(seq, int) or not isinstance(prev, str) \
                    or not isinstance(digest, str):
                raise ValueError("bad field types")
        except (ValueError, KeyError):
            return fail(number, "malformed", "not a canonical audit record (edited or damaged)")
        if record_hash(entry) != digest:
            return fail(number, "edited", f"seq {seq}: hash mismatch, the record was edited")
        expected = last.seq + 1
        if seq != expected:
            later = any(_peek_seq(line) == expected for line in lines[number:])
            kind = "reordered" if later or seq < expected else "deleted"
            what = (f"seq {seq} where {expected} was expected: "
                    + ("records are out of order" if kind == "reordered"
                       else f"records {expected}..{seq - 1} were deleted"))
            return fail(number, kind, what)
        if prev != last.hash:
            return fail(number, "edited", f"seq {seq}: prev does not match the hash of the "
                        "record before it (the chain was rewritten)")
        if anchor is not None and seq == anchor.seq and digest != anchor.hash:
            return fail(number, "edited", f"seq {seq} does not match the head's hash")
        last = Head(seq, digest)
    if anchor is None:
        notes.append(f"no {head_path(path).name}: truncation at the end cannot be detected")
    elif anchor.seq > last.seq:
        return fail(len(lines) + 1, "truncated", f"the log ends at seq {last.seq} but its head "
                    f"says {anchor.seq} was written: records were cut off the end")
    elif anchor.seq < last.seq:
        notes.append(f"head is at seq {anchor.seq}, behind the log (a crash between writing "
                     "a record and its head)")
    return AuditReport(len(lines), last, notes=tuple(notes))


def _peek_seq(raw: bytes) -> int:
    try:
        return int(json.loads(raw)["seq"])
    except (ValueError, KeyError, TypeError):
        return -1
