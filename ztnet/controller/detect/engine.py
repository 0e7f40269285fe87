"""The detection engine: runs every enabled detector over each observation as batches
arrive, keeps the per-(agent, host) windows and the per-agent baselines, and holds back
repeats (one alert per detector, agent and host per ``REALERT_SECONDS``; the rest are
counted). Pure: the caller passes the policy's settings and the time, and stores the
baselines it reports dirty (``take_dirty``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ztnet.controller.detect import detectors
from ztnet.controller.detect.baseline import Baseline, learning
from ztnet.controller.detect.detectors import MINUTE_NS, Finding, Window
from ztnet.controller.detect.observation import Observation
from ztnet.policy.detection import AgentDetection, Detection, Thresholds

REALERT_SECONDS = 60.0
# (agent, host) windows and baselines kept at most: what a hostile host sends cannot
# grow the controller's memory without bound (beyond it, new keys are not tracked).
MAX_KEYS = 65_536

BaselineLoader = Callable[[str], Baseline | None]


# A detector as the engine calls it: (window, baseline, observation, thresholds, now).
_Run = Callable[[Window, Baseline, Observation, Thresholds, float], Finding | None]
_DETECTORS: tuple[tuple[str, _Run], ...] = (
    ("denied-burst", lambda w, b, obs, t, now: detectors.denied_burst(w, obs, t)),
    ("fan-out", lambda w, b, obs, t, now: detectors.fan_out(w, obs, t)),
    ("new-destination", lambda w, b, obs, t, now: detectors.new_destination(b, obs, now)),
    ("egress-volume", lambda w, b, obs, t, now: detectors.egress_volume(w, b, obs, t)),
    ("sensitive-destination", lambda w, b, obs, t, now: detectors.sensitive_destination(obs)),
    ("dns-entropy", lambda w, b, obs, t, now: detectors.dns_entropy(obs, t)),
    ("dns-subdomains", lambda w, b, obs, t, now: detectors.dns_subdomains(w, obs, t)),
    ("dns-failures", lambda w, b, obs, t, now: detectors.dns_failures(w, obs, t)),
)
_Plan = tuple[Thresholds, tuple[_Run, ...]]


def _plan(settings: AgentDetection) -> _Plan:
    """An agent's thresholds and the detectors its actions leave on."""
    return settings.thresholds, tuple(run for name, run in _DETECTORS
                                      if settings.action(name) != "off")


@dataclass(slots=True)
class _Minute:
    index: int = -1
    bytes_out: int = 0


@dataclass(slots=True)
class Engine:
    load_baseline: BaselineLoader
    windows: dict[tuple[str, str], Window] = field(default_factory=dict)
    baselines: dict[str, Baseline] = field(default_factory=dict)
    quiet_until: dict[tuple[str, str, str], float] = field(default_factory=dict)
    held_back: int = 0
    untracked: int = 0
    _dirty: set[str] = field(default_factory=set)
    _minutes: dict[str, _Minute] = field(default_factory=dict)

    def observe(self, observations: Iterable[Observation], detection: Detection,
                now: float) -> list[Finding]:
        findings = []
        plans: dict[str, _Plan] = {}  # per agent, for this batch (the policy may change)
        for obs in observations:
            if not obs.agent:
                continue  # not an agent's socket: nothing to attribute
            window = self._window(obs)
            baseline = self._baseline(obs.agent, now, detection.learning)
            if window is None or baseline is None:
                self.untracked += 1
                continue
            plan = plans.get(obs.agent)
            if plan is None:
                plan = plans[obs.agent] = _plan(detection.for_agent(obs.agent))
            thresholds, runs = plan
            for run in runs:
                finding = run(window, baseline, obs, thresholds, now)
                if finding is None:
                    continue
                key = (finding.agent, finding.host, finding.detector)
                if now < self.quiet_until.get(key, 0.0):
                    self.held_back += 1
                    continue
                self.quiet_until[key] = now + REALERT_SECONDS
                findings.append(finding)
            self._learn(baseline, obs, now)
        return findings

    def _window(self, obs: Observation) -> Window | None:
        key = (obs.agent, obs.host)
        window = self.windows.get(key)
        if window is None and len(self.windows) < MAX_KEYS:
            window = self.windows[key] = Window()
        return window

    def _baseline(self, agent: str, now: float, window: float) -> Baseline | None:
        baseline = self.baselines.get(agent)
        if baseline is None:
            if len(self.baselines) >= MAX_KEYS:
                return None
            baseline = self.load_baseline(agent)
            if baseline is None:
                baseline = learning(agent, now, window)
                self._dirty.add(agent)
            self.baselines[agent] = baseline
        return baseline

    def _learn(self, baseline: Baseline, obs: Observation, now: float) -> None:
        if baseline.complete(now):
            return
        if obs.is_attempt and obs.allowed \
                and baseline.learn(obs.proto, obs.destination, obs.port):
            self._dirty.add(baseline.agent)
        if obs.kind == "flow_end" and obs.bytes_out:
            minute = self._minutes.setdefault(baseline.agent, _Minute())
            index = obs.time_ns // MINUTE_NS
            if index != minute.index:
                minute.index, minute.bytes_out = index, 0
            minute.bytes_out += obs.bytes_out
            if minute.bytes_out > baseline.peak_bytes_per_minute:
                baseline.peak_bytes_per_minute = minute.bytes_out
                self._dirty.add(baseline.agent)

    def take_dirty(self) -> list[Baseline]:
        """Baselines changed since the last call (to be stored)."""
        dirty = [self.baselines[agent] for agent in sorted(self._dirty)
                 if agent in self.baselines]
        self._dirty.clear()
        return dirty

    def set_baseline(self, baseline: Baseline | None, agent: str) -> None:
        """Replace (None: forget, learn again from the next flow) an agent's baseline."""
        self._minutes.pop(agent, None)
        if baseline is None:
            self.baselines.pop(agent, None)
        else:
            self.baselines[agent] = baseline

    def reset_agent(self, agent: str) -> None:
        """Forget the agent's windows and held-back alerts (after a release)."""
        for key in [k for k in self.windows if k[0] == agent]:
            del self.windows[key]
        for quiet in [k for k in self.quiet_until if k[0] == agent]:
            del self.quiet_until[quiet]
