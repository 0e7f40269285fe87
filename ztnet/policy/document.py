"""The human-written policy file (TOML) and its strict validation.

A policy names a trust domain and, per agent, the network paths it may use::

    trust_domain = "example.org"

    [agents.research-bot]

    [[agents.research-bot.allow]]
    to = "10.0.2.0/24"
    ports = "443"
    proto = "tcp"
    ttl = "5m"
    comment = "internal API"
    max_bytes_out = "50MB"             # optional byte budgets (docs/policy.md)

    [[agents.research-bot.allow]]
    to = "api.github.com"          # a hostname grant (ztnet.grants.names)
    ports = "443"

Validation is all-or-nothing: every problem in the file is collected and
reported at once (one line each, naming file, agent, rule and field), and a
file with any problem produces no policy. docs/policy.md is the reference.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ztnet.durations import parse_duration, parse_size
from ztnet.errors import PolicyError
from ztnet.fsutil import FileTooLarge, read_bounded
from ztnet.grants.model import (
    AGENT_NAME_RE,
    AgentMode,
    ByteBudget,
    IPNetwork,
    PortRange,
    Proto,
    is_dns_name,
    normalize_network,
)
from ztnet.grants.names import MAX_NAME_PORTS, HostPattern
from ztnet.policy.detection import Detection, parse_detection
from ztnet.policy.fields import (
    MAX_TTL,
    parse_destination,
    parse_ports,
    parse_proto,
    parse_target,
)
from ztnet.policy.jit import JitPolicy, parse_jit
from ztnet.policy.selectors import HostSelector, parse_selector

POLICY_KEYS = ("trust_domain", "agents", "jit", "detection")
AGENT_KEYS = ("mode", "allow", "hosts")
# A rule's byte budget (ztnet.grants.model.ByteBudget): per connection, and/or a total over
# every connection of the grant per budget_window.
BUDGET_KEYS = ("max_bytes_out", "max_bytes_out_window", "budget_window")

RULE_KEYS = ("to", "ports", "proto", "ttl", "comment", "allow_private", *BUDGET_KEYS)

MAX_COMMENT = 200
# A policy is a hand-written file; anything this large is a mistake, not a policy.
MAX_POLICY_BYTES = 16 * 1024 * 1024

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+\Z")

T = TypeVar("T")


# --- the parsed policy ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One ``[[agents.NAME.allow]]`` entry. ``to`` is a network or a host name pattern;
    ``ports`` None means any port; ``ttl`` None means the compiler's default lifetime
    (seconds). ``allow_private`` (hostname rules only): keep answers in private, loopback,
    link-local and metadata ranges."""

    to: IPNetwork | HostPattern
    proto: Proto
    ports: PortRange | None
    ttl: int | None = None
    comment: str = ""
    budget: ByteBudget | None = None
    allow_private: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.to, HostPattern):
            if self.proto is Proto.ICMP:
                raise ValueError("a hostname rule is for tcp, udp or any, not icmp")
            if self.budget is not None:
                raise ValueError("a hostname rule has no byte budget")
        elif normalize_network(self.to) != self.to:
            raise ValueError(f"{self.to} is IPv4-mapped: write it as IPv4")
        elif self.allow_private:
            raise ValueError("allow_private is for hostname rules only")
        if self.proto is Proto.ICMP and self.ports is not None:
            raise ValueError("an icmp rule cannot name ports")
        if self.ttl is not None and not 0 < self.ttl <= MAX_TTL:
            raise ValueError(f"ttl must be between 1s and {MAX_TTL}s, got {self.ttl}")
        if not _single_line(self.comment) or len(self.comment) > MAX_COMMENT:
            raise ValueError("comment must be one line of at most 200 characters")

    @property
    def ports_text(self) -> str:
        return "any" if self.ports is None else str(self.ports)

    def canonical(self) -> tuple[str, str, str]:
        """What the rule allows, independent of how it was written and of its
        lifetime: the identity a grant id is derived from."""
        to = str(self.to) + (" allow_private" if self.allow_private else "")
        return (to, self.ports_text, str(self.proto))


@dataclass(frozen=True, slots=True)
class AgentPolicy:
    """An agent and its allow rules; no rules means no network access (in
    ``audit`` mode: everything but loopback and link-local, recorded as AUDIT).
    ``hosts`` None: its grants go to every host; else only to hosts the selector matches."""

    name: str
    allow: tuple[AllowRule, ...] = ()
    hosts: HostSelector | None = None
    mode: AgentMode = AgentMode.ENFORCE

    def __post_init__(self) -> None:
        if not AGENT_NAME_RE.match(self.name):
            raise ValueError(f"agent name {self.name!r} is not a DNS label")


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy. ``source`` names the file it came from (for
    messages) and takes no part in equality."""

    trust_domain: str
    agents: tuple[AgentPolicy, ...] = ()
    source: str = field(default="<policy>", compare=False)
    jit: JitPolicy = field(default_factory=JitPolicy)  # just-in-time grants (policy/jit.py)
    # detector thresholds and responses (ztnet.policy.detection; defaults if absent)
    detection: Detection = field(default_factory=Detection)

    def __post_init__(self) -> None:
        if not is_dns_name(self.trust_domain):
            raise ValueError(f"trust domain {self.trust_domain!r} is not a DNS name")
        names = [agent.name for agent in self.agents]
        if len(set(names)) != len(names):
            raise ValueError("agent names must be unique")

    def agent(self, name: str) -> AgentPolicy | None:
        return next((agent for agent in self.agents if agent.name == name), None)

    @property
    def rule_count(self) -> int:
        return sum(len(agent.allow) for agent in self.agents)


# --- loading ----------------------------------------------------------------------


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a policy file; PolicyError lists every problem."""
    name = os.fspath(path)
    try:
        data = read_bounded(name, MAX_POLICY_BYTES)
    except OSError as exc:
        raise PolicyError(f"policy: {name}: cannot read: {exc.strerror or exc}") from None
    except FileTooLarge:
        raise PolicyError(f"policy: {name}: larger than {MAX_POLICY_BYTES} bytes") from None
    try:
        text = data.decode("utf-8-sig")  # editors on some systems add a BOM
    except UnicodeDecodeError as exc:
        raise PolicyError(
            f"policy: {name}: not UTF-8 text (bad byte at offset {exc.start})"
        ) from None
    return parse_policy(text, name)


def parse_policy(text: str, source_name: str) -> Policy:
    """Validate policy text; ``source_name`` is used in messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(_toml_error(source_name, text, exc)) from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise PolicyError(f"policy: {source_name}: arrays or tables nested too deeply") from None
    errors = _Errors(source_name)
    policy = _parse_document(data, errors)
    if errors.lines or policy is None:
        raise PolicyError("\n".join(errors.lines))
    return policy


__all__ = [
    "MAX_TTL",
    "AgentPolicy",
    "AllowRule",
    "Policy",
    "load_policy",
    "parse_destination",
    "parse_policy",
    "parse_target",
    "parse_ports",
    "parse_proto",
]


class _Errors:
    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.lines.append(f"policy: {self.source}: {where}: {message}")


def _parse_document(data: Mapping[str, Any], errors: _Errors) -> Policy | None:
    _check_keys(data, POLICY_KEYS, "", errors)
    trust_domain = data.get("trust_domain")
    if trust_domain is None:
        errors.add("trust_domain", 'missing; start the file with trust_domain = "example.org"')
    elif not isinstance(trust_domain, str):
        errors.add("trust_domain", f"expected a string, got {_type_name(trust_domain)}")
    elif not is_dns_name(trust_domain):
        fixed = trust_domain.strip().lower().rstrip(".")
        hint = f'; did you mean "{fixed}"?' if is_dns_name(fixed) else ""
        errors.add(
            "trust_domain",
            f"{trust_domain!r} is not a lower-case DNS name like example.org{hint}",
        )
    agents_table = data.get("agents", {})
    if not isinstance(agents_table, dict):
        errors.add("agents", f"expected [agents.NAME] tables, got {_type_name(agents_table)}")
        return None
    agents = [_parse_agent(name, body, errors) for name, body in agents_table.items()]
    jit = parse_jit(data["jit"], errors.add) if "jit" in data else JitPolicy()
    detection = parse_detection(data.get("detection"), errors.add)
    if errors.lines or not isinstance(trust_domain, str) or jit is None:
        return None
    return Policy(
        trust_domain,
        tuple(agent for agent in agents if agent is not None),
        source=errors.source,
        jit=jit,
        detection=detection,
    )


def _parse_agent(name: str, body: object, errors: _Errors) -> AgentPolicy | None:
    where = f"agents.{_key(name)}"
    before = len(errors.lines)
    if not AGENT_NAME_RE.match(name):
        fixed = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
        hint = f'; did you mean "{fixed}"?' if AGENT_NAME_RE.match(fixed) else ""
        errors.add(
            where,
            f"agent name {name!r} is not a DNS label (1-63 lower-case letters, digits "
            f"and '-', not starting or ending with '-'){hint}",
        )
    if not isinstance(body, dict):
        errors.add(where, f"expected a table ([{where}]), got {_type_name(body)}")
        return None
    _check_keys(body, AGENT_KEYS, where, errors)
    allow = body.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(rule, dict) for rule in allow):
        errors.add(
            f"{where}.allow",
            f"expected an array of tables: write each rule under [[{where}.allow]]",
        )
        return None
    rules = [_parse_rule(rule, f"{where}.allow[{i}]", errors) for i, rule in enumerate(allow)]
    hosts = None
    if "hosts" in body:
        hosts = _field(parse_selector, body["hosts"], f"{where}.hosts", errors)
    mode = AgentMode.ENFORCE
    mode_text = _string_field(body, "mode", where, errors)
    if mode_text is not None:
        try:
            mode = AgentMode(mode_text)
        except ValueError:
            errors.add(f"{where}.mode", f'{mode_text!r} is not a mode: write mode = "enforce" '
                       'or mode = "audit"')
    if len(errors.lines) != before:
        return None
    return AgentPolicy(name, tuple(rule for rule in rules if rule is not None), hosts, mode)


def _parse_rule(raw: Mapping[str, Any], where: str, errors: _Errors) -> AllowRule | None:
    before = len(errors.lines)
    _check_keys(raw, RULE_KEYS, where, errors)

    network: IPNetwork | HostPattern | None = None
    to = _string_field(raw, "to", where, errors, required='to = "10.0.2.0/24"')
    if to is not None:
        network = _field(parse_target, to, f"{where}.to", errors)
    hostname = isinstance(network, HostPattern)

    proto: Proto | None = Proto.TCP
    proto_text = _string_field(raw, "proto", where, errors)
    if proto_text is not None:
        proto = _field(parse_proto, proto_text, f"{where}.proto", errors)
    elif "proto" in raw:
        proto = None

    ports: PortRange | None = None
    ports_text = _string_field(raw, "ports", where, errors)
    if ports_text is not None:
        ports = _field(parse_ports, ports_text, f"{where}.ports", errors)
        if proto is Proto.ICMP and ports_text != "any":
            errors.add(f"{where}.ports", 'icmp has no ports: write ports = "any" or leave it out')
    elif "ports" not in raw and proto is not Proto.ICMP and proto is not None:
        errors.add(
            f"{where}.ports",
            f'missing: {proto} rules need ports = "443", a range like "8000-8100", or "any"',
        )

    if hostname and proto is Proto.ICMP:
        errors.add(f"{where}.proto", "a hostname rule is for tcp, udp or any, not icmp")
    if hostname and ports is not None and ports.last - ports.first + 1 > MAX_NAME_PORTS:
        errors.add(f"{where}.ports", f"a hostname rule names at most {MAX_NAME_PORTS} ports "
                   "(each resolved address becomes one kernel entry per port)")

    allow_private = False
    if "allow_private" in raw:
        value = raw["allow_private"]
        if not isinstance(value, bool):
            errors.add(f"{where}.allow_private", f"expected true or false, got {_type_name(value)}")
        elif value and not hostname:
            errors.add(f"{where}.allow_private", "only hostname rules (to = \"api.example.com\") "
                       "have answers to keep; an address rule already says where it goes")
        else:
            allow_private = value

    ttl: int | None = None
    ttl_text = _string_field(raw, "ttl", where, errors)
    if ttl_text is not None:
        ttl = _field(parse_duration, ttl_text, f"{where}.ttl", errors)

    comment = _string_field(raw, "comment", where, errors) or ""
    if not _single_line(comment):
        errors.add(f"{where}.comment", "must be a single line without control characters")
    elif len(comment) > MAX_COMMENT:
        errors.add(f"{where}.comment", f"longer than {MAX_COMMENT} characters")

    budget = _parse_budget(raw, where, errors)
    if hostname and budget is not None:
        errors.add(f"{where}.max_bytes_out", "byte budgets are for address rules; a hostname "
                   "rule has none (docs/policy.md)")

    if len(errors.lines) != before or network is None or proto is None:
        return None
    return AllowRule(network, proto, ports, ttl, comment, budget, allow_private)


def _parse_budget(raw: Mapping[str, Any], where: str, errors: _Errors) -> ByteBudget | None:
    """``max_bytes_out = "50MB"`` and/or ``max_bytes_out_window = "1GB"`` with
    ``budget_window = "1h"``; None when the rule has neither."""
    before = len(errors.lines)
    sizes = {}
    for key in ("max_bytes_out", "max_bytes_out_window"):
        text = _string_field(raw, key, where, errors)
        if text is not None:
            size = _field(parse_size, text, f"{where}.{key}", errors)
            if size is not None and size <= 0:
                errors.add(f"{where}.{key}", "must be at least one byte")
            sizes[key] = size or 0
    window_text = _string_field(raw, "budget_window", where, errors)
    window = _field(parse_duration, window_text, f"{where}.budget_window", errors) \
        if window_text is not None else None
    if "max_bytes_out_window" in sizes and window_text is None:
        errors.add(f"{where}.budget_window",
                   'missing: max_bytes_out_window needs budget_window = "1h" (or another length)')
    if window_text is not None and "max_bytes_out_window" not in sizes:
        errors.add(f"{where}.budget_window", "only means something with max_bytes_out_window")
    if not sizes or len(errors.lines) != before:
        return None
    try:
        return ByteBudget(sizes.get("max_bytes_out", 0), sizes.get("max_bytes_out_window", 0),
                          window or 0)
    except ValueError as exc:
        errors.add(f"{where}.max_bytes_out", str(exc))
        return None


def _string_field(
    raw: Mapping[str, Any],
    key: str,
    where: str,
    errors: _Errors,
    *,
    required: str = "",
) -> str | None:
    """The string value of ``key``, or None (with an error if it was
    required or is not a string)."""
    if key not in raw:
        if required:
            errors.add(f"{where}.{key}", f"missing: every rule needs {required}")
        return None
    value = raw[key]
    if not isinstance(value, str):
        hint = f'; write {key} = "{value}"' if isinstance(value, int | float) else ""
        errors.add(f"{where}.{key}", f"expected a string, got {_type_name(value)}{hint}")
        return None
    return value


def _field(parse: Callable[[Any], T], text: object, where: str, errors: _Errors) -> T | None:
    try:
        result = parse(text)
    except ValueError as exc:
        errors.add(where, str(exc))
        return None
    return result


def _check_keys(
    table: Mapping[str, Any], allowed: tuple[str, ...], where: str, errors: _Errors
) -> None:
    for key in table:
        if key in allowed:
            continue
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (expected {', '.join(allowed)})"
        path = f"{where}.{_key(key)}" if where else _key(key)
        errors.add(path, f"unknown key {key!r}{hint}")


def _toml_error(source: str, text: str, exc: tomllib.TOMLDecodeError) -> str:
    message = str(exc)
    match = re.fullmatch(r"(.*) \(at line (\d+), column \d+\)", message, re.DOTALL)
    if match is None:
        return f"policy: {source}: invalid TOML: {message}"
    detail, line = match[1], int(match[2])
    duplicate = re.fullmatch(r"Cannot declare \('agents', '([^']*)'\) twice", detail)
    if duplicate:
        name = duplicate[1]
        detail = (
            f"agents.{_key(name)}: agent {name!r} is declared twice; "
            f"put all its rules under one [agents.{_key(name)}]"
        )
    elif detail.startswith("Cannot declare") or detail.startswith("Cannot overwrite"):
        detail = f"invalid TOML: {detail} (a table or key is defined twice)"
    else:
        detail = f"invalid TOML: {detail}"
    lines = text.splitlines()
    context = f" (near {lines[line - 1].strip()!r})" if 0 < line <= len(lines) else ""
    return f"policy: {source}: line {line}: {detail}{context}"


def _key(name: str) -> str:
    """A TOML dotted-path component, quoted when it is not a bare key."""
    return name if _BARE_KEY_RE.match(name) else '"' + name.replace('"', '\\"') + '"'


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return "a date/time"


def _single_line(text: str) -> bool:
    return text.isprintable()
