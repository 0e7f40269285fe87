"""The agent side of benchmarks/controller.py: a long-lived process, started as
an agent with `ztnet run`, that notices the moment a grant starts to admit it.

    ztnet run --instance I --agent A -- python -m benchmarks.apply_probe

Commands on stdin, one per line; one JSON line on stdout per command:

    check PORT   one non-blocking connect() to 127.0.0.1:PORT
                 → {"port": P, "errno": E}            (0 or EINPROGRESS: admitted)
    wait PORT    the port must be denied now (EPERM), else
                 → {"port": P, "error": "...", "errno": E}
                 otherwise → {"armed": P}, then connect() again and again until a
                 result is not EPERM
                 → {"port": P, "admitted_at": T, "errno": E, "attempts": N}

``admitted_at`` is time.monotonic() (CLOCK_MONOTONIC, the same clock in every
process) read right after the first connect() that was not refused with
EPERM, so the benchmark can compare it with the moment it called
ApplyPolicy without counting the pipe. Between attempts the probe pauses
``--pause-us`` microseconds (default 0: a tight loop). A wait gives up after
``--limit`` seconds (→ {"port": P, "error": "timeout", "attempts": N}).
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import struct
import sys
import time

HOST = "127.0.0.1"
_LINGER_RST = struct.pack("ii", 1, 0)  # close() sends RST: no TIME_WAIT left behind


def attempt(port: int) -> int:
    """One non-blocking connect(): 0, EINPROGRESS, EPERM (ztnet), …"""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        return sock.connect_ex((HOST, port))
    finally:
        sock.close()


def wait_admitted(port: int, pause: float, limit: float) -> dict[str, object]:
    first = attempt(port)
    if first != errno.EPERM:
        return {"port": port, "error": "not denied before the apply", "errno": first}
    say({"armed": port})
    clock = time.monotonic
    deadline = clock() + limit
    attempts = 1
    while True:
        error = attempt(port)
        now = clock()
        attempts += 1
        if error != errno.EPERM:
            return {"port": port, "admitted_at": now, "errno": error, "attempts": attempts}
        if now > deadline:
            return {"port": port, "error": "timeout", "attempts": attempts}
        if pause:
            time.sleep(pause)


def say(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.apply_probe")
    parser.add_argument("--pause-us", type=float, default=0.0)
    parser.add_argument("--limit", type=float, default=30.0)
    args = parser.parse_args(argv)
    say({"ready": True})
    for line in sys.stdin:
        command, _, value = line.strip().partition(" ")
        if not command:
            break
        port = int(value)
        if command == "check":
            say({"port": port, "errno": attempt(port)})
        elif command == "wait":
            say(wait_admitted(port, args.pause_us / 1e6, args.limit))
        else:
            say({"error": f"unknown command {command!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
