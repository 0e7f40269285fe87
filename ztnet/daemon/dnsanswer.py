"""What ztnet's resolver makes of an upstream answer (pure: dnspython messages in, the
decision out; no sockets, no kernel).

* The CNAME chain is followed from the query name only, in order, at most ``max_chain``
  links; records off the chain (an upstream, or a spoofer, adding ``evil.com A 1.2.3.4``)
  are ignored, and a loop ends the walk.
* The addresses of the query's type at the end of the chain are the answer. Those in
  loopback, link-local, private, shared (CGNAT), multicast or reserved ranges, and the
  cloud metadata addresses, are stripped unless the grant opts in (``allow_private``):
  an attacker who controls a granted name must not be able to point it at the metadata
  service or a host's own loopback services.
* The reply carries the chain and the kept addresses, every TTL capped at what the kernel
  entries will honour, so no client caches an address longer than it may connect to it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ztnet.daemon.resolverconf import DEFAULT_MAX_CHAIN
from ztnet.grants.model import IPAddress, normalize_address

# (network, reason), most specific reasons first: the metadata services before the ranges
# that contain them.
_STRIP: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(net), reason) for net, reason in (
        ("169.254.169.254/32", "metadata"), ("169.254.170.2/32", "metadata"),
        ("100.100.100.200/32", "metadata"), ("fd00:ec2::254/128", "metadata"),
        ("0.0.0.0/8", "reserved"), ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local"),
        ("10.0.0.0/8", "private"), ("172.16.0.0/12", "private"), ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "private"), ("192.0.0.0/24", "reserved"), ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "reserved"), ("::1/128", "loopback"), ("fe80::/10", "link-local"),
        ("fc00::/7", "private"), ("ff00::/8", "multicast"), ("::ffff:0:0/96", "reserved"),
    ))


def strip_reason(address: IPAddress) -> str | None:
    """Why ``address`` may not be handed out without ``allow_private``, or None."""
    address = normalize_address(address)
    for network, reason in _STRIP:
        if address.version == network.version and address in network:
            return reason
    return None


@dataclass(frozen=True, slots=True)
class Chain:
    """The part of an upstream answer ztnet uses. ``names``: the query name, then each
    CNAME target in order; ``cnames``: those links as RRsets; ``addresses``: the final
    name's records of the query type, with their TTLs; ``ttl``: the smallest TTL on the
    way; ``broken``: the walk hit a loop or ``max_chain``."""

    names: tuple[str, ...]
    cnames: tuple[dns.rrset.RRset, ...]
    addresses: tuple[tuple[IPAddress, int], ...]
    ttl: int
    broken: bool


def follow_chain(response: dns.message.Message, qname: dns.name.Name, rdtype: int,
                 max_chain: int = DEFAULT_MAX_CHAIN) -> Chain:
    """Walk ``response``'s answer section from ``qname`` (see the module docstring)."""
    current = qname
    names = [_text(qname)]
    cnames: list[dns.rrset.RRset] = []
    ttls: list[int] = []
    seen = {current}
    broken = False
    while True:
        cname = _find(response, current, dns.rdatatype.CNAME)
        if cname is None:
            break
        if len(cnames) >= max_chain:
            broken = True
            break
        target = cname[0].target
        cnames.append(cname)
        ttls.append(cname.ttl)
        if target in seen:
            broken = True
            break
        seen.add(target)
        names.append(_text(target))
        current = target
    addresses: list[tuple[IPAddress, int]] = []
    if not broken:
        final = _find(response, current, rdtype)
        if final is not None:
            ttls.append(final.ttl)
            for rdata in final:
                addresses.append((ipaddress.ip_address(rdata.address), final.ttl))
    return Chain(tuple(names), tuple(cnames), tuple(addresses), min(ttls, default=0), broken)


def _find(response: dns.message.Message, name: dns.name.Name,
          rdtype: int) -> dns.rrset.RRset | None:
    for rrset in response.answer:
        if rrset.name == name and rrset.rdtype == rdtype and \
                rrset.rdclass == dns.rdataclass.IN and len(rrset):
            return rrset
    return None


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def build_reply(query: dns.message.Message, rcode: int, *,
                cnames: tuple[dns.rrset.RRset, ...] = (),
                addresses: tuple[IPAddress, ...] = (), address_name: dns.name.Name | None = None,
                rdtype: int = dns.rdatatype.A, ttl_cap: int = 0) -> dns.message.Message:
    """The reply to ``query``: its id and question, the chain and ``addresses`` (records of
    ``address_name``), every TTL at most ``ttl_cap``."""
    reply = dns.message.make_response(query, recursion_available=True)
    reply.set_rcode(dns.rcode.Rcode.make(rcode))
    reply.flags &= ~dns.flags.AA
    for link in cnames:
        reply.answer.append(dns.rrset.from_rdata_list(link.name, min(link.ttl, ttl_cap),
                                                      list(link)))
    if addresses and address_name is not None:
        rrset = dns.rrset.from_text_list(address_name, max(0, ttl_cap), dns.rdataclass.IN,
                                         dns.rdatatype.RdataType.make(rdtype),
                                         [str(a) for a in addresses])
        reply.answer.append(rrset)
    return reply


def rcode_name(rcode: int) -> str:
    return dns.rcode.to_text(dns.rcode.Rcode.make(rcode))
