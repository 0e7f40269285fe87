"""A tiny authoritative DNS responder for the lab (UDP, A and AAAA only), and a client query.

``python -m ztnet.lab.dns --bind ADDR… --record NAME=ADDR…`` answers queries for the given
names from every bound address on port 53 (``--port``), prints one JSON line per query
(``{"event": "query", "peer": […], "name": …, "type": …, "answers": N}``), prints ``READY`` once
every socket is bound and exits 0 on SIGTERM. Unknown names get NXDOMAIN, other query types an
empty answer. Enough for agents to resolve ``api.lab.internal`` with a real DNS exchange, so
the DNS grant in the lab policy is exercised by real packets; it is not a resolver.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import selectors
import socket
import struct
import sys
from collections.abc import Mapping, Sequence

from ztnet.lab.procs import selector_until_terminated

TYPE_A, TYPE_AAAA = 1, 28
CLASS_IN = 1
RCODE_FORMERR, RCODE_NXDOMAIN = 1, 3
TTL = 60
_HEADER = struct.Struct("!6H")


def encode_name(name: str) -> bytes:
    labels = [label.encode("ascii") for label in name.rstrip(".").split(".") if label]
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def _read_name(packet: bytes, offset: int) -> tuple[str, int]:
    """A question name (no compression: questions never need it). Raises ValueError."""
    labels: list[str] = []
    while True:
        if offset >= len(packet):
            raise ValueError("name runs past the packet")
        length = packet[offset]
        offset += 1
        if length == 0:
            return ".".join(labels), offset
        if length > 63:
            raise ValueError("compressed or oversized label in a question")
        labels.append(packet[offset:offset + length].decode("ascii", "replace").lower())
        offset += length


def build_query(name: str, qtype: int, ident: int) -> bytes:
    return _HEADER.pack(ident, 0x0100, 1, 0, 0, 0) + encode_name(name) + \
        struct.pack("!2H", qtype, CLASS_IN)


def answer(query: bytes, zone: Mapping[str, Sequence[str]]) -> tuple[bytes, str, int, int] | None:
    """The response to ``query``, with the name, type and number of answers; None if it is
    not a query worth answering (a response, or too short to carry an id)."""
    if len(query) < _HEADER.size:
        return None
    ident, flags, qdcount = _HEADER.unpack_from(query)[:3]
    if flags & 0x8000:
        return None
    rd = flags & 0x0100
    try:
        if qdcount != 1:
            raise ValueError("one question expected")
        name, end = _read_name(query, _HEADER.size)
        qtype, qclass = struct.unpack_from("!2H", query, end)
    except (ValueError, struct.error):
        return _HEADER.pack(ident, 0x8000 | rd | RCODE_FORMERR, 0, 0, 0, 0), "", 0, 0
    question = query[_HEADER.size:end + 4]
    known = name in zone
    wanted = 4 if qtype == TYPE_A else 6 if qtype == TYPE_AAAA else 0
    addresses = [ipaddress.ip_address(a) for a in zone.get(name, ())]
    records = b""
    count = 0
    for address in addresses:
        if qclass == CLASS_IN and address.version == wanted:
            # 0xC00C: a pointer to the name in the question, which starts at offset 12
            records += struct.pack("!HHHIH", 0xC00C, qtype, CLASS_IN, TTL, len(address.packed))
            records += address.packed
            count += 1
    flags_out = 0x8000 | 0x0400 | rd | (0 if known else RCODE_NXDOMAIN)  # QR, AA
    header = _HEADER.pack(ident, flags_out, 1, count, 0, 0)
    return header + question + records, name, qtype, count


def parse_answer(response: bytes, ident: int) -> tuple[int, list[str]]:
    """(rcode, addresses) of a response to our query ``ident``. Raises ValueError."""
    rid, flags, qdcount, ancount = _HEADER.unpack_from(response)[:4]
    if rid != ident or not flags & 0x8000:
        raise ValueError("not the response to our query")
    offset = _HEADER.size
    for _ in range(qdcount):
        _, offset = _read_name(response, offset)
        offset += 4
    addresses = []
    for _ in range(ancount):
        if response[offset] & 0xC0 == 0xC0:
            offset += 2
        else:
            _, offset = _read_name(response, offset)
        rtype, _, _, length = struct.unpack_from("!HHIH", response, offset)
        offset += 10
        data = response[offset:offset + length]
        offset += length
        if rtype in (TYPE_A, TYPE_AAAA):
            addresses.append(str(ipaddress.ip_address(data)))
    return flags & 0xF, addresses


def serve(bind: Sequence[str], port: int, zone: Mapping[str, Sequence[str]]) -> None:
    with selector_until_terminated() as sel:
        for addr in bind:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind((addr, port))
            sel.register(sock, selectors.EVENT_READ)
        print("READY", flush=True)
        while True:
            for key, _ in sel.select():
                sock = key.fileobj  # type: ignore[assignment]
                query, peer = sock.recvfrom(4096)
                result = answer(query, zone)
                if result is None:
                    continue
                response, name, qtype, count = result
                sock.sendto(response, peer)
                print(json.dumps({"event": "query", "peer": list(peer[:2]), "name": name,
                                  "type": qtype, "answers": count}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztnet.lab.dns", description=__doc__)
    parser.add_argument("--bind", nargs="+", required=True, metavar="ADDR")
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--record", nargs="+", default=[], metavar="NAME=ADDR")
    args = parser.parse_args(argv)
    zone: dict[str, list[str]] = {}
    for record in args.record:
        name, _, address = record.partition("=")
        ipaddress.ip_address(address)  # refuse a typo at start, not at the first query
        zone.setdefault(name.lower().rstrip("."), []).append(address)
    serve(args.bind, args.port, zone)
    return 0


if __name__ == "__main__":
    sys.exit(main())
