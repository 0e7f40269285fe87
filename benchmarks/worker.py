"""The load generator in Python: the fallback for benchmarks/worker.c when no
C compiler is available. Same command line, same JSON. Its own per-call
overhead (microseconds) is much larger than the BPF programs' cost, so the
ratios it yields understate ztnet's share; the report says which worker ran.

    python -m benchmarks.worker listen
    python -m benchmarks.worker tcp|udp|deny HOST PORT N
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

_LINGER_RST = struct.pack("ii", 1, 0)  # close() sends RST: no TIME_WAIT left behind


def listen_forever() -> int:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(65535)
    print(json.dumps({"port": server.getsockname()[1]}), flush=True)
    while True:
        try:
            conn, _ = server.accept()
            conn.close()
        except OSError:
            continue


def _rate(calls: int, elapsed: int, cpu: int, failed: int, first_errno: int) -> int:
    print(json.dumps({"calls": calls, "ns": elapsed, "cpu_ns": cpu, "failed": failed,
                      "first_errno": first_errno}))
    return int(failed != 0)


def tcp_connects(address: tuple[str, int], n: int) -> int:
    failed = first_errno = 0
    start, start_cpu = time.perf_counter_ns(), time.process_time_ns()
    for _ in range(n):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        error = sock.connect_ex(address)
        if error:
            failed += 1
            first_errno = first_errno or error
        sock.close()
    return _rate(n, time.perf_counter_ns() - start, time.process_time_ns() - start_cpu, failed,
                 first_errno)


def udp_connects(address: tuple[str, int], n: int) -> int:
    failed = first_errno = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        connect = sock.connect_ex
        start, start_cpu = time.perf_counter_ns(), time.process_time_ns()
        for _ in range(n):
            error = connect(address)
            if error:
                failed += 1
                first_errno = first_errno or error
        elapsed, cpu = time.perf_counter_ns() - start, time.process_time_ns() - start_cpu
    return _rate(n, elapsed, cpu, failed, first_errno)


def denied_connects(address: tuple[str, int], n: int) -> int:
    latencies = []
    succeeded = last_errno = 0
    clock = time.perf_counter_ns
    for _ in range(n):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            t0 = clock()
            error = sock.connect_ex(address)
            latencies.append(clock() - t0)
        if error:
            last_errno = error
        else:
            succeeded += 1
    latencies.sort()
    print(json.dumps({"calls": n, "mean_ns": sum(latencies) / n, "p50_ns": latencies[n // 2],
                      "p99_ns": latencies[n * 99 // 100], "min_ns": latencies[0],
                      "succeeded": succeeded, "errno": last_errno}))
    return int(succeeded != 0)


def main(argv: list[str]) -> int:
    if argv == ["listen"]:
        return listen_forever()
    if len(argv) != 4 or argv[0] not in ("tcp", "udp", "deny") or int(argv[3]) <= 0:
        print(__doc__, file=sys.stderr)
        return 2
    mode, host, port, n = argv[0], argv[1], int(argv[2]), int(argv[3])
    run = {"tcp": tcp_connects, "udp": udp_connects, "deny": denied_connects}[mode]
    return run((host, port), n)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
