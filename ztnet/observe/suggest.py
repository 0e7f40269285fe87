"""``ztnet policy suggest``: a least-privilege policy for one agent, drafted from what it
was observed to do, for a person to review.

What the agent was let do (records ALLOWED, or AUDIT in audit mode) becomes rules: one per
destination and protocol, with the observed ports merged only where they are contiguous.
Destinations are the exact addresses (/32, /128) unless ``collapse`` asks for wider
networks. Where DNS evidence names an address (``dns_names``), the rule names the host name
instead, if the policy format accepts host names. Every rule carries its evidence: a TOML
comment with the record count, verdicts, hosts, first and last time and sample record ids,
and a short ``comment`` field. What was refused is listed, commented out, at the end. The
output is checked with the policy parser before it is returned, so it always parses.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ztnet.errors import PolicyError
from ztnet.grants.model import IPNetwork
from ztnet.observe.evidence import FlowGroup, group_flows
from ztnet.observe.jsonfields import format_rfc3339
from ztnet.observe.records import EventType, FlowRecord, Verdict
from ztnet.policy.document import MAX_COMMENT, parse_policy

_PROTO_WORDS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}


@dataclass(frozen=True, slots=True)
class Collapse:
    """Prefix lengths to widen observed addresses to (None: keep them exact)."""

    v4: int | None = None
    v6: int | None = None

    @classmethod
    def parse(cls, text: str) -> Collapse:
        """``/24``, ``/64`` or both, comma-separated (``/24,/64``): a prefix of 32 or less
        is taken for IPv4, a longer one for IPv6; ``v4=/N`` and ``v6=/N`` say it outright."""
        v4 = v6 = None
        for part in (p.strip() for p in text.split(",")):
            family, _, prefix = part.rpartition("=")
            digits = prefix.removeprefix("/")
            if not prefix.startswith("/") or not digits.isdigit() or family not in ("", "v4",
                                                                                  "v6"):
                raise ValueError(f"--collapse: {part!r} is not a prefix like /24 or v6=/64")
            bits = int(digits)
            if family == "v6" or (not family and bits > 32):
                if not 8 <= bits <= 128:
                    raise ValueError(f"--collapse: IPv6 prefix /{bits} outside /8../128")
                v6 = bits
            else:
                if not 8 <= bits <= 32:
                    raise ValueError(f"--collapse: IPv4 prefix /{bits} outside /8../32")
                v4 = bits
        return cls(v4, v6)

    def network(self, destination: str) -> IPNetwork:
        address = ipaddress.ip_address(destination)
        bits = self.v4 if address.version == 4 else self.v6
        full = address.max_prefixlen
        return ipaddress.ip_network(f"{address}/{full if bits is None else bits}", strict=False)


@dataclass(slots=True)
class _Rule:
    to: str
    proto: str
    ports: list[int] = field(default_factory=list)  # empty: "any"
    groups: list[FlowGroup] = field(default_factory=list)


@functools.cache
def hostname_rules_supported() -> bool:
    """Does this ztnet's policy format take host names in ``to``? (Hostname grants come
    with ztnet's resolver; until then suggestions name addresses.)"""
    probe = 'trust_domain = "example.org"\n[agents.a]\n[[agents.a.allow]]\n' \
            'to = "api.example.org"\nports = "443"\n'
    try:
        parse_policy(probe, "<probe>")
    except PolicyError:
        return False
    return True


def dns_names(records: Iterable[FlowRecord]) -> dict[str, tuple[str, ...]]:
    """Address -> the host names DNS answered it for, from the records: an address reached
    (an allowed or audited attempt) after a recorded DNS answer (event type ``dns``, verdict
    answered) of the same agent on the same host that handed it out, or a record ztnet's
    resolver named (``destination_names``). ``suggest`` names the host where there is
    exactly one."""
    answered: dict[tuple[str, str, str], tuple[int, set[str]]] = {}
    attempts: list[FlowRecord] = []
    for record in records:
        dns = record.dns
        if dns is not None:
            if dns.verdict == "answered" and dns.name:
                for address in dns.answers:
                    key = (record.agent.name, record.host, address)
                    first, names = answered.get(key, (record.time_ns, set()))
                    names.add(dns.name)
                    answered[key] = (min(first, record.time_ns), names)
        elif record.verdict is not Verdict.DENIED and record.event_type is not \
                EventType.FLOW_END:
            attempts.append(record)
    found: dict[str, set[str]] = {}
    for record in attempts:
        names = set(record.destination_names)
        hit = answered.get((record.agent.name, record.host, record.destination))
        if hit is not None and hit[0] <= record.time_ns:
            names |= hit[1]
        if names:
            found.setdefault(record.destination, set()).update(names)
    return {address: tuple(sorted(names)) for address, names in found.items()}


def _ranges(ports: list[int]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for port in sorted(set(ports)):
        if spans and port == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], port)
        else:
            spans.append((port, port))
    return spans


def _clean(text: str) -> str:
    """Printable ASCII for a TOML comment or string (record fields are validated upstream;
    this keeps a comment one line whatever reached us)."""
    return "".join(ch if " " <= ch <= "~" and ch not in '"\\' else "?" for ch in text)


def _time(ns: int) -> str:
    return format_rfc3339(ns)[:19] + "Z"


def suggest(records: Iterable[FlowRecord], agent: str, trust_domain: str, *,
            collapse: Collapse = Collapse(), dns: Mapping[str, tuple[str, ...]] | None = None,
            source: str = "", since: str = "", now_ns: int = 0) -> str:
    """The TOML text of a policy for ``agent`` (see the module docstring)."""
    records = [record for record in records if record.agent.name == agent]
    groups = group_flows(records)
    dns = dict(dns or {})
    names_ok = bool(dns) and hostname_rules_supported()
    rules: dict[tuple[str, str], _Rule] = {}
    refused: list[FlowGroup] = []
    for key in sorted(groups):
        group = groups[key]
        if not group.went_ahead:
            refused.append(group)
            continue
        proto = _PROTO_WORDS.get(key.proto, "any")
        names = dns.get(key.destination, ()) if names_ok else ()
        to = names[0] if len(names) == 1 else str(collapse.network(key.destination))
        rule = rules.setdefault((to, proto), _Rule(to, proto))
        if key.port is not None and proto in ("tcp", "udp"):
            rule.ports.append(key.port)
        rule.groups.append(group)
    lines = _header(agent, len(records), source, since, now_ns, collapse, dns, names_ok)
    lines += [f'trust_domain = "{_clean(trust_domain)}"', "", f"[agents.{agent}]",
              '# mode = "audit"   # uncomment to trial this policy without refusing anything']
    for rule in sorted(rules.values(), key=lambda r: (r.to, r.proto)):
        spans = _ranges(rule.ports) if rule.ports else [None]
        for span in spans:
            lines += _rule_lines(agent, rule, span)
    if not rules:
        lines += ["", "# nothing went ahead: this agent gets no network access at all"]
    if refused:
        lines += ["", "# Refused while recorded (not granted above; add a rule only if the "
                  "agent needs it):"]
        lines += [f"#   {_clean(g.key.describe())} on {_clean(g.key.host)}: {g.count} "
                  f"attempts, {_time(g.first_ns)} .. {_time(g.last_ns)}, e.g. "
                  f"{_clean(g.record_ids[0])}" for g in refused]
    text = "\n".join(lines) + "\n"
    parse_policy(text, "<suggested policy>")  # raises PolicyError if this module erred
    return text


def _header(agent: str, count: int, source: str, since: str, now_ns: int, collapse: Collapse,
            dns: Mapping[str, tuple[str, ...]], names_ok: bool) -> list[str]:
    made = f" at {_time(now_ns)}" if now_ns else ""
    window = f" since {_clean(since)}" if since else ""
    widen = "exact addresses (/32, /128)" if collapse == Collapse() else \
        f"addresses widened to /{collapse.v4 or 32} (IPv4) and /{collapse.v6 or 128} (IPv6)"
    if not dns:
        names = "no DNS evidence in the records, so rules name addresses"
    elif not names_ok:
        names = "DNS evidence found, but this ztnet's policy takes no host names: addresses"
    else:
        names = "host names where DNS answered exactly one name for an address"
    return [
        f"# SUGGESTED POLICY FOR HUMAN REVIEW -- agent {agent}, written by "
        f"`ztnet policy suggest`{made}.",
        f"# From {count} flow records of {agent}{window} ({_clean(source) or 'unknown source'}).",
        "# Each rule allows only what the agent was observed to do (verdict ALLOWED or AUDIT).",
        "# Observed is not the same as needed or safe: a compromised or misbehaving agent's",
        "# traffic is in the evidence too. Read every rule and its evidence, remove what the",
        "# agent should not do, then `ztnet policy check` and `ztnet policy plan` it.",
        f"# Destinations: {widen}; {names}.",
        "",
    ]


def _rule_lines(agent: str, rule: _Rule, span: tuple[int, int] | None) -> list[str]:
    if span is None:
        groups, ports = rule.groups, "any"
    else:
        groups = [g for g in rule.groups if g.key.port is not None
                  and span[0] <= g.key.port <= span[1]]
        ports = str(span[0]) if span[0] == span[1] else f"{span[0]}-{span[1]}"
    count = sum(g.count for g in groups)
    first, last = min(g.first_ns for g in groups), max(g.last_ns for g in groups)
    verdicts: dict[str, int] = {}
    for group in groups:
        for verdict, n in group.verdicts.items():
            verdicts[verdict] = verdicts.get(verdict, 0) + n
    hosts = sorted({g.key.host for g in groups})
    ids = [i for g in groups for i in g.record_ids][:3]
    more = count - len(ids)
    tally = ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items()))
    evidence = (f"# evidence: {count} records ({tally}) "
                f"to {', '.join(sorted({g.key.destination for g in groups}))} on "
                f"{', '.join(hosts)}, first {_time(first)}, last {_time(last)}; records "
                f"{', '.join(ids)}{f' (+{more} more)' if more > 0 else ''}")
    comment = _clean(f"observed {count}x {_time(first)}..{_time(last)}")[:MAX_COMMENT]
    lines = ["", _clean(evidence), f"[[agents.{agent}.allow]]", f'to = "{rule.to}"',
             f'proto = "{rule.proto}"']
    if rule.proto != "icmp":
        lines.append(f'ports = "{ports}"')
    if rule.proto == "any":
        lines.append("# proto any: the agent used an IP protocol other than TCP, UDP and "
                     "ICMP (a raw socket); this rule allows every protocol to the destination")
    lines.append(f'comment = "{comment}"')
    return lines
