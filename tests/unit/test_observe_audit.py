"""The hash-chained audit trail: verify passes on an intact log and finds
every edit, deletion, reordering and truncation; `ztnet audit verify`."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.unit.test_observe_records import denied_event, make_ctx, make_record
from ztnet.cli import main
from ztnet.errors import ConfigError
from ztnet.observe.audit import (
    BUNDLE_APPLIED,
    FLOW_DENIED,
    GENESIS,
    GRANT_ADDED,
    GRANT_REMOVED,
    AuditLog,
    AuditSink,
    Head,
    canonical,
    head_path,
    last_applied,
    record_hash,
    verify,
)
from ztnet.observe.records import from_event


def write_log(path: Path, count: int = 6) -> AuditLog:
    log = AuditLog(path)
    for i in range(count):
        log.append("grant.added", {"id": f"g-{i:016x}", "agent": "bot", "n": i})
    return log


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rewrite(path: Path, new_lines: list[bytes]) -> None:
    path.write_bytes(b"".join(new_lines))


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    write_log(path).close()
    return path


def test_an_intact_log_verifies(log_path: Path) -> None:
    report = verify(log_path)
    assert report.ok and report.records == 6 and report.notes == ()
    assert report.last == Head.parse(head_path(log_path).read_text())
    first = json.loads(lines(log_path)[0])
    assert first["seq"] == 1 and first["prev"] == GENESIS
    assert first["hash"] == record_hash(first) and first["kind"] == "grant.added"
    assert json.loads(lines(log_path)[1])["prev"] == first["hash"]
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600


def test_an_edited_record_fails_at_its_line(log_path: Path) -> None:
    content = lines(log_path)
    content[2] = content[2].replace(b'"agent":"bot"', b'"agent":"eve"')
    rewrite(log_path, content)
    report = verify(log_path)
    assert not report.ok and (report.line, report.kind) == (3, "edited")
    assert report.records == 2 and "hash mismatch" in (report.problem or "")


def test_an_edit_with_a_recomputed_hash_breaks_the_chain(log_path: Path) -> None:
    content = lines(log_path)
    entry = json.loads(content[2])
    entry["fields"]["agent"] = "eve"
    entry["hash"] = record_hash(entry)
    content[2] = canonical(entry) + b"\n"
    rewrite(log_path, content)
    report = verify(log_path)
    assert (report.line, report.kind) == (4, "edited") and "prev" in (report.problem or "")


def test_a_reformatted_line_is_reported(log_path: Path) -> None:
    content = lines(log_path)
    content[1] = json.dumps(json.loads(content[1]), indent=1).replace("\n", "").encode() + b"\n"
    rewrite(log_path, content)
    assert (verify(log_path).line, verify(log_path).kind) == (2, "malformed")


def test_a_deleted_record_fails_at_the_gap(log_path: Path) -> None:
    content = lines(log_path)
    del content[2]
    rewrite(log_path, content)
    report = verify(log_path)
    assert (report.line, report.kind) == (3, "deleted")
    assert "records 3..3 were deleted" in (report.problem or "")


def test_deleting_the_first_record_is_found(log_path: Path) -> None:
    rewrite(log_path, lines(log_path)[1:])
    assert (verify(log_path).line, verify(log_path).kind) == (1, "deleted")


def test_reordered_records_fail(log_path: Path) -> None:
    content = lines(log_path)
    content[2], content[3] = content[3], content[2]
    rewrite(log_path, content)
    report = verify(log_path)
    assert (report.line, report.kind) == (3, "reordered")


def test_a_truncated_log_fails_against_its_head(log_path: Path) -> None:
    rewrite(log_path, lines(log_path)[:4])
    report = verify(log_path)
    assert not report.ok and report.kind == "truncated" and report.line == 5
    assert "ends at seq 4" in (report.problem or "") and "says 6" in (report.problem or "")


def test_without_a_head_truncation_is_a_note_and_an_anchor_still_finds_it(
        log_path: Path) -> None:
    anchor = verify(log_path).last
    head_path(log_path).unlink()
    rewrite(log_path, lines(log_path)[:4])
    report = verify(log_path)
    assert report.ok and "cannot be detected" in report.notes[0]
    assert verify(log_path, head=anchor).kind == "truncated"
    assert verify(log_path, head=Head(anchor.seq - 2, "0" * 64)).kind == "edited"


def test_reopening_continues_the_chain(log_path: Path) -> None:
    log = AuditLog(log_path)
    assert log.head.seq == 6
    log.append("bundle.applied", {"version": 8})
    log.close()
    report = verify(log_path)
    assert report.ok and report.records == 7


def test_a_torn_last_line_is_dropped_on_reopen(log_path: Path) -> None:
    with open(log_path, "ab") as fh:
        fh.write(b'{"fields":{"n":')  # a crash mid-write: never acknowledged
    AuditLog(log_path).close()
    assert verify(log_path).ok and verify(log_path).records == 6


def test_a_damaged_end_does_not_stop_the_log(log_path: Path) -> None:
    with open(log_path, "ab") as fh:
        fh.write(b"garbage\n")
    log = AuditLog(log_path)
    assert log.head.seq == 6
    log.append("bundle.applied", {"version": 9})
    log.close()
    report = verify(log_path)
    assert (report.line, report.kind) == (7, "malformed")


def test_reopening_a_truncated_log_keeps_the_gap_visible(log_path: Path) -> None:
    rewrite(log_path, lines(log_path)[:4])
    log = AuditLog(log_path)
    assert log.head.seq == 6
    log.append("bundle.applied", {"version": 9})
    log.close()
    report = verify(log_path)
    assert (report.line, report.kind) == (5, "deleted")


def test_unsynced_appends_reach_disk_on_sync(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("a", {}, sync=False)
    log.append("b", {}, sync=False)
    assert not head_path(path).exists()
    log.sync()
    assert Head.parse(head_path(path).read_text()).seq == 2
    log.close()


def test_the_audit_sink_records_denied_flows_only(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    sink = AuditSink(log)
    sink.on_flow(make_record())
    denied = from_event(denied_event(suppressed=5), make_ctx())
    sink.on_flow(denied)
    sink.flush()
    log.close()
    (entry,) = [json.loads(line) for line in lines(tmp_path / "audit.jsonl")]
    assert entry["kind"] == FLOW_DENIED and entry["fields"]["uuid"] == denied.uuid
    assert entry["fields"]["reason"] == "NO_GRANT" and entry["fields"]["suppressed"] == 5
    assert verify(tmp_path / "audit.jsonl").ok


def test_cli_verify_ok_and_fail(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(log_path)]) == 0
    assert capsys.readouterr().out.startswith("OK: 6 records")
    content = lines(log_path)
    del content[1]
    rewrite(log_path, content)
    assert main(["audit", "verify", str(log_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL:") and "line 2: deleted" in out


def test_cli_verify_against_an_anchor(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head = verify(log_path).last
    rewrite(log_path, lines(log_path)[:-1])
    head_path(log_path).unlink()
    assert main(["audit", "verify", str(log_path), "--head", f"{head.seq}:{head.hash}"]) == 1
    assert "truncated" in capsys.readouterr().out
    assert main(["audit", "verify", str(log_path), "--head", "nonsense"]) == ConfigError.exit_code


def test_cli_verify_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(tmp_path / "nope")]) == ConfigError.exit_code
    assert "cannot read" in capsys.readouterr().err


def test_append_many_writes_what_append_writes(tmp_path: Path) -> None:
    one, many = AuditLog(tmp_path / "one.jsonl"), AuditLog(tmp_path / "many.jsonl")
    records = [{"id": f"g-{i:016x}", "agent": "bot", "to": "10.0.0.0/8", "n": i,
                "note": 'q"\\ \u00e9', "nested": {"b": 1, "a": [1, 2]}} for i in range(5000)]
    for fields in records:
        one.append("grant.added", fields, sync=False)
    many.append_many("grant.added", records)
    one.close()
    many.close()
    lines_one = (tmp_path / "one.jsonl").read_text().splitlines()
    lines_many = (tmp_path / "many.jsonl").read_text().splitlines()
    assert len(lines_many) == len(lines_one) == 5000
    for mine, theirs in zip(lines_many, lines_one, strict=True):
        a, b = json.loads(mine), json.loads(theirs)
        assert a["hash"] == record_hash(a) and canonical(a).decode() == mine
        blank = {"time": "", "hash": "", "prev": ""}
        assert {**a, **blank} == {**b, **blank}
    assert verify(tmp_path / "many.jsonl").ok


def test_the_last_applied_bundle_and_the_grant_records_after_it_are_found(
        tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    assert last_applied(path) is None  # no trail yet
    log = AuditLog(path)
    log.append(BUNDLE_APPLIED, {"version": 1, "added": 1, "removed": 0})
    log.append(GRANT_ADDED, {"id": "g-1"})
    assert last_applied(path) == last_applied(path, max_bytes=1 << 20)
    applied = log.append(BUNDLE_APPLIED, {"version": 2, "added": 2, "removed": 1})
    log.append(GRANT_ADDED, {"id": "g-2"})
    # a hostile string that spells a record's kind is escaped: it is not counted
    log.append(FLOW_DENIED, {"comm": '","kind":"grant.added","prev":"', "kind": "grant.added"})
    log.append(GRANT_ADDED, {"id": "g-3"})
    log.append(GRANT_REMOVED, {"id": "g-1"})
    log.close()
    last = last_applied(path)
    assert last is not None
    assert (last.seq, last.fields["version"], last.grant_records) == (applied.seq, 2, 3)
    lines = path.read_text().splitlines()
    for chunk in (7, 100, 301, 1 << 20):  # records cut across chunks are read whole
        assert last_applied(path, chunk=chunk) == last
    # the search stops within max_bytes of the end: the record must lie wholly inside
    record_starts = len(lines[0]) + len(lines[1]) + 2
    size = path.stat().st_size
    assert last_applied(path, max_bytes=size - record_starts, chunk=50) == last
    assert last_applied(path, max_bytes=size - record_starts - 60, chunk=50) is None
    lines[2] = lines[2].replace('"version":2', '"version":3')  # its hash no longer matches
    path.write_text("\n".join(lines) + "\n")
    assert last_applied(path) is None
