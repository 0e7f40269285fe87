"""The policy's ``[detection]`` table: detector thresholds and the response each detector
triggers (docs/detection.md has the reference and the defaults' reasons)::

    [detection]
    learning = "24h"          # baseline learning window, from an agent's first flow
    cooldown = "5m"           # per agent: at most one automatic action in this time
    max_auto_quarantines = 5  # per hour, the whole fleet: beyond it, alert only
    denied_burst = 20         # thresholds (any of THRESHOLDS), for every agent

    [detection.actions]       # detector -> "alert" | "quarantine" | "off"
    fan-out = "quarantine"

    [detection.agents.research-bot]   # one agent's overrides: thresholds and actions
    fan_out = 40
    actions = { denied-burst = "quarantine" }

Pure: parsed with the rest of the policy, all-or-nothing, every problem named.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ztnet.durations import parse_duration, parse_size
from ztnet.grants.model import AGENT_NAME_RE

DETECTORS = ("denied-burst", "new-destination", "fan-out", "egress-volume",
             "sensitive-destination", "dns-entropy", "dns-subdomains", "dns-failures")
ACTIONS = ("alert", "quarantine", "off")


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Per-agent thresholds (defaults chosen for docs/detection.md's reasons)."""

    denied_burst: int = 20            # denied attempts (suppressed ones count) ...
    denied_window: float = 10.0       # ... within this many seconds
    fan_out: int = 20                 # distinct (address, port) targets a minute
    egress_factor: float = 10.0       # bytes out a minute above this x the baseline's peak
    egress_floor: int = 64 << 20      # ... and above this many bytes a minute
    out_in_ratio: float = 100.0       # a flow sending this x what it receives ...
    ratio_min_bytes: int = 8 << 20    # ... and at least this many bytes
    dns_entropy: float = 4.0          # Shannon bits per character of a label ...
    dns_entropy_length: int = 20      # ... at least this long
    dns_subdomains: int = 50          # unique names under one parent domain a minute
    dns_failure_rate: float = 0.5     # REFUSED/NXDOMAIN share of answers a minute ...
    dns_failure_min: int = 20         # ... over at least this many answers


_INT_FIELDS = {"denied_burst", "fan_out", "egress_floor", "ratio_min_bytes",
               "dns_entropy_length", "dns_subdomains", "dns_failure_min"}
_SIZE_FIELDS = {"egress_floor", "ratio_min_bytes"}
_DURATION_FIELDS = {"denied_window"}
THRESHOLDS = tuple(Thresholds.__dataclass_fields__)
# (detector, action) pairs, in DETECTORS order: tuples keep a Policy hashable
Actions = tuple[tuple[str, str], ...]
DEFAULT_ACTIONS: Actions = tuple((name, "alert") for name in DETECTORS)


@dataclass(frozen=True, slots=True)
class AgentDetection:
    thresholds: Thresholds
    actions: Actions = DEFAULT_ACTIONS

    def action(self, detector: str) -> str:
        return dict(self.actions).get(detector, "alert")


@dataclass(frozen=True, slots=True)
class Detection:
    learning: float = 86400.0
    cooldown: float = 300.0
    max_auto_quarantines: int = 5
    thresholds: Thresholds = Thresholds()
    actions: Actions = DEFAULT_ACTIONS
    agents: tuple[tuple[str, AgentDetection], ...] = ()

    def for_agent(self, agent: str) -> AgentDetection:
        return dict(self.agents).get(agent) or AgentDetection(self.thresholds, self.actions)


DETECTION_KEYS = ("learning", "cooldown", "max_auto_quarantines", "actions", "agents",
                  *THRESHOLDS)
AGENT_DETECTION_KEYS = ("actions", *THRESHOLDS)

AddError = Callable[[str, str], None]


def parse_detection(raw: object, add: AddError) -> Detection:
    """The ``[detection]`` table (absent: the defaults); problems go to ``add(where, msg)``."""
    if raw is None:
        return Detection()
    if not isinstance(raw, dict):
        add("detection", "expected a table ([detection])")
        return Detection()
    _check_keys(raw, DETECTION_KEYS, "detection", add)
    learning = _duration(raw, "learning", "detection", add, 86400.0)
    cooldown = _duration(raw, "cooldown", "detection", add, 300.0)
    limit = raw.get("max_auto_quarantines", 5)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 10_000:
        add("detection.max_auto_quarantines", "expected a whole number from 0 to 10000")
        limit = 5
    thresholds = _thresholds(raw, Thresholds(), "detection", add)
    actions = _actions(raw.get("actions", {}), DEFAULT_ACTIONS, "detection.actions", add)
    agents: dict[str, AgentDetection] = {}
    table = raw.get("agents", {})
    if not isinstance(table, dict):
        add("detection.agents", "expected [detection.agents.NAME] tables")
        table = {}
    for name, body in table.items():
        where = f"detection.agents.{name}"
        if not AGENT_NAME_RE.match(name):
            add(where, f"{name!r} is not an agent name")
            continue
        if not isinstance(body, dict):
            add(where, "expected a table")
            continue
        _check_keys(body, AGENT_DETECTION_KEYS, where, add)
        agents[name] = AgentDetection(
            _thresholds(body, thresholds, where, add),
            _actions(body.get("actions", {}), actions, f"{where}.actions", add))
    return Detection(learning, cooldown, limit, thresholds, actions, tuple(sorted(agents.items())))


def _thresholds(raw: Mapping[str, Any], base: Thresholds, where: str,
                add: AddError) -> Thresholds:
    changes: dict[str, Any] = {}
    for name in THRESHOLDS:
        if name not in raw:
            continue
        value, path = raw[name], f"{where}.{name}"
        try:
            changes[name] = _threshold(name, value)
        except ValueError as exc:
            add(path, str(exc))
    return replace(base, **changes)


def _threshold(name: str, value: object) -> float | int:
    if name in _DURATION_FIELDS:
        if not isinstance(value, str):
            raise ValueError('expected a duration string like "10s"')
        return float(parse_duration(value))
    if name in _SIZE_FIELDS and isinstance(value, str):
        return parse_size(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number")
    if name in _INT_FIELDS and not isinstance(value, int):
        raise ValueError("expected a whole number")
    if not 0 < value < 2**53:
        raise ValueError("must be above 0")
    return value


def _actions(raw: object, base: Actions, where: str, add: AddError) -> Actions:
    if not isinstance(raw, dict):
        add(where, 'expected a table of detector = "alert" | "quarantine" | "off"')
        return base
    _check_keys(raw, DETECTORS, where, add)
    chosen = dict(base)
    for detector, action in raw.items():
        if detector not in DETECTORS:
            continue
        if action not in ACTIONS:
            add(f"{where}.{detector}", f"{action!r} is not one of {', '.join(ACTIONS)}")
        else:
            chosen[detector] = action
    return tuple((name, chosen[name]) for name in DETECTORS)


def _duration(raw: Mapping[str, Any], key: str, where: str, add: AddError,
              default: float) -> float:
    if key not in raw:
        return default
    value = raw[key]
    try:
        if not isinstance(value, str):
            raise ValueError('expected a duration string like "5m"')
        return float(parse_duration(value))
    except ValueError as exc:
        add(f"{where}.{key}", str(exc))
        return default


def _check_keys(table: Mapping[str, Any], allowed: tuple[str, ...], where: str,
                add: AddError) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            add(f"{where}.{key}", f"unknown key {key!r}{hint}")
