"""Reading flow logs: rotated files in order, filters, `ztnet observe`
(table and --json), and following a log across rotations."""

from __future__ import annotations

import io
import json
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_observe_records import (
    NOW,
    denied_event,
    flow_end_event,
    make_ctx,
    make_event,
)
from ztnet.cli import main
from ztnet.cli.args import daemon_state
from ztnet.cli.observe import ObserveOptions, observe
from ztnet.datapath.abi import ZtEventKind, ZtReason
from ztnet.errors import ConfigError
from ztnet.instance import FLOWS_FILE, Instance
from ztnet.observe import tail
from ztnet.observe.query import (
    FlowFilter,
    FlowReader,
    parse_kind,
    parse_since,
    parse_verdict,
    read_flows,
)
from ztnet.observe.records import EventType, FlowRecord, Verdict, from_event, from_json, to_json
from ztnet.observe.render import format_row, header
from ztnet.observe.sinks import JsonlSink

DEADLINE = 10.0


def sample() -> list[FlowRecord]:
    """Six records of two agents, a second apart, all kinds and verdicts."""
    ctx = make_ctx()
    events = [
        make_event(time=NOW, cookie=1),
        denied_event(time=NOW + 1, cookie=2, suppressed=37),
        make_event(time=NOW + 2, cookie=3, agent_index=2, kind=ZtEventKind.SENDMSG, proto=17,
                   destination_port=53),
        flow_end_event(time=NOW + 3, cookie=1),
        denied_event(time=NOW + 4, cookie=5, agent_index=2, reason=ZtReason.QUARANTINED),
        denied_event(time=NOW + 5, cookie=6, agent_index=0, reason=ZtReason.NOT_AGENT),
    ]
    return [from_event(event, ctx) for event in events]


def write(path: Path, records: list[FlowRecord], **sink_options: int) -> None:
    sink = JsonlSink(path, **sink_options)
    for record in records:
        sink.on_flow(record)
    sink.close()


@pytest.fixture
def flows(tmp_path: Path) -> Path:
    path = tmp_path / "flows.jsonl"
    write(path, sample())
    return path


def many(count: int, start: int = 0) -> list[FlowRecord]:
    ctx = make_ctx()
    return [from_event(make_event(time=NOW + i, cookie=i), ctx)
            for i in range(start, start + count)]


def test_history_reads_rotated_files_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    records = many(60)
    write(path, records, max_bytes=4096, backups=20)
    assert (tmp_path / "flows.jsonl.3").exists()
    assert read_flows(path) == records


def test_filters(flows: Path) -> None:
    records = sample()
    assert read_flows(flows) == records
    assert read_flows(flows, FlowFilter(agents=frozenset({"other"}))) == [records[2], records[4]]
    assert read_flows(flows, FlowFilter(verdict=Verdict.DENIED)) == \
        [records[1], records[4], records[5]]
    assert read_flows(flows, FlowFilter(kinds=frozenset({EventType.FLOW_END}))) == [records[3]]
    since = records[3].time_ns
    assert read_flows(flows, FlowFilter(since_ns=since)) == records[3:]
    both = FlowFilter(agents=frozenset({"bot"}), verdict=Verdict.ALLOWED)
    assert read_flows(flows, both) == [records[0], records[3]]


def test_filter_words() -> None:
    assert parse_verdict("denied") == parse_verdict("DROPPED") == Verdict.DENIED
    assert parse_verdict("Allowed") == parse_verdict("forwarded") == Verdict.ALLOWED
    assert parse_kind("flow-end") == EventType.FLOW_END
    assert parse_since("10m", now=NOW) == int(NOW * 1e9) - 600 * 10**9
    assert parse_since("2027-01-15T08:00:00Z") == 1_800_000_000 * 10**9
    for parse, bad in ((parse_verdict, "maybe"), (parse_kind, "accept"), (parse_since, "soon")):
        with pytest.raises(ValueError):
            parse(bad)


def test_malformed_lines_are_skipped_and_counted(flows: Path) -> None:
    with open(flows, "a") as fh:
        fh.write("not json\n{}\n")
    reader = FlowReader(flows)
    assert list(reader.history()) == sample()
    assert reader.malformed == 2


def run_observe(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["observe", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_observe_json_prints_matching_records_in_the_schema(
        flows: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_observe("--file", str(flows), "--verdict", "denied", "--json",
                               capsys=capsys)
    assert code == 0
    printed = [from_json(line) for line in out.splitlines()]
    assert printed == [r for r in sample() if r.verdict == Verdict.DENIED]
    assert all(json.loads(line)["schema_version"] == 1 for line in out.splitlines())
    assert out.splitlines()[0] == to_json(printed[0])


def test_observe_table(flows: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_observe("--file", str(flows), capsys=capsys)
    rows = out.splitlines()
    assert code == 0 and rows[0] == header() and len(rows) == 7
    assert "\x1b[" not in out  # not a terminal: no colour
    allowed, denied, sendmsg, end, quarantined, stranger = rows[1:]
    for cell in ("bot", "1234/curl", "connect", "ALLOWED", "TCP", "- -> 10.0.2.7:443",
                 "g-0000000000000abc"):
        assert cell in allowed
    assert "DENIED" in denied and "NO_GRANT (+37 suppressed)" in denied
    assert "other" in sendmsg and "sendmsg" in sendmsg and "UDP" in sendmsg
    assert "10.0.1.5:40000 -> 10.0.2.7:443" in end and "out 1.3KiB in 2.5KiB" in end
    assert "QUARANTINED" in quarantined and "NOT_AGENT" in stranger


def test_observe_escapes_what_an_agent_chose(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """prctl(PR_SET_NAME) lets an agent pick its comm: "\x1b[8m" (conceal) used to
    hide every later row of `ztnet observe`, denials included."""
    ctx = make_ctx()
    hostile = from_event(make_event(time=NOW, cookie=1, comm="\x1b[8m"), ctx)
    path = tmp_path / "flows.jsonl"
    write(path, [hostile, from_event(denied_event(time=NOW + 1, cookie=2), ctx)])
    code, out, _ = run_observe("--file", str(path), capsys=capsys)
    rows = out.splitlines()
    assert code == 0 and len(rows) == 3
    assert "1234/\\x1b[8m" in rows[1] and "\x1b[8m" not in out
    assert "DENIED" in rows[2]


def test_observe_last_and_since(flows: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_observe("--file", str(flows), "--json", "--last", "2", capsys=capsys)
    assert [from_json(line) for line in out.splitlines()] == sample()[-2:]
    _, out, _ = run_observe("--file", str(flows), "--json", "--since",
                            "2027-01-15T08:00:03Z", capsys=capsys)
    assert [from_json(line) for line in out.splitlines()] == sample()[3:]
    _, out, err = run_observe("--file", str(flows), "--agent", "nobody", capsys=capsys)
    assert out == "" and "no matching flows" in err


def test_colour_only_when_asked() -> None:
    record = sample()[1]
    assert "\x1b[31mDENIED" in format_row(record, color=True)
    assert "\x1b[" not in format_row(record)


def test_what_an_agent_names_its_process_cannot_drive_the_terminal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hostile = "\x1b]0;pwned\x07\x1b[2J"  # retitle the terminal, clear the screen
    record = from_event(make_event(comm=hostile), make_ctx())
    assert "\x1b" not in format_row(record) and "\\x1b]0;pwned\\x07" in format_row(record)
    path = tmp_path / "flows.jsonl"
    write(path, [record])
    code, out, _ = run_observe("--file", str(path), capsys=capsys)
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert "/\\x1b]0;pwned\\x07\\x1b[2J" in out


def test_observe_finds_the_state_dir_like_the_daemon(tmp_path: Path) -> None:
    assert daemon_state(None, None) == Path("/var/lib/ztnet")
    assert daemon_state(None, "default") == Path("/var/lib/ztnet")
    assert daemon_state(None, "lab-a") == Path("/var/lib/ztnet-lab-a")
    assert daemon_state(tmp_path, "x") == tmp_path
    assert Instance.resolve("lab-a").state_dir / FLOWS_FILE == \
        Path("/var/lib/ztnet-lab-a/flows.jsonl")


def test_observe_reports_a_missing_log(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_observe("--state", str(tmp_path / "none"), capsys=capsys)
    assert code == ConfigError.exit_code and "no flow log" in err
    for bad in (["--verdict", "maybe"], ["--since", "soon"], ["--kind", "accept"]):
        with pytest.raises(SystemExit):
            main(["observe", "--file", "x", *bad])
        assert "bad" in capsys.readouterr().err


# --- follow ---------------------------------------------------------------------------


class Follower:
    """Runs FlowReader.follow in a thread; records arrive on a queue."""

    def __init__(self, reader: FlowReader) -> None:
        self.reader = reader
        self.stop = threading.Event()
        self.got: queue.Queue[FlowRecord] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for record in self.reader.follow(self.stop):
            self.got.put(record)

    def take(self, count: int) -> list[FlowRecord]:
        return [self.got.get(timeout=DEADLINE) for _ in range(count)]

    def close(self) -> None:
        self.stop.set()
        # a change in the directory wakes an inotify wait at once
        (self.reader.path.parent / "wake-up").touch()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive()
        self.reader.close()


@pytest.fixture
def follower_for() -> Iterator[list[Follower]]:
    made: list[Follower] = []
    yield made
    for follower in made:
        follower.close()


class PollingWatch(tail.DirWatch):
    """A system without inotify: the follower can only look periodically."""

    def __init__(self, directory: Path) -> None:
        self.fd = -1


class BatchFollower:
    """Runs LineTail.follow_batches in a thread; each list arrives on a queue."""

    def __init__(self, line_tail: tail.LineTail) -> None:
        self.tail = line_tail
        self.stop = threading.Event()
        self.got: queue.Queue[list[bytes]] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for lines in self.tail.follow_batches(self.stop):
            self.got.put(lines)

    def take(self, count: int) -> list[list[bytes]]:
        """Lists until they hold ``count`` lines in all."""
        lists: list[list[bytes]] = []
        while sum(map(len, lists)) < count:
            lists.append(self.got.get(timeout=DEADLINE))
        return lists

    def close(self) -> None:
        self.stop.set()
        (self.tail.path.parent / "wake-up").touch()  # wakes an inotify wait at once
        self.thread.join(DEADLINE)
        self.tail.close()
        assert not self.thread.is_alive()


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "polling"])
def test_follow_picks_up_appended_lines_and_survives_rotations(
        tmp_path: Path, follower_for: list[Follower], inotify: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    if not inotify:
        monkeypatch.setattr(tail, "DirWatch", PollingWatch)
    # with inotify, only being woken can deliver within DEADLINE: it never polls
    poll_interval = 0.2 if not inotify else 10 * DEADLINE
    path = tmp_path / "flows.jsonl"
    old = many(3)
    write(path, old)
    reader = FlowReader(path, poll_interval=poll_interval)
    assert list(reader.history()) == old  # then follow from exactly there
    follower = Follower(reader)
    follower_for.append(follower)
    sink = JsonlSink(path, max_bytes=4096, backups=50)
    first = many(1, start=3)
    sink.on_flow(first[0])
    sink.flush()
    assert follower.take(1) == first
    # enough to rotate several times, written in bursts the follower cannot keep apart
    burst = many(40, start=4)
    for record in burst:
        sink.on_flow(record)
    sink.flush()
    assert (tmp_path / "flows.jsonl.2").exists()
    assert follower.take(len(burst)) == burst
    last = many(1, start=44)
    sink.on_flow(last[0])
    sink.close()
    assert follower.take(1) == last
    assert follower.got.empty()


def test_follow_batches_hands_over_each_read_whole_and_a_rotated_file_in_bounded_lists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tail, "_BATCH_LINES", 3)
    path = tmp_path / "flows.jsonl"
    path.write_bytes(b"old\n")
    line_tail = tail.LineTail(path, poll_interval=10 * DEADLINE)  # only inotify wakes it
    assert list(line_tail.history()) == [b"old"]
    follower = BatchFollower(line_tail)
    try:
        with path.open("ab") as fh:
            fh.write(b"a\nb\n")
        assert follower.take(2) == [[b"a", b"b"]]  # one write, one list
        # two rotations at once, as the follower sees them: its file becomes .2, a file it
        # has not read is .1 (read in lists of at most 3), and a new one is current
        os.link(path, path.with_name("flows.jsonl.2"))
        (tmp_path / "unread").write_bytes(b"".join(b"r%d\n" % i for i in range(7)))
        (tmp_path / "current").write_bytes(b"new\n")
        os.replace(tmp_path / "unread", path.with_name("flows.jsonl.1"))
        os.replace(tmp_path / "current", path)
        lists = follower.take(8)
        assert [line for lines in lists for line in lines] == \
            [b"r0", b"r1", b"r2", b"r3", b"r4", b"r5", b"r6", b"new"]
        assert all(0 < len(lines) <= 3 for lines in lists)
        assert [len(lines) for lines in lists[:3]] == [3, 3, 1]
    finally:
        follower.close()
    assert follower.got.empty()


def test_a_rotation_while_the_follower_lists_the_rotated_files_loses_no_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer rotates again just after the follower listed the names (as a fast writer
    does while the follower reads a large rotated file): the follower must look again, not
    read the names as they were, which would skip the file in between."""
    path = tmp_path / "flows.jsonl"
    path.write_bytes(b"x1\n")
    line_tail = tail.LineTail(path, poll_interval=10 * DEADLINE)  # only inotify wakes it
    assert list(line_tail.history()) == [b"x1"]
    real_rotated_files = tail.rotated_files

    def rotate(new: bytes) -> None:
        """As JsonlSink does (.n -> .n+1, current -> .1, a new current), but with no moment
        without a current file, so that the follower sees the rotation whole."""
        for n in sorted((int(p.name.rsplit(".", 1)[1]) for p in real_rotated_files(path)),
                        reverse=True):
            os.replace(path.with_name(f"flows.jsonl.{n}"), path.with_name(f"flows.jsonl.{n + 1}"))
        (tmp_path / "next").write_bytes(new)
        os.link(path, path.with_name("flows.jsonl.1"))
        os.replace(tmp_path / "next", path)

    rotated_meanwhile = threading.Event()

    def listed_then_rotated(of: Path) -> list[Path]:
        names = real_rotated_files(of)
        if not rotated_meanwhile.is_set():
            rotated_meanwhile.set()
            rotate(b"z1\n")  # y1's file moves from the current name to .1, x1's to .2
        return names

    follower = BatchFollower(line_tail)
    try:
        with path.open("ab") as fh:
            fh.write(b"x2\n")
        assert follower.take(1) == [[b"x2"]]  # following x1's file
        monkeypatch.setattr(tail, "rotated_files", listed_then_rotated)
        rotate(b"y1\n")
        lines = [line for lines in follower.take(2) for line in lines]
        assert rotated_meanwhile.is_set()
        assert lines == [b"y1", b"z1"]
    finally:
        follower.close()
    assert follower.got.empty()


def test_a_rotation_while_the_history_is_listed_loses_no_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, for the history read before following: the files are the ones the names
    held at one moment, each read once, in order."""
    path = tmp_path / "flows.jsonl"
    path.with_name("flows.jsonl.1").write_bytes(b"a1\n")
    path.write_bytes(b"b1\n")
    real_rotated_files = tail.rotated_files
    rotated_meanwhile = threading.Event()

    def listed_then_rotated(of: Path) -> list[Path]:
        names = real_rotated_files(of)
        if not rotated_meanwhile.is_set():
            rotated_meanwhile.set()
            os.replace(path.with_name("flows.jsonl.1"), path.with_name("flows.jsonl.2"))
            os.replace(path, path.with_name("flows.jsonl.1"))
            path.write_bytes(b"c1\n")
        return names

    monkeypatch.setattr(tail, "rotated_files", listed_then_rotated)
    line_tail = tail.LineTail(path)
    try:
        assert list(line_tail.history()) == [b"a1", b"b1", b"c1"]
    finally:
        line_tail.close()
    assert rotated_meanwhile.is_set()


def test_follow_applies_the_filter_and_waits_for_the_file(
        tmp_path: Path, follower_for: list[Follower]) -> None:
    path = tmp_path / "flows.jsonl"  # not there yet: the daemon has not started
    reader = FlowReader(path, FlowFilter(verdict=Verdict.DENIED), poll_interval=0.2)
    assert list(reader.history()) == []  # everything so far; then all that comes
    follower = Follower(reader)
    follower_for.append(follower)
    write(path, sample())
    assert follower.take(3) == [r for r in sample() if r.verdict == Verdict.DENIED]


def test_observe_follow_stops_on_request(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    write(path, sample()[:2])
    out, err, stop = io.StringIO(), io.StringIO(), threading.Event()
    options = ObserveOptions(path=path, filter=FlowFilter(), follow=True, json=True, last=1,
                             poll_interval=0.2)
    thread = threading.Thread(target=observe, args=(options, out, err, stop))
    thread.start()
    stop.set()
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert [from_json(line) for line in out.getvalue().splitlines()] == sample()[1:2]
