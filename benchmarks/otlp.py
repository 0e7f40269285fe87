"""OTLP export rate: how many flow records a second ``ztnet.observe.otlp.OtlpExporter`` sends
to a real OTLP receiver, and its CPU per record (no root).

    .venv/bin/python -m benchmarks.otlp [--records 50000] [--repeats 3] [--batch 512]

The receiver (ztnet.testing.otlp: opentelemetry-proto's LogsService, gRPC on loopback) runs
in a child process, so its decoding is not counted. This process builds ``--records``
records (allowed connects and flow ends, as benchmarks/record_cost.py makes them), hands
them to the exporter at once (what the daemon's reader or the controller's ingest does: a
queue append), and waits until the receiver has acknowledged every one. Reported per run:
records per second from the first submit to the last acknowledgement, and this process's
CPU time (user + system, all threads: the exporter's thread does everything) per record;
the median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from benchmarks.record_cost import events
from ztnet.observe import records
from ztnet.observe.otlp import OtlpExporter
from ztnet.testing.otlp import OtlpReceiver


def receive() -> int:
    """The child: serve until stdin closes, print how many records arrived on each line read."""
    with OtlpReceiver() as receiver:
        print(json.dumps({"endpoint": receiver.endpoint}), flush=True)
        for _ in sys.stdin:
            print(json.dumps({"logs": len(receiver.logs)}), flush=True)
    return 0


def run(endpoint: str, recs: list[records.FlowRecord], batch: int) -> dict[str, float]:
    exporter = OtlpExporter(endpoint, service="ztnet-bench", host="bench-host",
                            queue_size=len(recs), batch_size=batch)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        assert exporter.submit_many(recs) == len(recs)
        if not exporter.wait_idle(600):
            raise RuntimeError(f"export did not finish: {exporter.stats()}")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stats = exporter.stats()
    finally:
        exporter.close()
    if stats.exported != len(recs):
        raise RuntimeError(f"lost records: {stats}")
    return {"records_per_s": len(recs) / wall, "cpu_us_per_record": cpu / len(recs) * 1e6}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.otlp")
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=512, help="records per Export call")
    parser.add_argument("--receive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receive:
        return receive()
    ctx = records.RecordContext(host="bench-host", trust_domain="bench.example",
                                agent_names={1: "bot"}, exe=lambda _tgid: "/usr/bin/agent")
    recs = [records.from_event(e, ctx) for e in events(args.records)]
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.otlp", "--receive"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        endpoint = json.loads(child.stdout.readline())["endpoint"]
        results = []
        for _ in range(args.repeats):
            results.append(run(endpoint, recs, args.batch))
            print(json.dumps({k: round(v, 1) for k, v in results[-1].items()}), flush=True)
        child.stdin.write("\n")
        child.stdin.flush()
        received = json.loads(child.stdout.readline())["logs"]
    finally:
        child.stdin.close()
        child.wait(30)
    if received != args.records * args.repeats:
        raise RuntimeError(f"the receiver got {received} of {args.records * args.repeats}")
    rate = statistics.median(r["records_per_s"] for r in results)
    cpu = statistics.median(r["cpu_us_per_record"] for r in results)
    print(f"OTLP export: {rate:,.0f} records/s, {cpu:.1f} µs CPU per record (median of "
          f"{args.repeats} x {args.records:,}, batches of {args.batch}; receiver in its own "
          f"process got all {received:,})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
