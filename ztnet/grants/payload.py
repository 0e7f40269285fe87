"""The bundle payload: a policy version's grants for one host, and its one
canonical byte encoding.

Canonical form is JSON with sorted keys, no whitespace, ASCII only, and every
time as an integer count of Unix *milliseconds* (keys end in ``_ms``), so that
no float formatting ever decides what bytes get signed::

    {"audience":"web-1","expires_ms":…,"grants":[{"agent":"spiffe://example.org/agent/bot",
     "destination":"10.0.2.0/24","id":"g-…","not_after_ms":…,"not_before_ms":…,
     "ports":"443","proto":"tcp","serial":7000000}],"issued_at_ms":…,
     "issuer":"…","trust_domain":"example.org","version":7}

In Python, times are float Unix seconds that are whole milliseconds; a
Bundle refuses any other value, so ``decode_payload(encode_payload(b)) == b``
always holds. Decoding is strict (exact keys, exact types, canonical spelling
of every field and of the whole document); anything else is BundleRejected.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Any

from ztnet.errors import BundleRejected
from ztnet.grants import strictjson
from ztnet.grants.limits import (
    MAX_BUNDLE_GRANTS,
    MAX_BUNDLE_NAMES,
    MAX_ISSUER,
    MAX_PAYLOAD_BYTES,
    MAX_PAYLOAD_LISTS,
    MAX_PAYLOAD_OBJECTS,
    MAX_QUARANTINED,
    structure_kept,
)
from ztnet.grants.model import (
    AGENT_NAME_RE,
    ByteBudget,
    Grant,
    IPNetwork,
    PortRange,
    Proto,
    format_grant_id,
    is_dns_name,
    normalize_network,
    parse_grant_id,
)
from ztnet.grants.names import HostPattern, NameGrant
from ztnet.pki import SCHEME as SPIFFE_SCHEME
from ztnet.pki import spiffe_agent_id

MAX_INT64 = 2**63 - 1
# Year 2286. Keeps ms → float seconds → ms exact (float spacing stays far
# below a millisecond) and nanosecond deadlines far inside 64 bits.
MAX_TIME_MS = 10**13

BUNDLE_KEYS = frozenset(
    {"trust_domain", "issuer", "audience", "version", "issued_at_ms", "expires_ms", "grants"}
)
# Optional, present only when not empty (so that bundles without audited agents keep the
# bytes they always had): the SPIFFE ids of the agents in audit mode, sorted.
AUDIT_KEY = "audit"
# Optional: present only when some agent is quarantined on this host (so a bundle without
# quarantines has the same bytes as before the key existed).
QUARANTINE_KEY = "quarantine"
QUARANTINE_KEYS = frozenset({"agent", "freeze"})
GRANT_KEYS = frozenset(
    {
        "id",
        "serial",
        "agent",
        "destination",
        "proto",
        "ports",
        "not_before_ms",
        "not_after_ms",
    }
)
# Optional on a grant, present only when it has a byte budget (so grants without one keep
# the bytes they always had): {"max_bytes_out":…,"max_bytes_out_window":…,"window_ms":…}.
BUDGET_KEY = "budget"
BUDGET_KEYS = frozenset({"max_bytes_out", "max_bytes_out_window", "window_ms"})
# Hostname grants: a list of their own, present only when non-empty, so that a bundle
# without any keeps the encoding (and the signatures) it always had.
NAMES_KEY = "names"
NAME_KEYS = frozenset(
    {
        "id",
        "serial",
        "agent",
        "name",
        "proto",
        "ports",
        "private",
        "not_before_ms",
        "not_after_ms",
    }
)
# Host names as hosts really have them (underscores occur), in lower case.
_HOST_LABEL = r"[a-z0-9_][a-z0-9_-]{0,62}"
_HOST_RE = re.compile(rf"{_HOST_LABEL}(\.{_HOST_LABEL})*\Z")
_PROTOS = {str(proto): proto for proto in Proto}


@dataclass(frozen=True, slots=True)
class GrantRecord:
    """A grant as issued: the grant and its serial (a per-issuance number,
    unique within the bundle; see ztnet.policy.issue.issue_bundle)."""

    grant: Grant
    serial: int

    def __post_init__(self) -> None:
        if not 0 <= self.serial <= MAX_INT64:
            raise ValueError(f"serial {self.serial} is not a 64-bit non-negative number")
        to_ms(self.grant.not_before, "not_before")
        to_ms(self.grant.not_after, "not_after")


@dataclass(frozen=True, slots=True)
class Quarantine:
    """An agent the host must deny everything (the kernel's quarantine flag), and whether
    its processes are frozen too (``cgroup.freeze``)."""

    agent: str
    freeze: bool = False


@dataclass(frozen=True, slots=True)
class NameRecord:
    """A hostname grant as issued, with its serial (unique among all of the bundle's)."""

    grant: NameGrant
    serial: int

    def __post_init__(self) -> None:
        if not 0 <= self.serial <= MAX_INT64:
            raise ValueError(f"serial {self.serial} is not a 64-bit non-negative number")
        to_ms(self.grant.not_before, "not_before")
        to_ms(self.grant.not_after, "not_after")


@dataclass(frozen=True, slots=True)
class Bundle:
    """Everything one host may enforce for one policy version. ``expires`` is
    the bundle's own freshness limit: past it the bundle is refused even if
    its grants would still be live, so a withheld update cannot freeze a host
    on an old policy."""

    trust_domain: str
    issuer: str
    audience: str
    version: int
    issued_at: float
    expires: float
    grants: tuple[GrantRecord, ...]
    audit_agents: tuple[str, ...] = ()  # agent names in audit mode, sorted, unique
    # Agents quarantined on this host, sorted by name (one entry each).
    quarantine: tuple[Quarantine, ...] = ()
    names: tuple[NameRecord, ...] = ()

    def __post_init__(self) -> None:
        names = [entry.agent for entry in self.quarantine]
        if names != sorted(set(names)) or len(names) > MAX_QUARANTINED:
            raise ValueError("quarantine: agents must be unique and sorted by name, "
                             f"at most {MAX_QUARANTINED}")
        if not all(AGENT_NAME_RE.match(name) for name in names):
            raise ValueError("quarantine: not an agent name")
        if not is_dns_name(self.trust_domain):
            raise ValueError(f"trust domain {self.trust_domain!r} is not a lower-case DNS name")
        if not 0 < len(self.issuer) <= MAX_ISSUER or not _printable_ascii(self.issuer):
            raise ValueError("issuer must be 1-256 printable ASCII characters")
        if normalize_host(self.audience) != self.audience:
            raise ValueError(f"audience {self.audience!r} is not a lower-case host name")
        if not 1 <= self.version <= MAX_INT64:
            raise ValueError(f"version {self.version} must be between 1 and 2**63-1")
        if to_ms(self.expires, "expires") <= to_ms(self.issued_at, "issued_at"):
            raise ValueError("expires must be later than issued_at")
        # One id, one grant: the kernel reports decisions by id, and two grants
        # under one id would make "which grant allowed this" ambiguous.
        seen: set[int] = set()
        for grant_id in [r.grant.grant_id for r in self.grants] + \
                [r.grant.grant_id for r in self.names]:
            if grant_id in seen:
                raise ValueError(f"grant id {format_grant_id(grant_id)} appears more than once")
            seen.add(grant_id)
        serials = [record.serial for record in self.grants] + [r.serial for r in self.names]
        if len(set(serials)) != len(serials):
            raise ValueError("grant serials must be unique")
        if list(self.audit_agents) != sorted(set(self.audit_agents)):
            raise ValueError("audit agents must be sorted and unique")
        for name in self.audit_agents:
            if not AGENT_NAME_RE.match(name):
                raise ValueError(f"audit agent {name!r} is not an agent name")

    def agent_id(self, agent: str) -> str:
        return spiffe_agent_id(self.trust_domain, agent)

    def with_grants(self, version: int, issued_at: float,
                    grants: tuple[GrantRecord, ...]) -> Bundle:
        """This bundle with other grants, without checking all of them again: for the
        state a verified delta leads to (ztnet.grants.delta.verify_delta checked that its
        additions' ids and serials are new and that the version moves up), where
        __post_init__ would pass over 100,000 grants for the one that changed."""
        bundle = object.__new__(Bundle)
        for name in self.__slots__:
            object.__setattr__(bundle, name, getattr(self, name))
        object.__setattr__(bundle, "version", version)
        object.__setattr__(bundle, "issued_at", issued_at)
        object.__setattr__(bundle, "grants", grants)
        return bundle


# --- helpers shared with issuing and verifying -----------------------------------


def to_ms(seconds: float, what: str = "time") -> int:
    """Exact milliseconds of a time that must be a whole number of them."""
    if not math.isfinite(seconds):
        raise ValueError(f"{what} must be a finite number")
    ms = round(seconds * 1000)
    if ms / 1000 != seconds:
        raise ValueError(f"{what} {seconds!r} is not a whole number of milliseconds")
    if not 0 <= ms <= MAX_TIME_MS:
        raise ValueError(f"{what} {seconds!r} is outside 1970..2286")
    return ms


def floor_ms(seconds: float) -> float:
    """``seconds`` rounded down to whole milliseconds (idempotent)."""
    ms = round(seconds * 1000)
    if ms / 1000 != seconds:
        ms = math.floor(seconds * 1000)
    return ms / 1000


def normalize_host(host: str) -> str:
    """Lower-case, without a trailing dot; ValueError if not a host name."""
    name = host.lower().removesuffix(".")
    if len(name) > 253 or not _HOST_RE.match(name):
        raise ValueError(f"{host!r} is not a host name")
    return name


def parse_spiffe_agent_id(uri: str, trust_domain: str) -> str:
    """The agent name in ``spiffe://<trust_domain>/agent/<name>`` (the inverse of
    ``ztnet.pki.spiffe_agent_id``; the name rule is the grant model's)."""
    if not uri.startswith(SPIFFE_SCHEME):
        raise ValueError(f"{uri!r} is not a SPIFFE id")
    domain, _, path = uri[len(SPIFFE_SCHEME) :].partition("/")
    if domain != trust_domain:
        raise ValueError(f"{uri!r} is not under trust domain {trust_domain}")
    name = path.removeprefix("agent/")
    if name == path or not AGENT_NAME_RE.match(name):
        raise ValueError(f"{uri!r} is not an agent id spiffe://{trust_domain}/agent/<name>")
    return name


# --- encoding --------------------------------------------------------------------


def encode_payload(bundle: Bundle) -> bytes:
    document: dict[str, object] = {
        "trust_domain": bundle.trust_domain,
        "issuer": bundle.issuer,
        "audience": bundle.audience,
        "version": bundle.version,
        "issued_at_ms": to_ms(bundle.issued_at),
        "expires_ms": to_ms(bundle.expires),
        "grants": [encode_grant_record(bundle.trust_domain, record) for record in bundle.grants],
    }
    if bundle.audit_agents:
        document[AUDIT_KEY] = [bundle.agent_id(name) for name in bundle.audit_agents]
    if bundle.quarantine:
        document[QUARANTINE_KEY] = [{"agent": bundle.agent_id(entry.agent),
                                     "freeze": entry.freeze} for entry in bundle.quarantine]
    if bundle.names:
        document[NAMES_KEY] = [_encode_name(bundle, record) for record in bundle.names]
    return strictjson.dumps(document)


def _encode_name(bundle: Bundle, record: NameRecord) -> dict[str, object]:
    grant = record.grant
    return {
        "id": format_grant_id(grant.grant_id),
        "serial": record.serial,
        "agent": bundle.agent_id(grant.agent),
        "name": str(grant.pattern),
        "proto": str(grant.proto),
        "ports": "any" if grant.ports is None else str(grant.ports),
        "private": grant.allow_private,
        "not_before_ms": to_ms(grant.not_before),
        "not_after_ms": to_ms(grant.not_after),
    }


def encode_grant_record(trust_domain: str, record: GrantRecord) -> dict[str, object]:
    """One grant as the payloads carry it (a bundle's list, a delta's additions)."""
    grant = record.grant
    encoded: dict[str, object] = {
        "id": format_grant_id(grant.grant_id),
        "serial": record.serial,
        "agent": spiffe_agent_id(trust_domain, grant.agent),
        "destination": str(grant.network),
        "proto": str(grant.proto),
        "ports": "any" if grant.ports is None else str(grant.ports),
        "not_before_ms": to_ms(grant.not_before),
        "not_after_ms": to_ms(grant.not_after),
    }
    if grant.budget is not None:
        encoded[BUDGET_KEY] = {"max_bytes_out": grant.budget.max_bytes_out,
                               "max_bytes_out_window": grant.budget.max_bytes_out_window,
                               "window_ms": grant.budget.window * 1000}
    return encoded


def decode_payload(data: bytes, *, fast: bool = True) -> Bundle:
    """The Bundle in ``data``; BundleRejected names what is wrong and where.
    Size and structure are bounded before any object is built (limits.py).
    ``fast``: try fastpayload.decode_canonical first (same result, see there)."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise _malformed(f"{len(data)} bytes, more than the limit of {MAX_PAYLOAD_BYTES}")
    braces = structure_kept(data, b"{[", stop_above=MAX_PAYLOAD_OBJECTS + MAX_PAYLOAD_LISTS)
    if braces.count(b"{") > MAX_PAYLOAD_OBJECTS or braces.count(b"[") > MAX_PAYLOAD_LISTS:
        raise _malformed(f"more objects or lists than {MAX_BUNDLE_GRANTS} grants need; "
                         "refused before parsing")
    from ztnet.grants.fastpayload import decode_canonical  # it builds on this module

    # the same Bundle, sooner (or None: then the strict path below decides)
    accelerated = decode_canonical(data, MAX_BUNDLE_GRANTS) if fast else None
    if accelerated is not None:
        return accelerated
    try:
        document = strictjson.loads(data)
    except strictjson.StrictJSONError as exc:
        raise _malformed(str(exc)) from None
    optional = {AUDIT_KEY, QUARANTINE_KEY, NAMES_KEY} & set(document) \
        if isinstance(document, dict) else set()
    has_names = NAMES_KEY in optional
    obj = _object(document, BUNDLE_KEYS | optional, "payload")
    trust_domain = _string(obj, "trust_domain", "")
    if not is_dns_name(trust_domain):
        raise _malformed(f"trust_domain: {trust_domain!r} is not a lower-case DNS name")
    audit_agents = _audit_agents(obj.get(AUDIT_KEY, []), trust_domain)
    raw_grants = obj["grants"]
    if not isinstance(raw_grants, list):
        raise _malformed("grants: expected a list")
    if len(raw_grants) > MAX_BUNDLE_GRANTS:
        raise _malformed(f"grants: {len(raw_grants)} grants, more than the limit of "
                         f"{MAX_BUNDLE_GRANTS}")
    if len(audit_agents) + len(raw_grants) > MAX_BUNDLE_GRANTS:
        raise _malformed(f"{len(raw_grants)} grants and {len(audit_agents)} audited agents, "
                         f"more than the limit of {MAX_BUNDLE_GRANTS} together")
    records = tuple(
        decode_grant_record(raw, f"grants[{index}]", trust_domain)
        for index, raw in enumerate(raw_grants)
    )
    names: tuple[NameRecord, ...] = ()
    if has_names:
        raw_names = obj[NAMES_KEY]
        if not isinstance(raw_names, list) or not raw_names:
            raise _malformed("names: expected a non-empty list (absent when there are none)")
        if len(raw_names) > MAX_BUNDLE_NAMES:
            raise _malformed(f"names: {len(raw_names)} hostname grants, more than the limit "
                             f"of {MAX_BUNDLE_NAMES}")
        names = tuple(_decode_name(raw, f"names[{index}]", trust_domain)
                      for index, raw in enumerate(raw_names))
    try:
        bundle = Bundle(
            trust_domain=trust_domain,
            issuer=_string(obj, "issuer", ""),
            audience=_string(obj, "audience", ""),
            version=_integer(obj, "version", ""),
            issued_at=_integer(obj, "issued_at_ms", "") / 1000,
            expires=_integer(obj, "expires_ms", "") / 1000,
            grants=records,
            audit_agents=audit_agents,
            quarantine=_quarantine(obj.get(QUARANTINE_KEY, []), trust_domain),
            names=names,
        )
    except ValueError as exc:
        raise _malformed(str(exc)) from None
    # Every field was checked to be in canonical spelling; this also pins key
    # order and whitespace, so one bundle has exactly one byte encoding and
    # payload_sha256 identifies it.
    if encode_payload(bundle) != data:
        raise _malformed("not in canonical form (sorted keys, no whitespace, ASCII)")
    return bundle


def _decode_budget(raw: Any, where: str) -> ByteBudget:
    obj = _object(raw, BUDGET_KEYS, where)
    window_ms = _integer(obj, "window_ms", where)
    if window_ms % 1000:
        raise _malformed(f"{where}.window_ms: not a whole number of seconds")
    try:
        return ByteBudget(_integer(obj, "max_bytes_out", where),
                          _integer(obj, "max_bytes_out_window", where), window_ms // 1000)
    except ValueError as exc:
        raise _malformed(f"{where}: {exc}") from None


def decode_grant_record(raw: Any, where: str, trust_domain: str) -> GrantRecord:
    """One grant of a payload, strictly (the inverse of ``encode_grant_record``)."""
    optional = {BUDGET_KEY} & set(raw) if isinstance(raw, dict) else set()
    obj = _object(raw, GRANT_KEYS | optional, where)
    try:
        grant_id = parse_grant_id(_string(obj, "id", where))
        agent = parse_spiffe_agent_id(_string(obj, "agent", where), trust_domain)
    except ValueError as exc:
        raise _malformed(f"{where}: {exc}") from None
    proto_text = _string(obj, "proto", where)
    if proto_text not in _PROTOS:
        raise _malformed(f"{where}.proto: {proto_text!r} is not tcp, udp, icmp or any")
    try:
        grant = Grant(
            grant_id=grant_id,
            agent=agent,
            proto=_PROTOS[proto_text],
            network=_network(_string(obj, "destination", where), f"{where}.destination"),
            ports=_ports(_string(obj, "ports", where), f"{where}.ports"),
            not_before=_integer(obj, "not_before_ms", where) / 1000,
            not_after=_integer(obj, "not_after_ms", where) / 1000,
            budget=_decode_budget(obj[BUDGET_KEY], f"{where}.{BUDGET_KEY}")
            if BUDGET_KEY in obj else None,
        )
        return GrantRecord(grant, _integer(obj, "serial", where))
    except ValueError as exc:
        raise _malformed(f"{where}: {exc}") from None


def _audit_agents(raw: Any, trust_domain: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_BUNDLE_GRANTS:
        raise _malformed(f"{AUDIT_KEY}: expected a list of at most {MAX_BUNDLE_GRANTS} agent ids")
    names = []
    for index, uri in enumerate(raw):
        if not isinstance(uri, str):
            raise _malformed(f"{AUDIT_KEY}[{index}]: expected a string")
        try:
            names.append(parse_spiffe_agent_id(uri, trust_domain))
        except ValueError as exc:
            raise _malformed(f"{AUDIT_KEY}[{index}]: {exc}") from None
    return tuple(names)


def _quarantine(raw: Any, trust_domain: str) -> tuple[Quarantine, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_QUARANTINED:
        raise _malformed(f"quarantine: expected a list of at most {MAX_QUARANTINED}")
    entries = []
    for index, item in enumerate(raw):
        where = f"quarantine[{index}]"
        obj = _object(item, QUARANTINE_KEYS, where)
        try:
            agent = parse_spiffe_agent_id(_string(obj, "agent", where), trust_domain)
        except ValueError as exc:
            raise _malformed(f"{where}: {exc}") from None
        if not isinstance(obj["freeze"], bool):
            raise _malformed(f"{where}.freeze: expected true or false")
        entries.append(Quarantine(agent, obj["freeze"]))
    return tuple(entries)


def _decode_name(raw: Any, where: str, trust_domain: str) -> NameRecord:
    obj = _object(raw, NAME_KEYS, where)
    try:
        grant_id = parse_grant_id(_string(obj, "id", where))
        agent = parse_spiffe_agent_id(_string(obj, "agent", where), trust_domain)
        pattern = HostPattern(_string(obj, "name", where))
    except ValueError as exc:
        raise _malformed(f"{where}: {exc}") from None
    proto_text = _string(obj, "proto", where)
    if proto_text not in _PROTOS:
        raise _malformed(f"{where}.proto: {proto_text!r} is not tcp, udp or any")
    private = obj["private"]
    if not isinstance(private, bool):
        raise _malformed(f"{where}.private: expected true or false")
    try:
        grant = NameGrant(
            grant_id=grant_id,
            agent=agent,
            proto=_PROTOS[proto_text],
            pattern=pattern,
            ports=_ports(_string(obj, "ports", where), f"{where}.ports"),
            not_before=_integer(obj, "not_before_ms", where) / 1000,
            not_after=_integer(obj, "not_after_ms", where) / 1000,
            allow_private=private,
        )
        return NameRecord(grant, _integer(obj, "serial", where))
    except ValueError as exc:
        raise _malformed(f"{where}: {exc}") from None


def _network(text: str, where: str) -> IPNetwork:
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise _malformed(f"{where}: {text!r} is not a CIDR with host bits clear") from None
    if normalize_network(network) != network:
        raise _malformed(f"{where}: {text!r} is IPv4-mapped; bundles carry it as IPv4")
    if str(network) != text or "/" not in text:
        raise _malformed(f"{where}: {text!r} is not canonical (expected {network})")
    return network


def _ports(text: str, where: str) -> PortRange | None:
    if text == "any":
        return None
    try:
        ports = PortRange.parse(text)
    except ValueError as exc:
        raise _malformed(f"{where}: {exc}") from None
    if str(ports) != text:
        raise _malformed(f"{where}: {text!r} is not canonical (expected {ports})")
    return ports


def _object(value: Any, keys: frozenset[str], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _malformed(f"{where}: expected an object")
    if value.keys() != keys:
        raise _malformed(f"{where}: {strictjson.key_diff(keys, value.keys())}")
    return value


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _malformed(f"{_path(where, key)}: expected a string")
    return value


def _integer(obj: dict[str, Any], key: str, where: str) -> int:
    value = obj[key]
    # bool is an int subclass in Python, but `true` is not a number.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _malformed(f"{_path(where, key)}: expected an integer")
    if not 0 <= value <= MAX_INT64:
        raise _malformed(f"{_path(where, key)}: {value} is out of range")
    return value


def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _malformed(what: str) -> BundleRejected:
    return BundleRejected(f"bundle: malformed payload: {what}")


def _printable_ascii(text: str) -> bool:
    return all(" " <= char <= "~" for char in text)
