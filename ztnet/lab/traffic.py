"""The traffic agent: network traffic an agent process makes (connects, sends, pings, DNS
queries, raw packets, held flows), reporting each outcome as JSON.

Used by the kernel tests, the lab, the demo and the Vagrant checks: they launch this
module under `ztnet run`, so every attempt comes from a real process in a
real agent cgroup. Outcomes are errno names ("OK", "EPERM", "EINPROGRESS").
(Not to be confused with ztnet.datapath.probe, the kernel feature check.)
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import sys
import time


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def tcp_connect(host: str, port: int, timeout: float, payload: bytes = b"") -> str:
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            if payload:
                sock.sendall(payload)
                sock.recv(len(payload))
        except OSError as exc:
            return _errname(exc) if not isinstance(exc, TimeoutError) else "TIMEOUT"
    return "OK"


def tcp_exchange(host: str, port: int, timeout: float, payload: bytes) -> dict[str, object]:
    """Like :func:`tcp_connect`, also reporting the source port (to match the flow with a
    sniffer's capture and the flow record) and how many echoed bytes came back."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sport = 0
        received = b""
        try:
            sock.connect((host, port))
            sport = int(sock.getsockname()[1])
            if payload:
                sock.sendall(payload)
                while len(received) < len(payload):
                    chunk = sock.recv(len(payload) - len(received))
                    if not chunk:
                        break
                    received += chunk
        except OSError as exc:
            result = _errname(exc) if not isinstance(exc, TimeoutError) else "TIMEOUT"
            return {"result": result, "sport": sport, "received": len(received)}
    return {"result": "OK", "sport": sport, "received": len(received)}


def tcp_upload(host: str, port: int, timeout: float, size: int) -> dict[str, object]:
    """Send ``size`` bytes (never reading the echo): how many went out, how it ended."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sent = 0
        try:
            sock.connect((host, port))
            chunk = b"r" * 65536
            while sent < size:
                sent += sock.send(chunk[:size - sent])
        except OSError as exc:
            result = _errname(exc) if not isinstance(exc, TimeoutError) else "TIMEOUT"
            return {"result": result, "sent": sent}
    return {"result": "OK", "sent": sent}


def dns_lookup(server: str, name: str, qtype: str, timeout: float) -> dict[str, object]:
    """One real DNS query over UDP to ``server``:53; the answer's addresses."""
    from ztnet.lab.dns import TYPE_A, TYPE_AAAA, build_query, parse_answer

    ident = os.getpid() & 0xFFFF
    query = build_query(name, TYPE_AAAA if qtype == "AAAA" else TYPE_A, ident)
    with socket.socket(_family(server), socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(query, (server, 53))
            response = sock.recv(4096)
        except OSError as exc:
            return {"result": _errname(exc) if not isinstance(exc, TimeoutError) else "TIMEOUT"}
    try:
        rcode, addresses = parse_answer(response, ident)
    except (ValueError, IndexError):
        return {"result": "BADANSWER"}
    return {"result": "OK" if rcode == 0 else f"RCODE{rcode}", "addresses": addresses}


def attempt(spec: dict[str, object], timeout: float) -> dict[str, object]:
    """One attempt of a ``many`` script: ``{"kind": tcp|upload|udp|icmp|raw|dns, "host",
    "port", "payload", "size", "name", "qtype"}``."""
    kind, host = str(spec["kind"]), str(spec["host"])
    port = int(str(spec.get("port", 0)))
    if kind == "tcp":
        return tcp_exchange(host, port, timeout, str(spec.get("payload", "")).encode())
    if kind == "upload":
        return tcp_upload(host, port, timeout, int(str(spec.get("size", 0))))
    if kind == "udp":
        return {"result": udp_send(host, port, False)}
    if kind == "icmp":
        return {"result": icmp_echo(host)}
    if kind == "raw":
        return {"result": raw_send(host)}
    if kind == "dns":
        return dns_lookup(host, str(spec["name"]), str(spec.get("qtype", "A")), timeout)
    return {"result": f"unknown kind {kind!r}"}


def udp_send(host: str, port: int, connect: bool) -> str:
    with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
        try:
            if connect:
                sock.connect((host, port))
                sock.send(b"ztnet-probe")
            else:
                sock.sendto(b"ztnet-probe", (host, port))
        except OSError as exc:
            return _errname(exc)
    return "OK"


def icmp_echo(host: str) -> str:
    """An echo request through an unprivileged ICMP (ping) socket."""
    v6 = ":" in host
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    with socket.socket(_family(host), socket.SOCK_DGRAM, proto) as sock:
        packet = bytes([128 if v6 else 8, 0, 0, 0, 0, 1, 0, 1]) + b"ztnet"
        try:
            sock.sendto(packet, (host, 0))
        except OSError as exc:
            return _errname(exc)
    return "OK"


def raw_send(host: str) -> str:
    """An ICMP echo through a raw IP socket (SOCK_RAW), the path that bypasses every
    socket-level hook. A plain socket rather than scapy's L3RawSocket, which also opens an
    AF_PACKET socket to listen: agents may not create those (identity.seccomp)."""
    from scapy.layers.inet import ICMP
    from scapy.layers.inet6 import ICMPv6EchoRequest

    v6 = ":" in host
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    message = bytes(ICMPv6EchoRequest()) if v6 else bytes(ICMP())  # v6: kernel checksums
    try:
        with socket.socket(_family(host), socket.SOCK_RAW, proto) as sock:
            sock.sendto(message, (host, 0))
    except OSError as exc:
        return _errname(exc)
    return "OK"


def nonblocking_attempt(proto: str, host: str, port: int) -> str:
    """One attempt whose errno tells the kernel's verdict without waiting for
    the network: EPERM (denied) or EINPROGRESS/OK (allowed)."""
    if proto == "icmp":
        return icmp_echo(host)
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(_family(host), kind) as sock:
        sock.setblocking(False)
        try:
            if proto == "tcp":
                sock.connect((host, port))
            else:
                sock.sendto(b"x", (host, port))
        except OSError as exc:
            return _errname(exc)
    return "OK"


def hold(host: str, port: int, interval: float, limit: float, timeout: float) -> None:
    """Connect, say CONNECTED, then echo a byte every interval until the flow
    breaks; report how it broke."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect((host, port))
        except OSError as exc:
            _emit(event="connect", result=_errname(exc))
            return
        _emit(event="connected")
        deadline = time.monotonic() + limit
        sock.settimeout(timeout)
        sent = 0
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"k")
                if not sock.recv(1):
                    _emit(event="broken", result="EOF", sent=sent)
                    return
                sent += 1
            except TimeoutError:
                _emit(event="broken", result="TIMEOUT", sent=sent)
                return
            except OSError as exc:
                _emit(event="broken", result=_errname(exc), sent=sent)
                return
            time.sleep(interval)  # pacing of the traffic itself, not synchronisation
        _emit(event="alive", sent=sent)


def daemonized(host: str, port: int) -> None:
    """fork, setsid, fork again; the grandchild connects and reports on the
    inherited stdout (whoever reads it sees EOF only once the grandchild is
    gone, so no one has to wait for it by other means)."""
    if os.fork():
        return
    os.setsid()
    if os.fork():
        os._exit(0)
    result = tcp_connect(host, port, 2.0)
    with open(f"/proc/{os.getpid()}/cgroup") as handle:
        cgroup = handle.read().strip()
    _emit(pid=os.getpid(), ppid=os.getppid(), sid=os.getsid(0), cgroup=cgroup, result=result)
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztnet.lab.traffic")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("tcp")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--payload", default="")
    p = sub.add_parser("udp")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--connect", action="store_true")
    p = sub.add_parser("icmp")
    p.add_argument("host")
    p = sub.add_parser("raw")
    p.add_argument("host")
    sub.add_parser("batch", help="JSON lines [proto, host, port] on stdin")
    p = sub.add_parser("many", help="a JSON list of attempts (see attempt()); one result each")
    p.add_argument("script", help="JSON list, or - for stdin")
    p.add_argument("--timeout", type=float, default=2.0)
    p = sub.add_parser("dns")
    p.add_argument("server")
    p.add_argument("name")
    p.add_argument("--qtype", choices=("A", "AAAA"), default="A")
    p.add_argument("--timeout", type=float, default=2.0)
    p = sub.add_parser("loop")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=0, help="stop after this many attempts")
    p = sub.add_parser("hold")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--limit", type=float, default=30.0)
    p.add_argument("--timeout", type=float, default=1.0,
                   help="how long an echo may take before the flow counts as broken")
    p = sub.add_parser("daemonize")
    p.add_argument("host")
    p.add_argument("port", type=int)
    args = parser.parse_args(argv)

    if args.cmd == "tcp":
        _emit(result=tcp_connect(args.host, args.port, args.timeout, args.payload.encode()),
              pid=os.getpid(), comm=open(f"/proc/{os.getpid()}/comm").read().strip())
    elif args.cmd == "udp":
        _emit(result=udp_send(args.host, args.port, args.connect))
    elif args.cmd == "icmp":
        _emit(result=icmp_echo(args.host))
    elif args.cmd == "raw":
        _emit(result=raw_send(args.host))
    elif args.cmd == "batch":
        for line in sys.stdin:
            proto, host, port = json.loads(line)
            _emit(result=nonblocking_attempt(proto, host, port))
    elif args.cmd == "many":
        script = json.loads(sys.stdin.read() if args.script == "-" else args.script)
        for index, spec in enumerate(script):
            _emit(index=index, **attempt(spec, args.timeout))
    elif args.cmd == "dns":
        _emit(**dns_lookup(args.server, args.name, args.qtype, args.timeout))
    elif args.cmd == "loop":
        # non-blocking connects as fast as possible until SIGUSR1
        outcomes: dict[str, int] = {}
        stop: list[int] = []
        signal.signal(signal.SIGUSR1, lambda signum, frame: stop.append(signum))
        _emit(event="started")
        while not stop and (not args.count or sum(outcomes.values()) < args.count):
            result = nonblocking_attempt("tcp", args.host, args.port)
            outcomes[result] = outcomes.get(result, 0) + 1
        _emit(event="done", outcomes=outcomes)
    elif args.cmd == "hold":
        hold(args.host, args.port, args.interval, args.limit, args.timeout)
    elif args.cmd == "daemonize":
        daemonized(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
