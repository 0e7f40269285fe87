"""From findings to alerts and actions (the controller's event loop).

Every finding becomes a stored alert, a line in the controller's audit trail, a metric,
and a message to every ``ztnet alerts --follow``. If the policy binds its detector to
``quarantine``, the agent is quarantined **on the host that reported the evidence**
(a host's records never quarantine an agent elsewhere: one host's claim never changes
shared state), unless one of the brakes holds:

* the agent is already quarantined there;
* the agent's cool-down (``[detection] cooldown``, from its last automatic action or
  its release) has not passed;
* the fleet's rate limit (``max_auto_quarantines`` in the last hour) is reached.

The alert's ``action`` says which happened. Operators quarantine and release through
``quarantine``/``release`` here too, so every change is audited in one place.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace

from ztnet import logs
from ztnet.controller.detect.baseline import Baseline, from_policy
from ztnet.controller.detect.detectors import Finding
from ztnet.controller.detect.engine import Engine
from ztnet.controller.detect.observation import Observation
from ztnet.controller.detectstore import AlertRecord, QuarantineRecord
from ztnet.controller.metrics import ControllerMetrics
from ztnet.controller.publisher import Publication, Publisher
from ztnet.controller.store import Store
from ztnet.observe.audit import AuditLog
from ztnet.policy.detection import Detection

HOUR = 3600.0
MAX_FOLLOWER_QUEUE = 1024


class Responder:
    def __init__(self, store: Store, publisher: Publisher, clock: Callable[[], float],
                 metrics: ControllerMetrics, audit: AuditLog | None = None) -> None:
        self.store = store
        self.publisher = publisher
        self.clock = clock
        self.metrics = metrics
        self.audit = audit
        self.engine = Engine(self._load_baseline)
        self.cooldown_until: dict[str, float] = {}
        self.auto_quarantines: deque[float] = deque()
        self.followers: set[asyncio.Queue[AlertRecord]] = set()
        self._recall_brakes()

    def _recall_brakes(self) -> None:
        """The brakes survive a restart: the last hour's automatic quarantines (stored as
        alerts whose action is "quarantine") count against the hourly limit, and each
        agent's cool-down runs from its latest one."""
        now, cooldown = self.clock(), self.detection().cooldown
        for alert in self.store.alerts(limit=10_000):
            if alert.action == "quarantine" and alert.time > now - HOUR:
                self.auto_quarantines.append(alert.time)
                self.cooldown_until[alert.agent] = max(
                    self.cooldown_until.get(alert.agent, 0.0), alert.time + cooldown)

    def detection(self) -> Detection:
        policy = self.publisher.policy
        return policy.detection if policy is not None else Detection()

    # --- ingest ----------------------------------------------------------------------

    async def on_batch(self, observations: Sequence[Observation]) -> list[AlertRecord]:
        now = self.clock()
        detection = self.detection()
        findings = self.engine.observe(observations, detection, now)
        alerts = [await self._alert(finding, detection, now) for finding in findings]
        self._save_baselines(now)
        return alerts

    async def _alert(self, finding: Finding, detection: Detection, now: float) -> AlertRecord:
        wanted = detection.for_agent(finding.agent).action(finding.detector)
        action = "alert"
        if wanted == "quarantine":
            action = self._brake(finding, detection, now) or "quarantine"
        alert = AlertRecord(0, now, finding.agent, finding.host, finding.detector,
                            finding.summary, finding.evidence, action,
                            finding.first_evidence_ns)
        alert_id = self.store.add_alert(alert)
        alert = replace(alert, id=alert_id)
        self.metrics.alerts.labels(finding.detector, action.split(" ")[0]).inc()
        self.metrics.detection_seconds.observe(max(0.0, now - finding.first_evidence_ns / 1e9))
        self._audit("alert", alert.as_json())
        logs.event("alert", logging.WARNING, alert=alert_id, agent=finding.agent,
                   host=finding.host, detector=finding.detector, action=action,
                   summary=finding.summary)
        if action == "quarantine":
            self.cooldown_until[finding.agent] = now + detection.cooldown
            self.auto_quarantines.append(now)
            record = QuarantineRecord(finding.agent, finding.host,
                                      f"{finding.detector}: {finding.summary}", False, "auto",
                                      alert_id, 0, now)
            await self.publisher.quarantine(record)
            self._audit("quarantine", {"agent": record.agent, "host": record.host,
                                       "actor": "auto", "alert": alert_id,
                                       "reason": record.reason,
                                       "evidence": list(finding.evidence)})
        for queue in list(self.followers):
            if queue.qsize() < MAX_FOLLOWER_QUEUE:
                queue.put_nowait(alert)
        return alert

    def _brake(self, finding: Finding, detection: Detection, now: float) -> str | None:
        """Why an automatic quarantine is not done now (None: do it)."""
        if any(q.agent == finding.agent and q.applies_to(finding.host)
               for q in self.store.quarantines()):
            return "alert (already quarantined)"
        until = self.cooldown_until.get(finding.agent, 0.0)
        if now < until:
            return f"alert (quarantine skipped: cool-down for {until - now:.0f}s more)"
        while self.auto_quarantines and self.auto_quarantines[0] < now - HOUR:
            self.auto_quarantines.popleft()
        if len(self.auto_quarantines) >= detection.max_auto_quarantines:
            self.metrics.auto_refused.inc()
            return (f"alert (quarantine skipped: rate limit of "
                    f"{detection.max_auto_quarantines} automatic quarantines an hour)")
        return None

    # --- operator actions -----------------------------------------------------------

    async def quarantine(self, record: QuarantineRecord) -> Publication:
        publication = await self.publisher.quarantine(record)
        self._audit("quarantine", {"agent": record.agent, "host": record.host,
                                   "actor": record.actor, "reason": record.reason,
                                   "freeze": record.freeze,
                                   "version": publication.epoch.version})
        return publication

    async def release(self, agent: str, actor: str, reason: str,
                      ) -> tuple[Publication | None, tuple[QuarantineRecord, ...]]:
        publication, lifted = await self.publisher.release(agent)
        if publication is None:
            return None, ()
        now = self.clock()
        # lingering evidence from before the release must not re-quarantine at once
        self.cooldown_until[agent] = now + self.detection().cooldown
        self.engine.reset_agent(agent)
        self._audit("release", {"agent": agent, "actor": actor, "reason": reason,
                                "version": publication.epoch.version,
                                "lifted": [{"host": q.host, "actor": q.actor,
                                            "reason": q.reason} for q in lifted]})
        return publication, lifted

    # --- baselines ------------------------------------------------------------------

    def _load_baseline(self, agent: str) -> Baseline | None:
        body = self.store.baseline(agent)
        if body is None:
            return None
        try:
            return Baseline.from_json(body)
        except ValueError as exc:
            logs.event("baseline unreadable; learning again", logging.WARNING, agent=agent,
                       reason=str(exc))
            return None

    def _save_baselines(self, now: float) -> None:
        for baseline in self.engine.take_dirty():
            self.store.save_baseline(baseline.agent, baseline.to_json(), now)

    def baseline(self, agent: str) -> Baseline | None:
        return self.engine.baselines.get(agent) or self._load_baseline(agent)

    def reset_baseline(self, agent: str, actor: str, *, seed: bool) -> Baseline | None:
        """Start the agent's baseline over: learning again from its next flow, or (``seed``)
        complete at once from its rules in the current policy."""
        now = self.clock()
        policy = self.publisher.policy
        rules = policy.agent(agent) if policy is not None else None
        baseline = from_policy(rules, now) if seed and rules is not None else None
        if baseline is None:
            self.store.reset_baseline(agent)
        else:
            self.store.save_baseline(agent, baseline.to_json(), now)
        self.engine.set_baseline(baseline, agent)
        self._audit("baseline.reset", {"agent": agent, "actor": actor,
                                       "source": "policy" if baseline else "learning"})
        return baseline

    # --- following --------------------------------------------------------------------

    async def follow(self, agent: str, after_id: int) -> AsyncIterator[AlertRecord]:
        queue: asyncio.Queue[AlertRecord] = asyncio.Queue()
        self.followers.add(queue)  # before reading the stored ones: nothing falls between
        try:
            last = after_id
            for alert in self.store.alerts(agent=agent, after_id=after_id, limit=10_000):
                last = alert.id
                yield alert
            while True:
                alert = await queue.get()
                if alert.id > last and (not agent or alert.agent == agent):
                    last = alert.id
                    yield alert
        finally:
            self.followers.discard(queue)

    def _audit(self, kind: str, fields: dict[str, object]) -> None:
        if self.audit is not None:
            self.audit.append(kind, fields)
