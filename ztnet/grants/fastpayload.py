"""A fast reading of the canonical bundle payload, for the 100,000-grant case.

``decode_payload`` (payload.py) is the definition: strict JSON, every field
checked, then the whole Bundle re-encoded and compared with the bytes. That
builds a dict per grant twice and costs seconds at 100,000 grants. A payload
that passes it is canonical JSON, so its bytes have exactly one shape: sorted
keys, no whitespace, integers without leading zeros, ASCII. This module
matches that shape with regular expressions and checks each field with the
same validators as payload.py (caching what repeats: networks, port ranges,
agent names), building each Grant once and no dict at all.

It is an accelerator, never a second opinion: ``decode_canonical`` returns a
Bundle only when every byte matched the canonical shape and every field
validated, and None on anything else, whereupon ``decode_payload`` runs the
full strict path (which then rejects with its precise reason, or accepts a
shape this module does not know). tests/unit/test_fastpayload.py checks, on
generated and on mutated payloads, that whenever this returns a Bundle, the
strict path returns the same one. A new payload field (in payload.py's
BUNDLE_KEYS or GRANT_KEYS) makes every bundle carrying it take the slow path
until the expressions here learn it.
"""

from __future__ import annotations

import ipaddress
import re
import socket

from ztnet.errors import BundleRejected
from ztnet.grants.model import Grant, IPNetwork, PortRange, Proto
from ztnet.grants.payload import (
    MAX_INT64,
    Bundle,
    GrantRecord,
    _audit_agents,
    _network,
    _ports,
    parse_spiffe_agent_id,
)

_INT = r"(0|[1-9][0-9]{0,18})"
# printable ASCII that JSON writes as itself (no '"', no '\')
_PLAIN = r'[ !#-\[\]-~]*'
_HEAD = re.compile(rf'\{{"audience":"({_PLAIN})",(?:"audit":\[((?:"{_PLAIN}")(?:,"{_PLAIN}")*)\],)?'
                   rf'"expires_ms":{_INT},"grants":\[')
_TAIL_START = '],"issued_at_ms":'
_TAIL = re.compile(rf'\],"issued_at_ms":{_INT},"issuer":"({_PLAIN})","trust_domain":"({_PLAIN})",'
                   rf'"version":{_INT}\}}')
_GRANT = re.compile(
    rf'\{{"agent":"spiffe://({_PLAIN})","destination":"([0-9a-f.:/]+)","id":"g-([0-9a-f]{{16}})",'
    rf'"not_after_ms":{_INT},"not_before_ms":{_INT},"ports":"([0-9a-z-]+)",'
    rf'"proto":"(tcp|udp|icmp|any)","serial":{_INT}\}}')
_AUDIT_ITEM = re.compile(rf'"({_PLAIN})"')
_PROTOS = {str(proto): proto for proto in Proto}
# distinct grant window bounds shared per payload (one issuance has a few)
_SHARED_TIMES = 64


def _ipv4(text: str) -> int | None:
    """A canonical IPv4 CIDR with its host bits clear as ``address << 6 | length``, else
    None."""
    address_text, slash, length_text = text.partition("/")
    if not slash or not length_text.isdigit() or len(length_text) > 2 \
            or (length_text[0] == "0" and length_text != "0"):
        return None
    try:
        packed = socket.inet_aton(address_text)
    except OSError:
        return None
    # inet_aton also takes "10.1", "010.0.0.1", "0x0a.0.0.1": only the canonical
    # spelling, which inet_ntoa gives back, is accepted
    if socket.inet_ntoa(packed) != address_text:
        return None
    length = int(length_text)
    address = int.from_bytes(packed, "big")
    if length > 32 or address & ((1 << (32 - length)) - 1):
        return None
    return address << 6 | length


def _ipv4_network(address: int, length: int) -> ipaddress.IPv4Network:
    """``IPv4Network((address, length))`` for a validated network, without its
    constructor's parsing, and without the per-object ``hosts`` closure it adds
    for /31 and /32 (about 200 of the 430 bytes a /32 costs; ztnet never calls
    ``hosts()``). Equal, hashing and printing alike: tests/unit/test_fastpayload.py."""
    network = ipaddress.IPv4Network.__new__(ipaddress.IPv4Network)
    network.network_address = ipaddress.IPv4Address(address)
    network.netmask, network._prefixlen = _netmask(length)  # type: ignore[attr-defined]
    return network


# (netmask, length), cached per prefix length by ipaddress
_netmask = ipaddress.IPv4Network._make_netmask  # type: ignore[attr-defined]


class _Fields:
    """Per-payload caches of validated field values. Grants naming the same network
    share one object, looked up by the parsed network, not by its text: the text keys,
    alive until the parse ends, left a freed block beside each network in the
    allocator's pools; the next bundle's objects filled those, and then the old bundle's
    memory could not be given back when it was replaced (at 100,000 grants the daemon
    held 40 MiB more after each whole bundle)."""

    def __init__(self, trust_domain: str) -> None:
        self.prefix = f"{trust_domain}/agent/"
        self.trust_domain = trust_domain
        self.agents: dict[str, str] = {}
        self.networks: dict[int, IPNetwork] = {}
        self.ports: dict[str, PortRange | None] = {}
        self.times: dict[str, float] = {}

    def agent(self, text: str) -> str:
        name = self.agents.get(text)
        if name is None:
            if not text.startswith(self.prefix):
                raise ValueError("agent id of another trust domain")
            name = self.agents[text] = parse_spiffe_agent_id(f"spiffe://{text}",
                                                             self.trust_domain)
        return name

    def network(self, text: str) -> IPNetwork:
        ipv4 = _ipv4(text)
        if ipv4 is None:
            return _network(text, "destination")
        network = self.networks.get(ipv4)
        if network is None:
            network = self.networks[ipv4] = _ipv4_network(ipv4 >> 6, ipv4 & 0x3F)
        return network

    def seconds(self, text: str) -> float | None:
        """Unix seconds of a millisecond count (None: above int64). The grants of one
        issuance share their windows, so the first few distinct values are kept and
        shared (16 bytes per grant and bound, at 100,000 grants 6 MiB)."""
        value = self.times.get(text)
        if value is None:
            milliseconds = int(text)
            if milliseconds > MAX_INT64:
                return None
            value = milliseconds / 1000
            if len(self.times) < _SHARED_TIMES:
                self.times[text] = value
        return value

    def port_range(self, text: str) -> PortRange | None:
        if text in self.ports:
            return self.ports[text]
        ports = self.ports[text] = _ports(text, "ports")
        return ports


def _grants(text: str, start: int, end: int, fields: _Fields,
            max_grants: int) -> list[GrantRecord] | None:
    records: list[GrantRecord] = []
    append, match_grant, protos, seconds = records.append, _GRANT.match, _PROTOS, fields.seconds
    position = start
    if position == end:
        return records
    while True:
        match = match_grant(text, position)
        if match is None:
            return None
        (agent, destination, grant_id, not_after, not_before, ports, proto,
         serial) = match.groups()
        after, before, number = seconds(not_after), seconds(not_before), int(serial)
        if after is None or before is None or number > MAX_INT64:
            return None
        grant = Grant(int(grant_id, 16), fields.agent(agent), protos[proto],
                      fields.network(destination), fields.port_range(ports), before, after)
        append(GrantRecord(grant, number))
        position = match.end()
        if position == end:
            return records
        if text[position] != "," or len(records) >= max_grants:
            return None
        position += 1


def decode_canonical(data: bytes, max_grants: int) -> Bundle | None:
    """The Bundle in ``data`` if it is a canonical payload of the known shape
    whose every field validates and that has at most ``max_grants`` grants and
    audited agents; else None (the caller runs the strict path)."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    head = _HEAD.match(text)
    tail_start = text.rfind(_TAIL_START)
    if head is None or tail_start < head.end():
        return None
    tail = _TAIL.fullmatch(text, tail_start)
    if tail is None:
        return None
    audience, audit_text, expires = head.groups()
    issued_at, issuer, trust_domain, version = tail.groups()
    try:
        fields = _Fields(trust_domain)
        audit: tuple[str, ...] = ()
        if audit_text is not None:
            items = _AUDIT_ITEM.findall(audit_text)
            if ",".join(f'"{item}"' for item in items) != audit_text:
                return None
            audit = _audit_agents(items, trust_domain)
        records = _grants(text, head.end(), tail_start, fields, max_grants)
        if records is None or len(records) + len(audit) > max_grants:
            return None
        numbers = int(expires), int(issued_at), int(version)
        if max(numbers) > MAX_INT64:
            return None
        return Bundle(trust_domain=trust_domain, issuer=issuer, audience=audience,
                      version=numbers[2], issued_at=numbers[1] / 1000,
                      expires=numbers[0] / 1000, grants=tuple(records), audit_agents=audit)
    except (ValueError, BundleRejected):
        return None
