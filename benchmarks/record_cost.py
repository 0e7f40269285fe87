"""Userspace cost of one flow record in the daemon, stage by stage (no root, no kernel).

    .venv/bin/python -m benchmarks.record_cost [--records 20000] [--repeats 5]

Builds synthetic kernel events (allowed connects and flow ends of one agent, as the daemon
sees them) and times, per record: ``records.from_event`` (of which ``record_uuid``),
``records.to_json``, the flow log's ``JsonlSink.on_flow`` + flush (to a file in a temporary
directory), the metrics sink's ``on_flow``; then the controller's path of a ReportFlows
batch: ``records.from_json``, its whole check (``flows.decode_batch``), ``store_flows``
into a fresh SQLite store with its checkpointer running (as `controller serve` runs it),
and the detectors (``observe`` and the ``Engine`` with the default settings). The median
of ``--repeats`` runs is printed in µs of CPU time per record (CPU time, not wall time: a
loaded machine moves it less; the store's includes its checkpointer thread). benchmarks/
flows.py measures the whole pipeline with a real daemon; this one says where its time goes.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ztnet.controller import flows
from ztnet.controller.detect.engine import Engine
from ztnet.controller.detect.observation import Observation, observe
from ztnet.controller.flowstore import FlowRow
from ztnet.controller.store import SqliteStore
from ztnet.datapath import abi
from ztnet.datapath.compile import BootClock
from ztnet.datapath.events import EVENT_LAYOUT, READ_BATCH, RING_LAYOUT, Decoder, KernelEvent
from ztnet.observe import metrics, records, sinks
from ztnet.observe.records import FlowRecord
from ztnet.policy.detection import Detection


def events(count: int) -> list[KernelEvent]:
    now = time.time()
    out = []
    for i in range(count):
        end = i % 2 == 1
        out.append(KernelEvent(
            abi.ZtEventKind.FLOW_END if end else abi.ZtEventKind.CONNECT,
            abi.ZtVerdict.ALLOWED, abi.ZtReason(0), now + i * 1e-5, 10_000 + i // 2, 4242,
            77, 1, 1000 + i % 7, 1000 + i % 7, 0, "agent-worker", 6, 4, "10.199.1.1",
            40_000 + i % 20_000, "10.199.1.2", 5200, 0, 3 if end else 0, 180 if end else 0,
            2 if end else 0, 120 if end else 0, now if end else 0.0, now + 1e-4 if end else 0.0))
    return out


def per_record(fn: Callable[[], object], count: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        times.append((time.process_time() - started) / count * 1e6)
    return float(statistics.median(times))


def batch_path(evs: list[KernelEvent], count: int, repeats: int) -> dict[str, float]:
    """The daemon's path since issue 11, per stage, in batches of events.READ_BATCH: the
    raw records as the ring buffer holds them (packed ``abi.ZtEvent``s), unpacked and
    decoded, made into records, encoded once, written to the flow log and counted."""
    clock = BootClock(0)
    raws = []
    for e in evs:
        raw = abi.ZtEvent(time_ns=int(e.time * 1e9), cookie=e.cookie, kind=e.kind,
                          verdict=e.verdict, reason=e.reason)
        raw.flow.agent, raw.flow.tgid, raw.flow.pid, raw.flow.proto = 1, e.tgid, e.pid, 6
        raw.flow.family, raw.flow.dport_be, raw.flow.comm = 4, 0x5014, e.comm.encode()
        raw.flow.daddr[:4] = [10, 199, 1, 2]
        raws.append(bytes(raw))
    decoder = Decoder(clock, leading=1)
    # as the ring holds them: each behind its header, padded (RING_LAYOUT); read in runs
    header = struct.pack("<II", EVENT_LAYOUT.size, 0)
    padding = bytes(RING_LAYOUT.size - len(header) - EVENT_LAYOUT.size)
    ctx = records.RecordContext(host="bench-host", trust_domain="bench.example",
                                agent_names={1: "bot"},
                                exe=records.CachedExe(lambda _tgid: "/usr/bin/agent"))
    step = READ_BATCH
    chunks = [b"".join(header + raw + padding for raw in raws[i:i + step])
              for i in range(0, len(raws), step)]
    decoded = [decoder.decode(RING_LAYOUT.iter_unpack(chunk))[0] for chunk in chunks]
    made = [records.from_events(batch, ctx) for batch in decoded]
    flow_metrics = metrics.FlowMetrics()
    out = {
        "batch: unpack + decode": per_record(
            lambda: [decoder.decode(RING_LAYOUT.iter_unpack(chunk)) for chunk in chunks],
            count, repeats),
        "batch: from_events": per_record(
            lambda: [records.from_events(batch, ctx) for batch in decoded], count, repeats),
        "batch: metrics on_flows": per_record(
            lambda: [flow_metrics.on_flows(batch) for batch in made], count, repeats),
    }
    with tempfile.TemporaryDirectory() as tmp:
        sink = sinks.JsonlSink(Path(tmp) / "flows.jsonl", max_bytes=1 << 30)

        def write() -> None:
            for batch in made:
                sink.on_flows(list(batch))  # a new list: encoded here, as in the daemon
                sink.flush()
        out["batch: flow log on_flows + flush (encoding included)"] = per_record(
            write, count, repeats)
        sink.close()
    return out


_UPLOAD_BATCH = 500  # records per ReportFlows batch (SpoolSink's batch_records)


def ingest(lines: list[str]) -> None:
    """The controller's check of ``lines`` in ReportFlows batches of the uploader's size."""
    received_ns = time.time_ns() + 10**9  # after every record's time
    encoded = [line.encode() for line in lines]
    for i in range(0, len(encoded), _UPLOAD_BATCH):
        flows.decode_batch("bench-host", encoded[i:i + _UPLOAD_BATCH], received_ns, [])


def controller_path(lines: list[str], count: int, repeats: int) -> dict[str, float]:
    """After the check: the batch stored, then seen by the detectors."""
    received_ns = time.time_ns() + 10**9
    encoded = [line.encode() for line in lines]
    batches: list[tuple[list[FlowRow], list[FlowRecord]]] = []
    for i in range(0, len(encoded), _UPLOAD_BATCH):
        decoded: list[FlowRecord] = []
        rows = flows.decode_batch("bench-host", encoded[i:i + _UPLOAD_BATCH], received_ns,
                                  decoded)
        batches.append((rows, decoded))

    def observe_all() -> list[list[Observation]]:
        return [[observe(record) for record in decoded] for _rows, decoded in batches]
    observed = observe_all()
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        stores = iter([SqliteStore.create(Path(tmp) / f"ztnet-{n}.db", "bench.example")
                       for n in range(repeats)])

        def store() -> None:  # a fresh database each run: every row is new
            target = next(stores)
            checkpointer = target.checkpoint_in_background()
            for sequence, (rows, _decoded) in enumerate(batches, 1):
                target.store_flows("bench-host", sequence, rows)
            checkpointer.stop()
            target.close()
        out["controller: store_flows (SQLite, checkpoints)"] = per_record(store, count, repeats)
    out["controller: observe"] = per_record(observe_all, count, repeats)

    def detect() -> None:  # a fresh engine each run: learning, as after a start
        engine, settings, now = Engine(lambda _agent: None), Detection(), time.time()
        for batch in observed:
            engine.observe(batch, settings, now)
    out["controller: detection engine"] = per_record(detect, count, repeats)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.record_cost",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    evs = events(args.records)
    ctx = records.RecordContext(host="bench-host", trust_domain="bench.example",
                                agent_names={1: "bot"}, exe=lambda _tgid: "/usr/bin/agent")
    recs = [records.from_event(e, ctx) for e in evs]
    lines = [records.to_json(r) for r in recs]
    flow_metrics = metrics.FlowMetrics()
    names = [(e.cookie, str(records.EventType.CONNECT), e.destination, e.destination_port)
             for e in evs]
    results = {
        "from_event": per_record(lambda: [records.from_event(e, ctx) for e in evs],
                                 args.records, args.repeats),
        "  of which record_uuid": per_record(
            lambda: [records.record_uuid("bench-host", c, t, 1_800_000_000_000_000_000 + c, d, p)
                     for c, t, d, p in names], args.records, args.repeats),
        "to_json": per_record(lambda: [records.to_json(r) for r in recs[::-1]],
                              args.records, args.repeats),
        "metrics on_flow": per_record(lambda: [flow_metrics.on_flow(r) for r in recs],
                                      args.records, args.repeats),
        "from_json (controller)": per_record(lambda: [records.from_json(line) for line in lines],
                                             args.records, args.repeats),
        "controller: decode_batch (checks, uuid, re-encoding)": per_record(
            lambda: ingest(lines), args.records, args.repeats),
    }
    with tempfile.TemporaryDirectory() as tmp:
        sink = sinks.JsonlSink(Path(tmp) / "flows.jsonl", max_bytes=1 << 30)

        def write() -> None:
            for i, record in enumerate(recs[::-1]):
                sink.on_flow(record)
                if i % 256 == 255:
                    sink.flush()
            sink.flush()
        results["flow log on_flow + flush"] = per_record(write, args.records, args.repeats)
        sink.close()
    results.update(controller_path(lines, args.records, args.repeats))
    results.update(batch_path(evs, args.records, args.repeats))
    for name, value in results.items():
        print(f"{name:52} {value:7.2f} µs per record")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
