"""The lab's "internet" resolver: an authoritative server (dnspython) for the names ztnet's
resolver asks upstream, with the behaviours real ones have and tests need.

``python -m ztnet.lab.upstream --bind ADDR… [--port 53] --zone FILE`` serves UDP and TCP on
every address, prints ``READY`` once bound and one JSON line per query
(``{"event": "query", "name": …, "type": …, "transport": …, "answers": [...]}``), and exits 0
on SIGTERM. The zone is JSON, one object per name::

    {"api.lab.test": {"A": ["203.0.113.10"], "AAAA": ["2001:db8::10"], "ttl": 60},
     "cdn.lab.test": {"A": ["198.51.100.1", "198.51.100.2"], "ttl": 2, "rotate": 1},
     "www.lab.test": {"CNAME": "edge.lab.test", "ttl": 30},
     "big.lab.test": {"A": ["203.0.113.1", …], "tc": true},
     "odd.lab.test": {"A": ["203.0.113.7"], "extra": [["evil.lab.test", "A", "203.0.113.66"]]}}

``rotate: N`` answers N of the addresses, moving on by N at each query (a CDN handing out
different edges); ``tc: true`` sets TC on every UDP answer (the full one only over TCP);
``extra`` adds records off the query's chain (what a spoofer or a sloppy server adds). CNAMEs
are followed inside the zone as a recursive resolver would (loops included, up to 16 links).
Unknown names get NXDOMAIN.
"""

from __future__ import annotations

import argparse
import itertools
import json
import selectors
import socket
import struct
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ztnet.lab.procs import selector_until_terminated

_MAX_LINKS = 16


class Zone:
    def __init__(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        self.records = {name.lower().rstrip("."): dict(body) for name, body in records.items()}
        self._turns: dict[str, itertools.count[int]] = {}
        self._lock = threading.Lock()

    def _addresses(self, name: str, rdtype: str) -> list[str]:
        body = self.records[name]
        addresses = list(body.get(rdtype, ()))
        rotate = int(body.get("rotate", 0))
        if rotate and addresses:
            with self._lock:
                turn = next(self._turns.setdefault(f"{name}/{rdtype}", itertools.count()))
            start = (turn * rotate) % len(addresses)
            addresses = [addresses[(start + i) % len(addresses)] for i in range(rotate)]
        return addresses

    def respond(self, query: dns.message.Message, transport: str) -> dns.message.Message:
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        question = query.question[0]
        rdtype = dns.rdatatype.to_text(question.rdtype)
        name = question.name.to_text(omit_final_dot=True).lower()
        if name not in self.records:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            return reply
        owner = question.name
        truncate = False
        for _ in range(_MAX_LINKS):
            body = self.records.get(name)
            if body is None:
                break
            truncate = truncate or bool(body.get("tc"))
            ttl = int(body.get("ttl", 60))
            for extra_name, extra_type, extra_value in body.get("extra", ()):
                reply.answer.append(dns.rrset.from_text(dns.name.from_text(extra_name), ttl, "IN",
                                                        extra_type,
                                                        extra_value))
            if "CNAME" in body:
                target = dns.name.from_text(body["CNAME"])
                reply.answer.append(dns.rrset.from_text(owner, ttl, "IN", "CNAME",
                                                        target.to_text()))
                owner, name = target, target.to_text(omit_final_dot=True).lower()
                continue
            addresses = self._addresses(name, rdtype) if rdtype in ("A", "AAAA") else []
            if addresses:
                reply.answer.append(dns.rrset.from_text_list(owner, ttl, "IN", rdtype,
                                                             addresses))
            break
        if truncate and transport == "udp":
            reply.answer.clear()
            reply.flags |= dns.flags.TC
        return reply


def _log(query: dns.message.Message, reply: dns.message.Message, transport: str) -> None:
    question = query.question[0] if query.question else None
    print(json.dumps({
        "event": "query", "transport": transport,
        "name": question.name.to_text(omit_final_dot=True) if question is not None else "",
        "type": dns.rdatatype.to_text(question.rdtype) if question is not None else "",
        "rcode": dns.rcode.to_text(reply.rcode()), "tc": bool(reply.flags & dns.flags.TC),
        "answers": [rd.to_text() for rrset in reply.answer for rd in rrset]}), flush=True)


def _handle(zone: Zone, data: bytes, transport: str) -> bytes | None:
    try:
        query = dns.message.from_wire(data)
    except Exception:  # noqa: BLE001 - garbage from the wire: no answer
        return None
    if query.flags & dns.flags.QR or len(query.question) != 1:
        return None
    reply = zone.respond(query, transport)
    _log(query, reply, transport)
    return reply.to_wire()


def _serve_tcp(zone: Zone, conn: socket.socket) -> None:
    with conn:
        conn.settimeout(5)
        try:
            while True:
                header = conn.recv(2, socket.MSG_WAITALL)
                if len(header) < 2:
                    return
                data = conn.recv(struct.unpack("!H", header)[0], socket.MSG_WAITALL)
                wire = _handle(zone, data, "tcp")
                if wire is None:
                    return
                conn.sendall(struct.pack("!H", len(wire)) + wire)
        except OSError:
            return


def serve(bind: Sequence[str], port: int, zone: Zone) -> None:
    with selector_until_terminated() as sel:
        for addr in bind:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((addr, port))
            sel.register(udp, selectors.EVENT_READ)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((addr, port))
            tcp.listen(64)
            sel.register(tcp, selectors.EVENT_READ)
        print("READY", flush=True)
        while True:
            for key, _ in sel.select():
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if sock.type == socket.SOCK_STREAM:
                    conn, _ = sock.accept()
                    threading.Thread(target=_serve_tcp, args=(zone, conn), daemon=True).start()
                    continue
                data, peer = sock.recvfrom(4096)
                wire = _handle(zone, data, "udp")
                if wire is not None:
                    sock.sendto(wire, peer)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztnet.lab.upstream", description=__doc__)
    parser.add_argument("--bind", nargs="+", required=True, metavar="ADDR")
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--zone", type=Path, required=True)
    args = parser.parse_args(argv)
    zone = Zone(json.loads(args.zone.read_text()))
    serve(args.bind, args.port, zone)
    return 0


if __name__ == "__main__":
    sys.exit(main())
