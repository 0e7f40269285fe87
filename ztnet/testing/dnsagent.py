"""An agent that resolves names the way applications do, for the hostname-grant tests.

``python -m ztnet.testing.dnsagent COMMAND ...`` prints one JSON object:

* ``resolve NAME [--family 4|6]``: socket.getaddrinfo (glibc's stub resolver);
* ``loop NAME PORT COUNT [--seconds S]``: COUNT times (or for S seconds) resolve NAME and
  connect at once to the first address; counts outcomes by errno name (``{"OK": 1000}``);
* ``query NAME TYPE SERVER [--tcp]``: one raw DNS query (dnspython) to SERVER:53;
* ``connect ADDR PORT``: one TCP connect;
* ``forge NAME ADDR PORT``: sends itself a forged DNS reply saying NAME is ADDR, from
  "127.0.0.53:53" as far as it can pretend, then connects to ADDR:PORT;
* ``hold NAME PORT``: resolve, connect, print ``{"connected": …}``, then for every stdin line
  send it and print the echo (``{"echo": …}`` or ``{"error": …}``) until stdin ends.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import socket
import sys
import time
from collections.abc import Sequence

import dns.message
import dns.name
import dns.query
import dns.rdatatype
import dns.rrset


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def resolve(name: str, family: int = 0) -> list[str]:
    infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def connect(address: str, port: int, timeout: float = 5.0) -> str:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except OSError as exc:
            return _errno_name(exc)
    return "OK"


def loop(name: str, port: int, count: int, seconds: float = 0.0) -> dict[str, object]:
    """``count`` iterations, or (``seconds`` > 0) as many as fit in that time."""
    outcomes: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + seconds
    done = 0
    while done < count if seconds <= 0 else time.monotonic() < deadline:
        done += 1
        try:
            addresses = resolve(name, socket.AF_INET)
        except socket.gaierror as exc:
            outcomes[f"gaierror {exc.errno}"] += 1
            time.sleep(0.02)  # no resolver for the moment: do not spin
            continue
        outcomes[connect(addresses[0], port)] += 1
    return {"outcomes": dict(outcomes)}


def query(name: str, rdtype: str, server: str, tcp: bool) -> dict[str, object]:
    request = dns.message.make_query(name, rdtype)
    try:
        if tcp:
            response = dns.query.tcp(request, server, timeout=5)
        else:
            response = dns.query.udp(request, server, timeout=5)
    except OSError as exc:
        return {"error": _errno_name(exc)}
    except Exception as exc:  # noqa: BLE001 - report, the test decides
        return {"error": type(exc).__name__}
    return {"rcode": dns.rcode.to_text(response.rcode()),
            "tc": bool(response.flags & dns.flags.TC),
            "answers": [[rrset.name.to_text(omit_final_dot=True),
                         dns.rdatatype.to_text(rrset.rdtype), rrset.ttl,
                         [rd.to_text() for rd in rrset]] for rrset in response.answer]}


def bench(name: str, server: str, count: int, threads: int) -> dict[str, object]:
    """``count`` A queries per thread over UDP, each waiting for its answer: latencies (ms)
    of the first thread's queries, and answers per second over all threads."""
    import threading

    latencies: list[float] = []
    failures = [0]

    def worker(record: bool) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            sock.connect((server, 53))
            for _ in range(count):
                request = dns.message.make_query(name, "A")
                started = time.perf_counter()
                try:
                    sock.send(request.to_wire())
                    while dns.message.from_wire(sock.recv(4096)).id != request.id:
                        pass
                except OSError:
                    failures[0] += 1
                    continue
                if record:
                    latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(i == 0,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"p50_ms": latencies[len(latencies) // 2],
            "p99_ms": latencies[int(len(latencies) * 0.99)],
            "qps": round((count * threads - failures[0]) / elapsed), "failures": failures[0],
            "queries": count * threads}


def forge(name: str, address: str, port: int) -> dict[str, object]:
    """The agent answers its own question: a reply it crafted lands on its own socket."""
    request = dns.message.make_query(name, "A")
    reply = dns.message.make_response(request)
    reply.answer.append(dns.rrset.from_text(dns.name.from_text(name), 300, "IN", "A", address))
    results: dict[str, object] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as victim, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as forger:
        victim.bind(("127.0.0.1", 0))
        victim.settimeout(2)
        try:
            forger.sendto(reply.to_wire(), victim.getsockname())
            data, _ = victim.recvfrom(4096)
            results["forged_reply_received"] = dns.message.from_wire(data).id == reply.id
        except OSError as exc:
            results["forged_reply_received"] = _errno_name(exc)
    results["connect"] = connect(address, port)
    return results


def hold(name: str, port: int) -> None:
    address = resolve(name, socket.AF_INET)[0]
    sock = socket.create_connection((address, port), timeout=5)
    print(json.dumps({"connected": address}), flush=True)
    for line in sys.stdin:
        try:
            sock.sendall(line.encode())
            print(json.dumps({"echo": sock.recv(4096).decode(errors="replace")}), flush=True)
        except OSError as exc:
            print(json.dumps({"error": _errno_name(exc)}), flush=True)
    sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztnet.testing.dnsagent")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("resolve")
    p.add_argument("name")
    p.add_argument("--family", type=int, choices=(4, 6), default=None)
    p = sub.add_parser("loop")
    p.add_argument("name")
    p.add_argument("port", type=int)
    p.add_argument("count", type=int)
    p.add_argument("--seconds", type=float, default=0.0)
    p = sub.add_parser("query")
    p.add_argument("name")
    p.add_argument("type")
    p.add_argument("server")
    p.add_argument("--tcp", action="store_true")
    p = sub.add_parser("connect")
    p.add_argument("address")
    p.add_argument("port", type=int)
    p = sub.add_parser("bench")
    p.add_argument("name")
    p.add_argument("server")
    p.add_argument("count", type=int)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("forge")
    p.add_argument("name")
    p.add_argument("address")
    p.add_argument("port", type=int)
    p = sub.add_parser("hold")
    p.add_argument("name")
    p.add_argument("port", type=int)
    args = parser.parse_args(argv)
    result: object
    if args.command == "resolve":
        family = {None: 0, 4: socket.AF_INET, 6: socket.AF_INET6}[args.family]
        try:
            result = {"addresses": resolve(args.name, family)}
        except socket.gaierror as exc:
            result = {"gaierror": exc.errno, "message": str(exc)}
    elif args.command == "loop":
        result = loop(args.name, args.port, args.count, args.seconds)
    elif args.command == "query":
        result = query(args.name, args.type, args.server, args.tcp)
    elif args.command == "connect":
        result = {"result": connect(args.address, args.port)}
    elif args.command == "bench":
        result = bench(args.name, args.server, args.count, args.threads)
    elif args.command == "forge":
        result = forge(args.name, args.address, args.port)
    else:
        hold(args.name, args.port)
        return 0
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
