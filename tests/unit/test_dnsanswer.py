"""The resolver's reading of upstream answers (pure): chains, stripping, reply TTLs."""

from __future__ import annotations

import ipaddress

import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest

from ztnet.daemon.dnsanswer import build_reply, follow_chain, strip_reason


def answer(*records: tuple[str, int, str, str]) -> dns.message.Message:
    message = dns.message.make_response(dns.message.make_query("www.example.com", "A"))
    for name, ttl, kind, value in records:
        message.answer.append(dns.rrset.from_text(dns.name.from_text(name), ttl, "IN", kind,
                                                  value))
    return message


QNAME = dns.name.from_text("www.example.com")


def test_the_chain_is_followed_in_order_and_off_chain_records_are_ignored() -> None:
    chain = follow_chain(answer(("evil.example.net", 5, "A", "198.51.100.66"),
                                ("www.example.com", 30, "CNAME", "edge.cdn.example."),
                                ("edge.cdn.example", 20, "A", "203.0.113.7")),
                         QNAME, dns.rdatatype.A)
    assert chain.names == ("www.example.com", "edge.cdn.example")
    assert chain.addresses == ((ipaddress.ip_address("203.0.113.7"), 20),)
    assert chain.ttl == 20 and not chain.broken


@pytest.mark.parametrize("links", [
    [("www.example.com", "a.example."), ("a.example", "www.example.com.")],  # a loop
    [(f"{'www.example.com' if i == 0 else f'l{i}.example'}", f"l{i + 1}.example.")
     for i in range(9)],                                                       # too long
])
def test_loops_and_long_chains_are_broken(links: list[tuple[str, str]]) -> None:
    records = [(name, 60, "CNAME", target) for name, target in links]
    chain = follow_chain(answer(*records, ("a.example", 60, "A", "203.0.113.9")), QNAME,
                         dns.rdatatype.A, max_chain=8)
    assert chain.broken and chain.addresses == ()


@pytest.mark.parametrize(("address", "reason"), [
    ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"), ("127.0.0.53", "loopback"),
    ("::1", "loopback"), ("10.1.2.3", "private"), ("100.64.0.1", "private"),
    ("fe80::1", "link-local"), ("::ffff:192.168.1.1", "private"), ("224.0.0.1", "multicast"),
    ("203.0.113.7", None), ("2001:db8::1", None), ("140.82.112.5", None),
])
def test_private_and_metadata_answers_are_recognised(address: str, reason: str | None) -> None:
    assert strip_reason(ipaddress.ip_address(address)) == reason


def test_reply_ttls_never_exceed_the_cap() -> None:
    query = dns.message.make_query("www.example.com", "A")
    upstream = answer(("www.example.com", 3600, "CNAME", "edge.cdn.example."))
    reply = build_reply(query, 0, cnames=tuple(upstream.answer),
                        addresses=(ipaddress.ip_address("203.0.113.7"),),
                        address_name=dns.name.from_text("edge.cdn.example"), ttl_cap=4)
    assert [rrset.ttl for rrset in reply.answer] == [4, 4]
    assert reply.id == query.id
