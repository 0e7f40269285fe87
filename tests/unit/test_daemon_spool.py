"""The flow spool (ordering, the size bound and its drop count, sequences that survive
restarts, crash-safe writes) and the batcher that fills it."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.test_observe_records import make_record
from ztnet.daemon.batcher import SpoolSink
from ztnet.daemon.spool import SEQUENCE_FILE, Spool
from ztnet.errors import ConfigError
from ztnet.observe.records import to_json

CLOCK = 1_800_000_000.0  # the fresh spool's first sequence is this in microseconds
FIRST = int(CLOCK * 1e6)


def make_spool(directory: Path, **options: int) -> Spool:
    return Spool(directory, clock=lambda: CLOCK, **options)


def records(count: int, size: int = 10, tag: str = "r") -> list[bytes]:
    return [f"{tag}{i:0{size - len(tag)}d}".encode() for i in range(count)]


def batch_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != SEQUENCE_FILE)


# --- ordering and reading back -------------------------------------------------------------


def test_batches_get_increasing_sequences_and_read_back_exactly(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    first = spool.add(records(3, tag="a"))
    second = spool.add(records(2, tag="b"))
    assert (first, second) == (FIRST, FIRST + 1)
    assert spool.pending() == [first, second]
    assert spool.next_after(0) == first and spool.next_after(first) == second
    assert spool.next_after(second) is None
    batch = spool.read(first)
    assert batch is not None and batch.records == tuple(records(3, tag="a"))
    assert batch_files(tmp_path) == [f"{first:020d}.jsonl", f"{second:020d}.jsonl"]
    assert spool.remove(first) and not spool.remove(first)
    assert spool.read(first) is None and spool.pending() == [second]
    assert batch_files(tmp_path) == [f"{second:020d}.jsonl"]
    stats = spool.stats()
    assert (stats.batches, stats.records, stats.bytes) == (1, 2, 22)


def test_a_batch_needs_records(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_spool(tmp_path).add([])


# --- sequences across restarts -------------------------------------------------------------


def test_sequences_keep_growing_across_restarts_even_with_an_empty_spool(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    used = [spool.add(records(1)) for _ in range(3)]
    reopened = make_spool(tmp_path)
    assert reopened.pending() == used  # what was not acknowledged is still there, in order
    for sequence in used:
        reopened.remove(sequence)
    after_restart = make_spool(tmp_path).add(records(1))
    assert after_restart > used[-1]
    # the reservation is on disk before a sequence from it is used
    assert int((tmp_path / SEQUENCE_FILE).read_text()) > after_restart


def test_a_fresh_spool_starts_at_the_clock_and_a_used_one_ignores_it(tmp_path: Path) -> None:
    assert Spool(tmp_path, clock=lambda: 5.0).add(records(1)) == 5_000_000
    # a clock stepped back changes nothing for a spool that has used sequences
    assert Spool(tmp_path, clock=lambda: 1.0).add(records(1)) > 5_000_000


# --- the bound -----------------------------------------------------------------------------


def test_when_full_the_oldest_batches_are_dropped_and_counted(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, max_bytes=100)  # 11 bytes a record with its newline
    first = spool.add(records(4, tag="a"))   # 44 bytes
    second = spool.add(records(4, tag="b"))  # 88
    third = spool.add(records(2, tag="c"))   # 110 > 100: the oldest goes
    assert spool.pending() == [second, third]
    stats = spool.stats()
    assert (stats.dropped_batches, stats.dropped_records) == (1, 4)
    assert (stats.batches, stats.records, stats.bytes) == (2, 6, 66)
    assert f"{first:020d}.jsonl" not in batch_files(tmp_path)
    fourth = spool.add(records(9, tag="d"))  # 99 bytes: everything older must go
    assert spool.pending() == [fourth]
    assert (spool.stats().dropped_batches, spool.stats().dropped_records) == (3, 10)


def test_the_newest_batch_is_kept_even_alone_above_the_bound(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, max_bytes=20)
    spool.add(records(1))
    big = spool.add(records(5))
    assert spool.pending() == [big] and spool.stats().bytes == 55


def test_a_smaller_bound_applies_at_the_next_start(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    used = [spool.add(records(5)) for _ in range(4)]  # 55 bytes each
    smaller = make_spool(tmp_path, max_bytes=120)
    assert smaller.pending() == used[2:]
    assert smaller.stats().dropped_records == 10


@pytest.fixture
def ztnet_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The daemon's log lines, whether or not ``logs.setup`` cut the logger off the root."""
    logger = logging.getLogger("ztnet")
    cut_off = not logger.propagate
    if cut_off:
        logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="ztnet"):
            yield caplog
    finally:
        if cut_off:
            logger.removeHandler(caplog.handler)


def test_a_full_spool_logs_what_it_dropped(tmp_path: Path,
                                           ztnet_log: pytest.LogCaptureFixture) -> None:
    spool = make_spool(tmp_path, max_bytes=30)
    for _ in range(3):
        spool.add(records(2))
    drops = [r for r in ztnet_log.records if r.getMessage().startswith("flow spool full")]
    assert len(drops) == 1  # at most one line every 10 s, with the counts
    assert getattr(drops[0], "fields", {})["records"] == 2


# --- crash safety --------------------------------------------------------------------------


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_a_batch_is_fsynced_then_renamed_then_its_directory_fsynced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = make_spool(tmp_path)
    spool.add(records(1))  # the sequence reservation is written once, before
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", fd_path(fd)))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        calls.append(("rename", f"{Path(src).name} -> {Path(dst).name}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    sequence = spool.add(records(1))
    name = f"{sequence:020d}.jsonl"
    assert calls == [("fsync", str(tmp_path / f".{name}.tmp")),
                     ("rename", f".{name}.tmp -> {name}"),
                     ("fsync", str(tmp_path))]


def test_an_interrupted_write_leaves_no_batch_and_its_sequence_is_not_reused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = make_spool(tmp_path)
    kept = spool.add(records(1))

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        with pytest.raises(OSError):
            spool.add(records(1, tag="x"))
    assert spool.pending() == [kept]
    assert any(name.startswith(".") for name in batch_files(tmp_path))  # the temporary file
    assert spool.add(records(1)) == kept + 2
    make_spool(tmp_path)  # removes what the interrupted write left
    assert batch_files(tmp_path) == [f"{kept:020d}.jsonl", f"{kept + 2:020d}.jsonl"]


def test_empty_and_foreign_files_are_not_batches(tmp_path: Path) -> None:
    (tmp_path / f"{7:020d}.jsonl").write_bytes(b"")
    (tmp_path / "README").write_text("not a batch")
    spool = make_spool(tmp_path)
    assert spool.pending() == [] and (tmp_path / "README").exists()


# --- the batcher ---------------------------------------------------------------------------


class Added:
    """Waits for batches to reach the spool (its listener), against a deadline."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.cond = threading.Condition()
        spool.listen(self.notify)

    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "not spooled in time"

    def lines(self) -> list[bytes]:
        out: list[bytes] = []
        for sequence in self.spool.pending():
            batch = self.spool.read(sequence)
            assert batch is not None
            out += batch.records
        return out


@pytest.fixture
def sink_factory(tmp_path: Path) -> Iterator[Callable[..., tuple[SpoolSink, Added]]]:
    sinks: list[SpoolSink] = []

    def make(spool: Spool | None = None, **options: float) -> tuple[SpoolSink, Added]:
        spool = spool or make_spool(tmp_path / "spool")
        sink = SpoolSink(spool, **options)  # type: ignore[arg-type]
        sinks.append(sink)
        return sink, Added(spool)

    yield make
    for sink in sinks:
        sink.close()


def test_records_are_batched_by_count_in_order(
        sink_factory: Callable[..., tuple[SpoolSink, Added]]) -> None:
    sink, added = sink_factory(batch_records=100, batch_delay=3600)
    flows = [make_record(cookie=i) for i in range(250)]
    for record in flows:
        sink.on_flow(record)
    added.wait(lambda: added.spool.stats().records == 200)  # two full batches
    assert added.spool.stats().batches in (1, 2)  # (one group, if the writer was behind)
    sink.close()  # the open batch of 50 is written too
    assert added.spool.stats().records == 250
    assert added.lines() == [to_json(r).encode() for r in flows]


def test_a_lone_record_is_spooled_after_the_delay(
        sink_factory: Callable[..., tuple[SpoolSink, Added]]) -> None:
    sink, added = sink_factory(batch_records=500, batch_delay=0.05)
    sink.on_flow(make_record())
    added.wait(lambda: added.spool.stats().records == 1)


def test_a_batch_that_cannot_be_spooled_is_counted_lost(
        tmp_path: Path, sink_factory: Callable[..., tuple[SpoolSink, Added]],
        monkeypatch: pytest.MonkeyPatch, ztnet_log: pytest.LogCaptureFixture) -> None:
    spool = make_spool(tmp_path / "spool")

    def full(batch: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool, "add", full)
    sink, _ = sink_factory(spool, batch_records=2)
    for i in range(5):
        sink.on_flow(make_record(cookie=i))
    sink.close()
    assert sink.lost_records == 5
    assert any(r.getMessage() == "flow spool write failed" for r in ztnet_log.records)


class StalledDisk:
    """Holds the spool's first write until released, and says when the writer is in it."""

    def __init__(self, spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.real_add = spool.add
        monkeypatch.setattr(spool, "add", self.add)

    def add(self, records: list[bytes]) -> int:
        self.entered.set()
        assert self.release.wait(30)
        return self.real_add(records)


def test_batches_that_waited_for_a_slow_disk_are_committed_together(
        tmp_path: Path, sink_factory: Callable[..., tuple[SpoolSink, Added]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    spool = make_spool(tmp_path / "spool")
    disk = StalledDisk(spool, monkeypatch)
    sink, added = sink_factory(spool, batch_records=2, batch_delay=3600)
    flows = [make_record(cookie=i) for i in range(10)]
    for record in flows[:2]:
        sink.on_flow(record)
    assert disk.entered.wait(10)  # the writer holds the first batch
    for record in flows[2:]:
        sink.on_flow(record)  # four more batches close meanwhile; on_flow never waits
    disk.release.set()
    added.wait(lambda: spool.stats().records == 10)
    assert spool.stats().batches == 2  # the four that waited: one write, one fsync
    assert added.lines() == [to_json(r).encode() for r in flows]


def test_a_writer_too_far_behind_drops_the_oldest_waiting_batches(
        tmp_path: Path, sink_factory: Callable[..., tuple[SpoolSink, Added]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    spool = make_spool(tmp_path / "spool")
    disk = StalledDisk(spool, monkeypatch)
    sink, added = sink_factory(spool, batch_records=1, backlog=2, batch_delay=3600)
    flows = [make_record(cookie=i) for i in range(6)]
    sink.on_flow(flows[0])
    assert disk.entered.wait(10)
    for record in flows[1:]:
        sink.on_flow(record)
    assert sink.backlog_records == 3  # 1, 2 and 3: only the newest two may wait
    disk.release.set()
    added.wait(lambda: spool.stats().records == 3)
    assert added.lines() == [to_json(flows[i]).encode() for i in (0, 4, 5)]


def test_bad_options_are_refused(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    for options in ({"batch_records": 0}, {"batch_bytes": 10}, {"batch_delay": 0}):
        with pytest.raises(ConfigError):
            SpoolSink(spool, **options)
