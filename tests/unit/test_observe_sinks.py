"""The dispatcher (bounded queue, safecall, counted drops) and the JSONL sink."""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_observe_records import make_record
from ztnet.errors import ConfigError
from ztnet.observe.query import read_flows
from ztnet.observe.records import FlowRecord, from_json
from ztnet.observe.sinks import DROP_CLOSED, DROP_QUEUE_FULL, Dispatcher, JsonlSink

DEADLINE = 10.0


class ListSink:
    name = "list"

    def __init__(self) -> None:
        self.records: list[FlowRecord] = []
        self.flushes = 0
        self.closed = False

    def configure(self, cfg: Mapping[str, Any]) -> None:
        pass

    def on_flow(self, record: FlowRecord) -> None:
        self.records.append(record)

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


class RaisingSink(ListSink):
    name = "raising"

    def on_flow(self, record: FlowRecord) -> None:
        raise RuntimeError(f"boom {record.socket_cookie}")

    def close(self) -> None:
        raise RuntimeError("cannot close either")


class BlockingSink(ListSink):
    """Blocks in on_flow until released, after saying it got there."""

    name = "blocking"

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def on_flow(self, record: FlowRecord) -> None:
        self.entered.set()
        assert self.release.wait(DEADLINE)
        super().on_flow(record)


def records(count: int, start: int = 0) -> list[FlowRecord]:
    return [make_record(cookie=start + i, time=1_800_000_000.0 + i) for i in range(count)]


def test_every_sink_gets_every_record_in_order() -> None:
    a, b = ListSink(), ListSink()
    batch = records(50)
    with Dispatcher([a, b]) as dispatcher:
        assert all(dispatcher.submit(record) for record in batch)
        assert dispatcher.wait_idle(DEADLINE)
        stats = dispatcher.stats()
    assert a.records == batch and b.records == batch
    assert a.flushes >= 1 and a.closed and b.closed
    assert (stats.submitted, stats.delivered, stats.queued) == (50, 50, 0)
    assert stats.dropped == {} and stats.sink_errors == {}


def test_a_raising_sink_is_logged_and_counted_and_harms_no_one(
        caplog: pytest.LogCaptureFixture) -> None:
    good = ListSink()
    batch = records(20)
    with caplog.at_level(logging.ERROR, logger="ztnet.observe"):
        dispatcher = Dispatcher([RaisingSink(), good]).start()
        for record in batch:
            dispatcher.submit(record)
        assert dispatcher.wait_idle(DEADLINE)
        dispatcher.close()
    assert good.records == batch and good.closed
    stats = dispatcher.stats()
    assert stats.sink_errors == {"raising": 21}  # 20 records and the close
    assert stats.delivered == 20
    failures = [r for r in caplog.records if "sink raising failed in on_flow" in r.getMessage()]
    assert len(failures) == 1, "repeats of a failure are not logged again at once"
    message = failures[0].getMessage()
    assert "RuntimeError: boom 0" in message and "in on_flow" in message
    assert message.count('File "') <= 3  # a trimmed traceback
    assert any("failed in close" in r.getMessage() for r in caplog.records)


def test_a_full_queue_drops_and_counts_instead_of_blocking() -> None:
    sink = BlockingSink()
    dispatcher = Dispatcher([sink], queue_size=4).start()
    batch = records(10)
    assert dispatcher.submit(batch[0])
    assert sink.entered.wait(DEADLINE)  # the worker holds record 0; the queue is empty
    accepted = [dispatcher.submit(record) for record in batch[1:]]
    assert accepted == [True] * 4 + [False] * 5
    stats = dispatcher.stats()
    assert stats.dropped == {DROP_QUEUE_FULL: 5} and stats.queued == 4
    sink.release.set()
    assert dispatcher.wait_idle(DEADLINE)
    dispatcher.close()
    assert sink.records == batch[:5]
    assert not dispatcher.submit(batch[0])
    assert dispatcher.stats().dropped == {DROP_QUEUE_FULL: 5, DROP_CLOSED: 1}


def test_close_delivers_what_is_queued_first() -> None:
    sink = BlockingSink()
    dispatcher = Dispatcher([sink]).start()
    batch = records(30)
    dispatcher.submit(batch[0])
    assert sink.entered.wait(DEADLINE)
    for record in batch[1:]:
        dispatcher.submit(record)
    sink.release.set()
    dispatcher.close()
    assert sink.records == batch and sink.closed


def test_deliver_hands_a_batch_to_every_sink_in_the_callers_thread() -> None:
    threads: list[int] = []

    class ThreadSink(ListSink):
        def on_flow(self, record: FlowRecord) -> None:
            threads.append(threading.get_ident())
            super().on_flow(record)

    a, b = ThreadSink(), ListSink()
    batch = records(20)
    dispatcher = Dispatcher([a, b]).start()
    assert dispatcher.deliver(batch[:12]) == 12
    assert a.records == batch[:12] and b.records == batch[:12] and a.flushes == 1
    assert set(threads) == {threading.get_ident()}
    assert dispatcher.deliver(batch[12:]) == 8
    stats = dispatcher.stats()
    assert (stats.submitted, stats.delivered, stats.queued) == (20, 20, 0)
    dispatcher.close()
    assert a.closed and b.records == batch
    assert dispatcher.deliver(batch) == 0
    assert dispatcher.stats().dropped == {DROP_CLOSED: 20}


def test_deliver_waits_while_the_worker_is_in_a_sink() -> None:
    """The sinks are never called by two threads at once: a batch delivered while the
    worker hands out a queued one reaches the sinks after it."""

    class OverlapSink(BlockingSink):
        def __init__(self) -> None:
            super().__init__()
            self.active = self.most_active = 0
            self.guard = threading.Lock()

        def on_flow(self, record: FlowRecord) -> None:
            with self.guard:
                self.active += 1
                self.most_active = max(self.most_active, self.active)
            if not self.records:  # the worker's record: held until released
                super().on_flow(record)
            else:
                self.records.append(record)
            with self.guard:
                self.active -= 1

    sink = OverlapSink()
    dispatcher = Dispatcher([sink]).start()
    batch = records(6)
    assert dispatcher.submit(batch[0])
    assert sink.entered.wait(DEADLINE)  # the worker is in the sink, holding record 0
    producer = threading.Thread(target=dispatcher.deliver, args=(batch[1:],))
    producer.start()
    producer.join(0.2)  # a bounded wait for what must not happen: deliver entering the sink
    sink.release.set()
    producer.join(DEADLINE)
    assert not producer.is_alive()
    assert sink.most_active == 1 and sink.records == batch
    dispatcher.close()


def test_configure_reaches_every_sink_and_bad_values_are_fatal(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "flows.jsonl")
    dispatcher = Dispatcher([sink, ListSink()])
    dispatcher.configure({"max_bytes": 4096, "backups": 2, "unrelated": 1})
    assert (sink.max_bytes, sink.backups) == (4096, 2)
    for bad in ({"max_bytes": 10}, {"backups": -1}, {"fsync_interval": "often"}):
        with pytest.raises(ConfigError):
            dispatcher.configure(bad)
    dispatcher.close()


def test_jsonl_files_hold_one_record_per_line_mode_0640(tmp_path: Path) -> None:
    path = tmp_path / "state" / "flows.jsonl"
    sink = JsonlSink(path)
    batch = records(3)
    for record in batch:
        sink.on_flow(record)
    sink.flush()
    assert [from_json(line) for line in path.read_text().splitlines()] == batch
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    sink.close()
    reopened = JsonlSink(path)  # a restarted daemon appends
    reopened.on_flow(records(1, start=3)[0])
    reopened.close()
    assert len(path.read_text().splitlines()) == 4


def test_rotation_bounds_the_total_size_and_keeps_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    sink = JsonlSink(path, max_bytes=8192, backups=3, fsync_interval=0)
    batch = records(400)
    for i, record in enumerate(batch):
        sink.on_flow(record)
        if i % 7 == 0:
            sink.flush()
    sink.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["flows.jsonl", "flows.jsonl.1", "flows.jsonl.2",
                                       "flows.jsonl.3"]
    assert all(f.stat().st_size <= 8192 for f in files)
    assert sum(f.stat().st_size for f in files) <= 4 * 8192
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o640 for f in files)
    kept = read_flows(path)
    assert kept == batch[-len(kept):]  # the newest, in order, no gaps
    assert len(kept) > len(path.read_text().splitlines())  # not just the current file


def test_without_backups_rotation_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    sink = JsonlSink(path, max_bytes=4096, backups=0)
    for record in records(100):
        sink.on_flow(record)
    sink.close()
    assert [f.name for f in tmp_path.iterdir()] == ["flows.jsonl"]
    assert path.stat().st_size <= 4096


class FsyncLog:
    """os.fsync, recording which file each call synced and from which thread, and
    letting a test await a call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str]] = []  # (file, thread name)
        self.called = threading.Condition()
        real = os.fsync

        def fsync(fd: int) -> None:
            real(fd)
            with self.called:
                self.calls.append((os.readlink(f"/proc/self/fd/{fd}"),
                                   threading.current_thread().name))
                self.called.notify_all()

        monkeypatch.setattr(os, "fsync", fsync)

    def wait_for(self, wanted: Callable[[list[tuple[str, str]]], bool]) -> None:
        with self.called:
            assert self.called.wait_for(lambda: wanted(self.calls), DEADLINE), self.calls


def open_fds_under(directory: Path) -> list[str]:
    fds = Path("/proc/self/fd")
    return [target for target in (os.readlink(fds / name) for name in os.listdir(fds)
                                  if (fds / name).exists())
            if target.startswith(str(directory))]


def test_the_writer_never_waits_for_the_disk_the_sync_thread_fsyncs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsyncs = FsyncLog(monkeypatch)
    path = tmp_path / "flows.jsonl"
    sink = JsonlSink(path, fsync_interval=0.05)
    sink.on_flows(records(3))
    sink.flush()
    fsyncs.wait_for(lambda calls: (str(path), "ztnet-flowlog-sync") in calls)
    assert all(thread == "ztnet-flowlog-sync" for _, thread in fsyncs.calls)
    sink.close()
    assert fsyncs.calls[-1] == (str(path), threading.current_thread().name)  # close syncs
    assert not sink._syncer.is_alive()
    assert open_fds_under(tmp_path) == []


def test_a_file_rotated_away_is_fsynced_by_the_sync_thread_then_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsyncs = FsyncLog(monkeypatch)
    path = tmp_path / "flows.jsonl"
    sink = JsonlSink(path, max_bytes=4096, backups=3, fsync_interval=0.05)
    for record in records(20):  # a few rotations' worth
        sink.on_flows([record])
    sink.flush()
    assert path.with_name("flows.jsonl.1").exists()
    # written from this thread, synced by the other: until then the old file stays open
    fsyncs.wait_for(lambda calls: any(name.startswith(str(path) + ".") for name, _ in calls))
    assert all(thread == "ztnet-flowlog-sync" for _, thread in fsyncs.calls)
    sink.close()  # joins the sync thread: every file it held is closed
    assert open_fds_under(tmp_path) == []
    assert read_flows(path) == records(20)[-len(read_flows(path)):]


def test_with_interval_0_every_batch_is_fsynced_by_the_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsyncs = FsyncLog(monkeypatch)
    path = tmp_path / "flows.jsonl"
    sink = JsonlSink(path, fsync_interval=0)
    for batch in (records(2), records(2, start=2)):
        sink.on_flows(batch)
        sink.flush()
    me = threading.current_thread().name
    assert fsyncs.calls == [(str(path), me), (str(path), me)]
    sink.close()
