"""What the resolver (resolver.py) is given and what it traces, kept apart from it so that
a daemon without ``--dns`` never loads dnspython (about 11 MiB of resident memory): its
settings, the upstreams it may ask, and the ``QueryRecord`` of every query it answered."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# CNAME links followed from a query name before the answer is SERVFAIL (dnsanswer.py)
DEFAULT_MAX_CHAIN = 8


@dataclass(frozen=True, slots=True)
class ResolverSettings:
    upstreams: tuple[tuple[str, int], ...]
    floor_seconds: float = 5.0
    max_addresses: int = 32
    # kernel entries (address x port x protocol) one agent may hold in zt_learned_v1, which
    # all agents share (65,536 entries): 16 agents at their cap fill it
    max_entries_per_agent: int = 4096
    max_chain: int = DEFAULT_MAX_CHAIN
    timeout: float = 2.0
    workers: int = 16
    bind4: str = "127.0.0.1"
    bind6: str = "::1"


def upstreams_from_resolv_conf(path: str = "/etc/resolv.conf") -> tuple[tuple[str, int], ...]:
    """The host's name servers (resolv.conf ``nameserver`` lines), port 53."""
    found: list[tuple[str, int]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        found.append((str(ipaddress.ip_address(parts[1].split("%")[0])), 53))
                    except ValueError:
                        continue
    except OSError:
        return ()
    return tuple(found)


def parse_upstream(text: str) -> tuple[str, int]:
    """``10.0.0.2``, ``10.0.0.2:5353`` or ``[2001:db8::1]:53``; ValueError otherwise."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = int(rest.removeprefix(":"))
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"bad upstream port in {text!r}")
    return str(ipaddress.ip_address(host)), port


@dataclass(frozen=True, slots=True)
class QueryRecord:
    """One DNS query an agent made, as traced: ``verdict`` is answered, refused, nodata,
    servfail or the upstream's rcode (nxdomain ...)."""

    agent: str
    name: str
    qtype: str
    verdict: str
    answers: tuple[str, ...] = ()
    stripped: tuple[str, ...] = ()
    chain: tuple[str, ...] = ()
    grant_ids: tuple[int, ...] = ()
    ttl: int = 0
    reason: str = ""
    upstream_ms: float = 0.0
    install_ms: float = 0.0  # from the upstream answer to every entry in the kernel
    transport: str = "udp"
    rcode: str = ""  # the reply's: NOERROR, REFUSED, SERVFAIL, NXDOMAIN ...
