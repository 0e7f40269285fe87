"""An agent's behavioural baseline: the destinations it uses and how much it sends.

Learned over a window from the agent's first flow (``learning`` in the policy's
``[detection]``): every *allowed* attempt adds its (protocol, address, port); every minute's
bytes out raise the peak. After the window the baseline is complete and the detectors
judge against it. Learning from a compromised agent learns the compromise, so a baseline
can instead be seeded from the reviewed policy (``ztnet baseline reset --from-policy``):
its rules are the destinations, and it is complete at once.

Stored as JSON in the controller's database (``to_json``/``from_json``); bounded
(``MAX_TARGETS``: beyond it learning stops adding, and says so).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from ztnet.policy.document import AgentPolicy

MAX_TARGETS = 10_000

Target = tuple[int, str, int]  # (IP protocol, address, port)


@dataclass(frozen=True, slots=True)
class Range:
    """A destination from a policy rule: protocol (0: any), network, ports [low, high]."""

    proto: int
    network: str
    low: int
    high: int

    def covers(self, proto: int, address: str, port: int) -> bool:
        if self.proto and self.proto != proto and not (self.proto == 1 and proto == 58):
            return False
        if not self.low <= port <= self.high:
            return False
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(self.network)
        except (ValueError, TypeError):
            return False


@dataclass(slots=True)
class Baseline:
    agent: str
    source: str  # "learned" or "policy"
    started: float
    learn_until: float
    targets: set[Target] = field(default_factory=set)
    ranges: list[Range] = field(default_factory=list)
    peak_bytes_per_minute: int = 0
    full: bool = False  # MAX_TARGETS reached: learning stopped adding targets

    def complete(self, now: float) -> bool:
        return self.source == "policy" or now >= self.learn_until

    def covers(self, proto: int, address: str, port: int) -> bool:
        if (proto, address, port) in self.targets:
            return True
        return any(r.covers(proto, address, port) for r in self.ranges)

    def learn(self, proto: int, address: str, port: int) -> bool:
        """Add a target while learning; True if it was new."""
        target = (proto, address, port)
        if target in self.targets:
            return False
        if len(self.targets) >= MAX_TARGETS:
            self.full = True
            return False
        self.targets.add(target)
        return True

    def to_json(self) -> dict[str, object]:
        return {"agent": self.agent, "source": self.source, "started": self.started,
                "learn_until": self.learn_until, "full": self.full,
                "peak_bytes_per_minute": self.peak_bytes_per_minute,
                "targets": [list(t) for t in sorted(self.targets)],
                "ranges": [[r.proto, r.network, r.low, r.high] for r in self.ranges]}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Baseline:
        """The stored form (written by to_json); ValueError if it is not one."""
        try:
            return cls(str(body["agent"]), str(body["source"]), float(body["started"]),
                       float(body["learn_until"]),
                       {(int(p), str(a), int(port)) for p, a, port in body["targets"]},
                       [Range(int(p), str(n), int(lo), int(hi)) for p, n, lo, hi in
                        body["ranges"]], int(body["peak_bytes_per_minute"]),
                       bool(body.get("full", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"baseline: not a stored baseline ({exc})") from None


def learning(agent: str, now: float, window: float) -> Baseline:
    return Baseline(agent, "learned", now, now + window)


def from_policy(agent: AgentPolicy, now: float) -> Baseline:
    """A complete baseline whose destinations are the agent's allow rules."""
    ranges = []
    for rule in agent.allow:
        low, high = (0, 65535) if rule.ports is None else (rule.ports.first, rule.ports.last)
        ranges.append(Range(int(rule.proto), str(rule.to), low, high))
    return Baseline(agent.name, "policy", now, now, ranges=ranges)
