"""Hostname grants: an agent may reach the addresses ztnet's own resolver handed it for a
name, on the grant's ports and protocol, while both the answer and the grant live.

A pattern is an exact name (``api.github.com``) or ``*.`` and a suffix
(``*.githubusercontent.com``), where ``*`` stands for exactly one label: it matches
``raw.githubusercontent.com``, never ``githubusercontent.com`` itself nor
``a.b.githubusercontent.com``. A wildcard's suffix may not be a top-level domain or a
public suffix (``*.com``, ``*.co.uk``, ``*.github.io``): that would grant every customer of
a registry or a hosting platform. The public-suffix guard is a small built-in list
(``PUBLIC_SUFFIXES``), not the whole Public Suffix List: it stops the obvious mistakes; an
operator who grants ``*.example.net`` is trusted to know whose names those are.

Shared addresses: a CDN serves many names from one address, so a hostname grant is really an
address grant for the addresses the name resolved to (docs/policy.md says so).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ztnet.grants.model import AGENT_NAME_RE, MAX_GRANT_ID, PortRange, Proto

MAX_NAME = 253
# At most this many ports per hostname grant: each learned address becomes one kernel
# entry per port (docs/policy.md), so a wide range would multiply the entries.
MAX_NAME_PORTS = 16

_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_NAME_RE = re.compile(rf"{_LABEL}(\.{_LABEL})+\Z")
# DNS names as they appear in queries: underscores occur (_dmarc, SRV names).
_QUERY_LABEL_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\Z")

# Registry and hosting suffixes under which different parties own names. Not exhaustive.
PUBLIC_SUFFIXES = frozenset({
    "co.uk", "org.uk", "ac.uk", "gov.uk", "ltd.uk", "plc.uk", "me.uk", "net.uk",
    "com.au", "net.au", "org.au", "edu.au", "gov.au",
    "co.jp", "ne.jp", "or.jp", "ac.jp", "co.nz", "org.nz", "co.za", "co.in", "co.kr",
    "com.br", "com.cn", "com.mx", "com.tr", "com.sg", "com.hk", "com.tw", "com.ar",
    "github.io", "gitlab.io", "herokuapp.com", "netlify.app",
    "vercel.app", "pages.dev", "workers.dev", "web.app", "firebaseapp.com",
    "appspot.com", "blogspot.com", "azurewebsites.net", "cloudfront.net",
    "amazonaws.com", "s3.amazonaws.com", "elasticbeanstalk.com", "ngrok.io", "ngrok.app",
    "fly.dev", "onrender.com", "repl.co", "glitch.me", "duckdns.org", "no-ip.org",
    "dyndns.org", "trycloudflare.com", "r2.dev", "deno.dev", "surge.sh",
})


@dataclass(frozen=True, slots=True)
class HostPattern:
    """``api.github.com`` (exact) or ``*.githubusercontent.com`` (one label)."""

    text: str

    def __post_init__(self) -> None:
        check_pattern(self.text)

    @property
    def wildcard(self) -> bool:
        return self.text.startswith("*.")

    def matches(self, name: str) -> bool:
        """Does the (normalized, lower-case, no trailing dot) ``name`` match?"""
        if not self.wildcard:
            return name == self.text
        suffix = self.text[1:]  # ".githubusercontent.com"
        if not name.endswith(suffix):
            return False
        head = name[: -len(suffix)]
        return bool(head) and "." not in head

    def __str__(self) -> str:
        return self.text


def check_pattern(text: str) -> None:
    """ValueError with the explanation a person needs, unless ``text`` is a pattern."""
    if len(text) > MAX_NAME:
        raise ValueError(f"{text[:40]!r}...: a host name has at most {MAX_NAME} characters")
    if text != text.lower():
        raise ValueError(f"write host names in lower case: {text.lower()!r}")
    if text.endswith("."):
        raise ValueError(f"{text!r}: write the name without the trailing dot")
    body = text[2:] if text.startswith("*.") else text
    if "*" in body:
        raise ValueError(f"{text!r}: '*' may only stand alone as the first label ('*.example.com')")
    if not _NAME_RE.match(body):
        if "." not in body and text.startswith("*."):
            raise ValueError(f"{text!r}: a top-level domain alone cannot be granted")
        if "." not in body and re.fullmatch(_LABEL, body):
            # a typo'd address reads as a one-label name: say both, so neither reading misleads
            raise ValueError(f"{text!r} is not an IP address or CIDR, and a top-level domain "
                             "alone cannot be granted as a host name")
        raise ValueError(f"{text!r} is not a host name (letters, digits, '-', "
                         "dot-separated labels)")
    if text.startswith("*."):
        if body in PUBLIC_SUFFIXES:
            raise ValueError(f"{text!r}: {body} is a public suffix; '*.{body}' would grant "
                             "names of every party registered under it")
    elif body in PUBLIC_SUFFIXES:
        raise ValueError(f"{text!r} is a public suffix, not a host")


def normalize_query_name(name: str) -> str | None:
    """A query name in the form patterns compare with (lower case, no trailing dot), or
    None if it is not a plausible host name (then it matches no grant)."""
    name = name.lower().removesuffix(".")
    if not name or len(name) > MAX_NAME:
        return None
    if not all(_QUERY_LABEL_RE.match(label) for label in name.split(".")):
        return None
    return name


@dataclass(frozen=True, slots=True)
class NameGrant:
    """Agent ``agent`` may reach the addresses ztnet's resolver returns for names matching
    ``pattern``, over ``proto`` on ``ports`` (None: any), from ``not_before`` until just
    before ``not_after``. ``allow_private``: answers in loopback, link-local, private or
    metadata ranges are kept (by default they are stripped)."""

    grant_id: int
    agent: str
    proto: Proto
    pattern: HostPattern
    ports: PortRange | None
    not_before: float
    not_after: float
    allow_private: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.grant_id <= MAX_GRANT_ID:
            raise ValueError(f"grant id must be a nonzero 64-bit number, got {self.grant_id}")
        if not AGENT_NAME_RE.match(self.agent):
            raise ValueError(f"agent name {self.agent!r} is not a DNS label")
        if self.proto is Proto.ICMP:
            raise ValueError("a hostname grant is for tcp, udp or any, not icmp")
        if self.ports is not None and self.ports.last - self.ports.first + 1 > MAX_NAME_PORTS:
            raise ValueError(f"a hostname grant names at most {MAX_NAME_PORTS} ports, "
                             f"not {self.ports}")
        if self.not_after <= self.not_before:
            raise ValueError("not_after must be later than not_before")

    def live_at(self, when: float) -> bool:
        return self.not_before <= when < self.not_after

    @property
    def port_list(self) -> tuple[int, ...]:
        """The ports as the kernel stores them: 0 means any port."""
        if self.ports is None:
            return (0,)
        return tuple(range(self.ports.first, self.ports.last + 1))


def matching(grants: Iterable[NameGrant], agent: str, name: str, when: float) -> list[NameGrant]:
    """The live grants of ``agent`` whose pattern matches the normalized ``name``."""
    return [g for g in grants if g.agent == agent and g.live_at(when) and g.pattern.matches(name)]
