"""Just-in-time grants: the policy's ``[jit]`` section, and what a request may ask for.

    [jit]
    max_ttl = "1h"                 # no JIT grant lives longer (operator or request)

    [[jit.auto_approve]]           # requests matching a rule are granted at once
    agents = ["research-bot"]      # optional: default every agent
    to = "203.0.113.10"            # an address or a narrow public prefix
    ports = "443"
    proto = "tcp"
    max_ttl = "10m"                # optional: default [jit].max_ttl

A request (``RequestGrant{agent, to, ports, proto, ttl, reason}``, from a host's daemon) is
auto-approved only if a rule covers it: the agent is listed (or the rule lists none), the
destination lies inside the rule's ``to``, its ports inside the rule's, the same protocol;
its ttl is then clamped to the rule's ``max_ttl``. Everything else waits for an operator.

What may never be auto-approved, whatever a rule says (checked when the policy is loaded,
and again for every request): loopback, private (RFC 1918, ULA), link-local (the cloud
metadata service 169.254.169.254 among them), carrier-grade NAT, multicast, unspecified
or reserved addresses, prefixes wider than /24 (IPv4) or /48 (IPv6), ``ports = "any"`` and
protocols other than tcp and udp. An operator can still grant those by hand (`ztnet
grant`, or `ztnet approve`), which is a person's decision, audited.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ztnet.durations import parse_duration
from ztnet.grants.model import AGENT_NAME_RE, IPNetwork, PortRange, Proto
from ztnet.policy.fields import parse_destination, parse_ports, parse_proto

DEFAULT_MAX_TTL = 3600
JIT_KEYS = ("max_ttl", "auto_approve")
RULE_KEYS = ("agents", "to", "ports", "proto", "max_ttl")
MIN_PREFIX = {4: 24, 6: 48}
MAX_RULES = 1000

# Never auto-approved, whatever a rule says.
_NEVER = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
    "240.0.0.0/4", "::/128", "::1/128", "64:ff9b::/96", "fc00::/7", "fe80::/10", "ff00::/8"))


@dataclass(frozen=True, slots=True)
class AutoApproveRule:
    to: IPNetwork
    proto: Proto
    ports: PortRange
    agents: tuple[str, ...] = ()  # empty: every agent
    max_ttl: int | None = None

    def covers(self, agent: str, to: IPNetwork, proto: Proto, ports: PortRange | None) -> bool:
        return ((not self.agents or agent in self.agents)
                and to.version == self.to.version and to.subnet_of(self.to)  # type: ignore[arg-type]
                and proto is self.proto and ports is not None
                and self.ports.first <= ports.first and ports.last <= self.ports.last)


@dataclass(frozen=True, slots=True)
class JitPolicy:
    max_ttl: int = DEFAULT_MAX_TTL
    auto_approve: tuple[AutoApproveRule, ...] = field(default_factory=tuple)

    def auto_rule(self, agent: str, to: IPNetwork, proto: Proto,
                  ports: PortRange | None) -> AutoApproveRule | None:
        """The first rule that auto-approves this request, if any (and it is safe)."""
        if never_auto(to, proto, ports) is not None:
            return None
        return next((r for r in self.auto_approve if r.covers(agent, to, proto, ports)), None)

    def clamp(self, ttl: float, rule: AutoApproveRule | None = None) -> float:
        limit = float(self.max_ttl)
        if rule is not None and rule.max_ttl is not None:
            limit = min(limit, float(rule.max_ttl))
        return min(ttl, limit)


def never_auto(to: IPNetwork, proto: Proto, ports: PortRange | None) -> str | None:
    """Why a path can never be auto-approved, or None."""
    for blocked in _NEVER:
        if blocked.version == to.version and (to.overlaps(blocked)):
            return f"{to} is in {blocked} (loopback, private, link-local, metadata or reserved)"
    if to.prefixlen < MIN_PREFIX[to.version]:
        return f"{to} is wider than /{MIN_PREFIX[to.version]}"
    if proto not in (Proto.TCP, Proto.UDP):
        return f"proto {proto}: only tcp and udp can be auto-approved"
    if ports is None:
        return 'ports "any" cannot be auto-approved'
    return None


def parse_jit(raw: object, add: Any) -> JitPolicy | None:
    """The ``[jit]`` table; ``add(where, message)`` collects problems (the document's
    error list). None when anything was wrong."""
    if not isinstance(raw, dict):
        add("jit", "expected a table: [jit]")
        return None
    problems = 0

    def error(where: str, message: str) -> None:
        nonlocal problems
        problems += 1
        add(where, message)

    for key in raw:
        if key not in JIT_KEYS:
            error(f"jit.{key}", f"unknown key {key!r} (expected {', '.join(JIT_KEYS)})")
    max_ttl = _ttl(raw, "max_ttl", "jit", error) or DEFAULT_MAX_TTL
    rules_raw = raw.get("auto_approve", [])
    if not isinstance(rules_raw, list) or not all(isinstance(r, dict) for r in rules_raw):
        error("jit.auto_approve", "expected an array of tables: [[jit.auto_approve]]")
        rules_raw = []
    if len(rules_raw) > MAX_RULES:
        error("jit.auto_approve", f"at most {MAX_RULES} rules")
        rules_raw = []
    rules = [_rule(rule, f"jit.auto_approve[{i}]", error) for i, rule in enumerate(rules_raw)]
    if problems:
        return None
    return JitPolicy(max_ttl, tuple(r for r in rules if r is not None))


def _rule(raw: Mapping[str, Any], where: str, error: Any) -> AutoApproveRule | None:
    before = _Count(error)
    for key in raw:
        if key not in RULE_KEYS:
            before.add(f"{where}.{key}", f"unknown key {key!r} (expected {', '.join(RULE_KEYS)})")
    to = _parse(raw, "to", parse_destination, where, before, required=True)
    proto = _parse(raw, "proto", parse_proto, where, before) or Proto.TCP
    ports = _parse(raw, "ports", parse_ports, where, before, required=True)
    agents = raw.get("agents", [])
    if not isinstance(agents, list) or not all(
            isinstance(a, str) and AGENT_NAME_RE.match(a) for a in agents):
        before.add(f"{where}.agents", 'expected an array of agent names, like ["research-bot"]')
    if to is not None and before.count == 0:
        reason = never_auto(to, proto, ports)
        if reason is not None:
            before.add(where, f"never auto-approved: {reason}")
    max_ttl = _ttl(raw, "max_ttl", where, before.add)
    if before.count or to is None or ports is None:
        return None
    return AutoApproveRule(to, proto, ports, tuple(agents), max_ttl)


class _Count:
    def __init__(self, error: Any) -> None:
        self.error = error
        self.count = 0

    def add(self, where: str, message: str) -> None:
        self.count += 1
        self.error(where, message)


def _parse(raw: Mapping[str, Any], key: str, parse: Any, where: str, errors: _Count, *,
           required: bool = False) -> Any:
    if key not in raw:
        if required:
            errors.add(f"{where}.{key}", "missing")
        return None
    value = raw[key]
    if not isinstance(value, str):
        errors.add(f"{where}.{key}", "expected a string")
        return None
    try:
        return parse(value)
    except ValueError as exc:
        errors.add(f"{where}.{key}", str(exc))
        return None


def _ttl(raw: Mapping[str, Any], key: str, where: str, error: Any) -> int | None:
    if key not in raw:
        return None
    value = raw[key]
    if not isinstance(value, str):
        error(f"{where}.{key}", 'expected a string, like "10m"')
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        error(f"{where}.{key}", str(exc))
        return None
