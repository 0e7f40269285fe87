"""The detectors: pure functions of one agent's recent observations on one host.

Each detector keeps what it needs in ``Window`` (sliding windows in the records' own
time, bounded) and returns a ``Finding`` when its threshold is crossed. Names and
defaults: ztnet.policy.detection (docs/detection.md explains each).

* denied-burst      refused attempts (suppressed ones included) within ``denied_window``
* fan-out           distinct (address, port) targets within a minute: scanning
* new-destination   an attempt outside a complete baseline
* egress-volume     bytes out a minute far above the baseline's peak; a flow sending far
                    more than it receives
* sensitive-destination  a refused attempt toward the metadata service, link-local or
                    loopback (granted ones are the operator's choice)
* dns-entropy, dns-subdomains, dns-failures  on DNS query records (event type dns)
"""

from __future__ import annotations

import ipaddress
import math
from collections import Counter, deque
from dataclasses import dataclass, field

from ztnet.controller.detect.baseline import Baseline
from ztnet.controller.detect.observation import Observation
from ztnet.policy.detection import Thresholds

MINUTE_NS = 60 * 1_000_000_000
MAX_EVIDENCE = 32
# Bounds on what a window holds, whatever a host sends.
MAX_WINDOW = 4096
SENSITIVE = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16", "127.0.0.0/8", "fe80::/10", "::1/128", "fd00:ec2::254/128"))
METADATA = frozenset({"169.254.169.254", "fd00:ec2::254"})
FAILED_RCODES = frozenset({"NXDOMAIN", "REFUSED"})


@dataclass(frozen=True, slots=True)
class Finding:
    detector: str
    agent: str
    host: str
    summary: str
    evidence: tuple[str, ...]
    first_evidence_ns: int


@dataclass(slots=True)
class Window:
    """One agent's recent behaviour on one host."""

    denied: deque[tuple[int, int, str]] = field(default_factory=deque)  # time, count, uuid
    denied_total: int = 0
    targets: dict[tuple[int, str, int], tuple[int, str]] = field(default_factory=dict)
    egress: deque[tuple[int, int, str]] = field(default_factory=deque)  # time, bytes, uuid
    egress_total: int = 0
    names: dict[str, dict[str, tuple[int, str]]] = field(default_factory=dict)  # parent->
    answers: deque[tuple[int, bool, str]] = field(default_factory=deque)  # time, failed
    newest_ns: int = 0

    def advance(self, time_ns: int) -> int:
        self.newest_ns = max(self.newest_ns, time_ns)
        return self.newest_ns


def _finding(name: str, obs: Observation, summary: str, evidence: list[tuple[int, str]],
             ) -> Finding:
    evidence = sorted(evidence)[-MAX_EVIDENCE:]
    first = min((t for t, _ in evidence), default=obs.time_ns)
    return Finding(name, obs.agent, obs.host, summary, tuple(u for _, u in evidence), first)


def denied_burst(w: Window, obs: Observation, t: Thresholds) -> Finding | None:
    if obs.allowed or not obs.is_attempt:
        return None
    now = w.advance(obs.time_ns)
    w.denied.append((obs.time_ns, obs.attempts, obs.uuid))
    w.denied_total += obs.attempts
    horizon = now - int(t.denied_window * 1e9)
    while w.denied and (w.denied[0][0] < horizon or len(w.denied) > MAX_WINDOW):
        w.denied_total -= w.denied.popleft()[1]
    if w.denied_total < t.denied_burst:
        return None
    evidence = [(time, uuid) for time, _, uuid in w.denied]
    summary = (f"{w.denied_total} refused attempts within {t.denied_window:g}s "
               f"(threshold {t.denied_burst})")
    w.denied.clear()
    w.denied_total = 0
    return _finding("denied-burst", obs, summary, evidence)


def fan_out(w: Window, obs: Observation, t: Thresholds) -> Finding | None:
    if not obs.is_attempt:
        return None
    now = w.advance(obs.time_ns)
    key = (obs.proto, obs.destination, obs.port)
    if key not in w.targets and len(w.targets) < MAX_WINDOW:
        w.targets[key] = (obs.time_ns, obs.uuid)
    if len(w.targets) < t.fan_out:
        return None
    for stale in [k for k, (time, _) in w.targets.items() if time < now - MINUTE_NS]:
        del w.targets[stale]
    if len(w.targets) < t.fan_out:
        return None
    addresses = len({address for _, address, _ in w.targets})
    summary = (f"{len(w.targets)} distinct targets ({addresses} addresses) within a minute "
               f"(threshold {t.fan_out})")
    evidence = list(w.targets.values())
    w.targets.clear()
    return _finding("fan-out", obs, summary, evidence)


def new_destination(baseline: Baseline | None, obs: Observation, now: float) -> Finding | None:
    if baseline is None or not obs.is_attempt or not baseline.complete(now):
        return None
    if baseline.covers(obs.proto, obs.destination, obs.port):
        return None
    verdict = "allowed" if obs.allowed else "refused"
    summary = (f"{verdict} attempt to {obs.destination} port {obs.port} (proto {obs.proto}), "
               f"outside the {baseline.source} baseline")
    return _finding("new-destination", obs, summary, [(obs.time_ns, obs.uuid)])


def egress_volume(w: Window, baseline: Baseline | None, obs: Observation,
                  t: Thresholds) -> Finding | None:
    if obs.kind != "flow_end" or not obs.bytes_out:
        return None
    if obs.bytes_out >= t.ratio_min_bytes and obs.bytes_out > t.out_in_ratio * max(1, obs.bytes_in):
        summary = (f"one flow to {obs.destination} port {obs.port} sent {obs.bytes_out} bytes "
                   f"and received {obs.bytes_in} (ratio above {t.out_in_ratio:g})")
        return _finding("egress-volume", obs, summary, [(obs.time_ns, obs.uuid)])
    now = w.advance(obs.time_ns)
    w.egress.append((obs.time_ns, obs.bytes_out, obs.uuid))
    w.egress_total += obs.bytes_out
    while w.egress and (w.egress[0][0] < now - MINUTE_NS or len(w.egress) > MAX_WINDOW):
        w.egress_total -= w.egress.popleft()[1]
    peak = baseline.peak_bytes_per_minute if baseline is not None else 0
    limit = max(t.egress_floor, t.egress_factor * peak)
    if w.egress_total <= limit:
        return None
    summary = (f"{w.egress_total} bytes out within a minute, above {int(limit)} "
               f"({t.egress_factor:g}x the baseline's peak of {peak}, at least "
               f"{t.egress_floor})")
    evidence = [(time, uuid) for time, _, uuid in w.egress]
    w.egress.clear()
    w.egress_total = 0
    return _finding("egress-volume", obs, summary, evidence)


def sensitive_destination(obs: Observation) -> Finding | None:
    if not obs.is_attempt or obs.allowed:
        return None
    try:
        address = ipaddress.ip_address(obs.destination)
    except ValueError:
        return None
    if not any(address in network for network in SENSITIVE if network.version == address.version):
        return None
    what = ("the cloud metadata service" if obs.destination in METADATA else
            "a loopback address" if address.is_loopback else "a link-local address")
    summary = f"refused attempt toward {what} ({obs.destination} port {obs.port})"
    return _finding("sensitive-destination", obs, summary, [(obs.time_ns, obs.uuid)])


def entropy(text: str) -> float:
    """Shannon entropy in bits per character."""
    if not text:
        return 0.0
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _parent(name: str) -> tuple[str, str]:
    labels = name.split(".")
    return ".".join(labels[-2:]), ".".join(labels[:-2])


def dns_entropy(obs: Observation, t: Thresholds) -> Finding | None:
    if not obs.dns_name:
        return None
    parent, sub = _parent(obs.dns_name)
    label = max(sub.split("."), key=len) if sub else ""
    if len(label) < t.dns_entropy_length or entropy(label) < t.dns_entropy:
        return None
    summary = (f"DNS name {obs.dns_name[:80]!r} under {parent}: a {len(label)}-character label "
               f"of {entropy(label):.1f} bits per character (threshold {t.dns_entropy:g})")
    return _finding("dns-entropy", obs, summary, [(obs.time_ns, obs.uuid)])


def dns_subdomains(w: Window, obs: Observation, t: Thresholds) -> Finding | None:
    if not obs.dns_name:
        return None
    now = w.advance(obs.time_ns)
    parent, _ = _parent(obs.dns_name)
    if parent not in w.names and len(w.names) >= MAX_WINDOW:
        return None
    names = w.names.setdefault(parent, {})
    if obs.dns_name not in names and len(names) < MAX_WINDOW:
        names[obs.dns_name] = (obs.time_ns, obs.uuid)
    if len(names) < t.dns_subdomains:
        return None
    for stale in [n for n, (time, _) in names.items() if time < now - MINUTE_NS]:
        del names[stale]
    if len(names) < t.dns_subdomains:
        return None
    summary = (f"{len(names)} unique names under {parent} within a minute "
               f"(threshold {t.dns_subdomains})")
    evidence = list(names.values())
    del w.names[parent]
    return _finding("dns-subdomains", obs, summary, evidence)


def dns_failures(w: Window, obs: Observation, t: Thresholds) -> Finding | None:
    if not obs.dns_rcode:
        return None
    now = w.advance(obs.time_ns)
    w.answers.append((obs.time_ns, obs.dns_rcode in FAILED_RCODES, obs.uuid))
    while w.answers and (w.answers[0][0] < now - MINUTE_NS or len(w.answers) > MAX_WINDOW):
        w.answers.popleft()
    failed = [(time, uuid) for time, bad, uuid in w.answers if bad]
    if len(w.answers) < t.dns_failure_min or len(failed) < t.dns_failure_rate * len(w.answers):
        return None
    summary = (f"{len(failed)} of {len(w.answers)} DNS answers within a minute were "
               f"NXDOMAIN or REFUSED (threshold {t.dns_failure_rate:.0%})")
    w.answers.clear()
    return _finding("dns-failures", obs, summary, failed)
