"""The batch path of the flow pipeline, without a kernel: the ``struct`` layout derived from
the ABI mirror, the batch decoder, ``from_events`` (the same records as ``from_event``),
``encode_lines`` and the batch sinks (the same lines and counts as one record at a time).
The mmap ring reader itself runs on real rings in tests/kernel/test_flows.py."""

from __future__ import annotations

import ctypes
import ipaddress
import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from tests.unit.test_observe_records import denied_event, flow_end_event, make_ctx, make_event
from ztnet.datapath import abi
from ztnet.datapath.compile import BootClock
from ztnet.datapath.events import EVENT_FIELDS, EVENT_LAYOUT, Decoder, KernelEvent
from ztnet.observe.metrics import FlowMetrics
from ztnet.observe.records import (
    AgentRef,
    CachedExe,
    DnsQuery,
    EventType,
    FlowCounters,
    FlowRecord,
    GrantRef,
    Process,
    Verdict,
    encode_lines,
    from_event,
    from_events,
    to_json,
)
from ztnet.observe.sinks import JsonlSink

OFFSET_NS = 1_700_000_000 * 10**9


def raw_event(**fields: object) -> abi.ZtEvent:
    event = abi.ZtEvent()
    flow = fields.pop("flow", {})
    for name, value in fields.items():
        setattr(event, name, value)
    for name, value in flow.items():  # type: ignore[attr-defined]
        setattr(event.flow, name, value)
    return event


def test_the_struct_layout_has_the_offsets_of_the_abi_mirror() -> None:
    assert EVENT_LAYOUT.size == ctypes.sizeof(abi.ZtEvent)
    # every leaf field gets a distinct value; unpacking must find each where ctypes put it
    event, expected = abi.ZtEvent(), {}
    counter = itertools.count(1)
    for name in EVENT_FIELDS:
        target, leaf = (event.flow, name[5:]) if name.startswith("flow.") else (event, name)
        ftype = dict(type(target)._fields_)[leaf]
        if issubclass(ftype, ctypes.Array):
            value: object = bytes([next(counter) % 250 + 1]) * ctypes.sizeof(ftype)
            ctypes.memmove(ctypes.addressof(target) + getattr(type(target), leaf).offset,
                           value, ctypes.sizeof(ftype))  # type: ignore[arg-type]
        else:
            value = next(counter) % (1 << (8 * ctypes.sizeof(ftype)))
            setattr(target, leaf, value)
        expected[name] = value
    assert dict(zip(EVENT_FIELDS, EVENT_LAYOUT.unpack(bytes(event)), strict=True)) == expected


def test_the_decoder_turns_raw_records_into_events() -> None:
    decoder = Decoder(BootClock(OFFSET_NS))
    v4 = raw_event(time_ns=5 * 10**9, cookie=77, suppressed=3, kind=abi.ZtEventKind.FLOW_END,
                   verdict=abi.ZtVerdict.ALLOWED, reason=abi.ZtReason.GRANTED, flow=dict(
                       grant_id=0xABC, cgroup_id=9, packets_out=5, bytes_out=1300,
                       packets_in=4, bytes_in=2600, first_ns=4 * 10**9, last_ns=5 * 10**9,
                       agent=1, pid=11, tgid=10, uid=1000, proto=6, family=4,
                       dport_be=0xBB01, sport_be=0x409C, comm=b"curl"))
    ctypes.memmove(v4.flow.saddr, ipaddress.ip_address("10.0.1.5").packed, 4)
    ctypes.memmove(v4.flow.daddr, ipaddress.ip_address("10.0.2.7").packed, 4)
    v6 = raw_event(time_ns=6 * 10**9, kind=abi.ZtEventKind.CONNECT,
                   verdict=abi.ZtVerdict.DENIED, reason=abi.ZtReason.NO_GRANT,
                   flow=dict(family=6, proto=17, dport_be=0x3500, comm=b"a-long-comm-name"))
    ctypes.memmove(v6.flow.daddr, ipaddress.ip_address("2001:db8::5").packed, 16)
    unknown = raw_event(kind=99)
    events, bad = decoder.decode([EVENT_LAYOUT.unpack(bytes(r)) for r in (v4, v6, unknown)])
    assert bad == 1
    assert events[0] == KernelEvent(
        abi.ZtEventKind.FLOW_END, abi.ZtVerdict.ALLOWED, abi.ZtReason.GRANTED, 1_700_000_005.0,
        77, 9, 0xABC, 1, 11, 10, 1000, "curl", 6, 4, "10.0.1.5", 40000, "10.0.2.7", 443, 3,
        5, 1300, 4, 2600, 1_700_000_004.0, 1_700_000_005.0)
    assert (events[1].destination, events[1].destination_port, events[1].source) == \
        ("2001:db8::5", 53, "")
    assert events[1].comm == "a-long-comm-name" and events[1].first_seen == 0.0


def varied_events() -> list[KernelEvent]:
    out = []
    for i in range(300):
        kind = i % 3
        event = (flow_end_event if kind == 0 else denied_event if kind == 1 else make_event)(
            cookie=1000 + i, tgid=2000 + i % 7, comm=f"p{i % 5}",
            agent_index=i % 4, time=1_800_000_000.0 + i * 0.001, destination_port=1 + i,
            proto=(6, 17, 1)[i % 3], family=(abi.ZtFamily.V4, abi.ZtFamily.V6)[i % 2],
            destination="10.0.2.7" if i % 2 == 0 else "2001:db8::1",
            grant_id=(0, 0xABC, 0x999)[i % 3], suppressed=i % 2)
        out.append(event)
    return out


def test_from_events_makes_the_records_from_event_makes() -> None:
    events = varied_events()
    ctx = make_ctx()
    assert from_events(events, ctx) == [from_event(e, ctx) for e in events]
    cached = make_ctx(exe=CachedExe(lambda tgid: f"/bin/{tgid}"))
    assert from_events(events, cached) == [from_event(e, cached) for e in events]


def test_the_exe_cache_resolves_again_after_an_exec_or_its_ttl() -> None:
    paths = {10: "/bin/sh"}
    calls: list[int] = []

    def resolve(tgid: int) -> str:
        calls.append(tgid)
        return paths.get(tgid, "")

    exe = CachedExe(resolve, ttl=1.0)
    assert exe.cached(10, "sh", 100.0) == "/bin/sh"
    paths[10] = "/usr/bin/curl"
    assert exe.cached(10, "sh", 100.5) == "/bin/sh" and len(calls) == 1  # fresh: no readlink
    assert exe.cached(10, "curl", 100.6) == "/usr/bin/curl"  # the comm changed: exec
    paths[10] = "/usr/bin/wget"
    assert exe.cached(10, "curl", 101.7) == "/usr/bin/wget"  # ttl passed
    del paths[10]
    assert exe.cached(10, "x", 101.8) == "/usr/bin/wget"  # gone: the last path seen


def test_encode_lines_is_to_json_once_per_batch() -> None:
    records = from_events(varied_events(), make_ctx())
    lines = encode_lines(records)
    assert lines == [to_json(r).encode() for r in records]
    assert encode_lines(records) is lines
    assert encode_lines(list(records)) is not lines


# any text, lone surrogates (a non-UTF-8 executable path) and control characters included
TEXT = st.text(st.characters(exclude_categories=()), max_size=12)
U64 = st.integers(0, 2**64 - 1)


@st.composite
def flow_records(draw: st.DrawFn) -> list[FlowRecord]:
    """A batch whose records share some processes, agents and grants (as from_events
    builds them) and differ in everything else."""
    processes = draw(st.lists(st.builds(Process, U64, U64, TEXT, TEXT, U64), min_size=1,
                              max_size=3))
    agents = draw(st.lists(st.builds(AgentRef, TEXT, TEXT, U64), min_size=1, max_size=3))
    grants = draw(st.lists(st.none() | st.builds(GrantRef, U64, U64, TEXT), min_size=1,
                           max_size=3))
    hosts = draw(st.lists(TEXT, min_size=1, max_size=2))
    record = st.builds(
        FlowRecord, TEXT, st.integers(0, 2**63 - 1), st.sampled_from(hosts),
        st.sampled_from(EventType), st.sampled_from(Verdict), TEXT, st.sampled_from([4, 6]),
        st.sampled_from([1, 6, 17, 58, 0, 132, 255]), TEXT, st.integers(0, 65535), TEXT,
        st.integers(0, 65535), U64, U64, st.sampled_from(processes), st.sampled_from(agents),
        st.sampled_from(grants),
        st.none() | st.builds(FlowCounters, U64, U64, U64, U64, st.integers(0, 2**63 - 1),
                              st.integers(0, 2**63 - 1)),
        U64, st.lists(TEXT, max_size=2).map(tuple),
        st.none() | st.builds(DnsQuery, TEXT, TEXT, TEXT, TEXT))
    return draw(st.lists(record, min_size=1, max_size=8))


@given(flow_records())
def test_the_batch_encoder_writes_the_bytes_of_the_one_record_encoder(
        batch: list[FlowRecord]) -> None:
    assert encode_lines(batch) == [to_json(record).encode() for record in batch]


def test_batch_sinks_write_and_count_what_one_record_at_a_time_does(tmp_path: Path) -> None:
    records = from_events(varied_events(), make_ctx())
    one, batch = JsonlSink(tmp_path / "one.jsonl"), JsonlSink(tmp_path / "batch.jsonl")
    m_one, m_batch = FlowMetrics(), FlowMetrics()
    for record in records:
        one.on_flow(record)
        m_one.on_flow(record)
    batch.on_flows(records)
    m_batch.on_flows(records)
    one.close()
    batch.close()
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "batch.jsonl").read_bytes()
    def samples(metrics: FlowMetrics) -> set[str]:  # creation times differ, of course
        return {line for line in generate_latest(metrics.registry).decode().splitlines()
                if "_created" not in line}

    assert samples(m_one) == samples(m_batch)


@pytest.mark.parametrize("max_bytes", [4096, 20_000])
def test_a_batch_crossing_the_size_bound_rotates_at_the_right_line(
        tmp_path: Path, max_bytes: int) -> None:
    records = from_events(varied_events(), make_ctx())
    one = JsonlSink(tmp_path / "a" / "flows.jsonl", max_bytes=max_bytes, backups=100)
    batch = JsonlSink(tmp_path / "b" / "flows.jsonl", max_bytes=max_bytes, backups=100)
    for record in records:
        one.on_flow(record)
    for start in range(0, len(records), 64):
        batch.on_flows(records[start:start + 64])
    one.close()
    batch.close()
    a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert a == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(a) > 1
    for name in a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
