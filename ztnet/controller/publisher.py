"""From changes to pushes: every policy apply, revocation and renewal becomes
a new epoch (a new version from the store's counter) and is offered to every
connected host at once.

Epochs are created under one lock, so versions go out in the order they were
allocated. Renewal: while any host is connected, a new epoch starts at the
current one's ``renew_at`` (half its lifetime); with nobody connected no
versions are spent, and the next host to subscribe triggers the renewal
itself if the current epoch is past due.

Only the operator and the clock start epochs: what a host says (its
``version_held``) never does. A host claiming a version above the counter is
refused with FAILED_PRECONDITION (docs/threat-model.md, "A host's claim never
moves the fleet's version").

Replicas (``shared``: other controllers use the same database): a change made
elsewhere moves the store's counter; ``follow()`` (woken by
ztnet.controller.replicas) builds the epoch at that version from the store's
snapshot and pushes it to this replica's hosts. A renewal is skipped when the
counter has moved since the epoch began (another replica renewed or changed
something first): the replica follows instead, so replicas do not each spend a
version on the same renewal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from ztnet import logs
from ztnet.controller import status
from ztnet.controller.detectstore import QuarantineRecord
from ztnet.controller.epochs import Epoch, Issuer
from ztnet.controller.hub import Answer, Hub, Session, new_push
from ztnet.controller.jitstore import JitGrant
from ztnet.controller.store import Revocation, Store
from ztnet.errors import PolicyError
from ztnet.policy.document import Policy, parse_policy


@dataclass(frozen=True, slots=True)
class Publication:
    epoch: Epoch
    answers: dict[str, asyncio.Future[Answer | None]]


class Publisher:
    def __init__(self, store: Store, issuer: Issuer, hub: Hub,
                 clock: Callable[[], float], *, shared: bool = False) -> None:
        self.store = store
        self.shared = shared
        self.issuer = issuer
        self.hub = hub
        self.clock = clock
        self.trust_domain = store.trust_domain()
        self.current: Epoch | None = None
        self.policy: Policy | None = None
        self.policy_version = 0
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        record = store.current_policy()
        if record is not None:
            self.policy = parse_policy(record.text, f"<policy version {record.version}>")
            self.policy_version = record.version

    def validate(self, text: str, source: str) -> Policy:
        """The policy in ``text``, or PolicyError: everything that could make
        it fail later is checked now, so nothing is stored on error."""
        policy = parse_policy(text, source)
        if policy.trust_domain != self.trust_domain:
            raise PolicyError(f"policy: {source}: trust_domain is {policy.trust_domain!r}, but "
                              f"this controller's trust domain is {self.trust_domain!r}")
        self.issuer.check(policy, self.clock())
        return policy

    async def start(self) -> None:
        if self.policy is not None and self.current is None:
            async with self._lock:
                self._publish(self.store.next_version(), "start", wait=False)
        self._task = asyncio.create_task(self._renewals(), name="ztnet-renewals")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def apply(self, text: str, policy: Policy) -> Publication:
        async with self._lock:
            record = self.store.add_policy(text, self.clock())
            self.policy, self.policy_version = policy, record.version
            return self._publish(record.version, "policy", wait=True)

    async def revoke(self, agent: str, grant_id: int | None, *, restore: bool) -> Publication:
        async with self._lock:
            version, _ = self.store.set_revocation(agent, grant_id, self.clock(),
                                                   revoked=not restore)
            return self._publish(version, "restore" if restore else "revoke", wait=True)

    async def relabel(self, host: str, labels: dict[str, str]) -> Publication | None:
        """Replace ``host``'s labels and start an epoch for them (None: no policy yet,
        nothing to push). The caller checked the host exists and the labels."""
        async with self._lock:
            self.store.set_host_labels(host, labels)
            if self.policy is None:
                return None
            return self._publish(self.store.next_version(), "labels", wait=True)

    async def issue_jit(self, grant: JitGrant, *, approve: str = "",
                        decided_by: str = "") -> Publication | None:
        """Store a just-in-time grant (approving the pending request ``approve`` with it,
        if given) and push it at once. None: that request is no longer pending."""
        async with self._lock:
            if self.policy is None:
                raise status.precondition("no policy has been applied yet")
            version = self.store.add_jit_grant(grant, approve=approve, decided_by=decided_by)
            if version is None:
                return None
            return self._publish(version, "jit grant", wait=True)

    async def host_enrolled(self, host: str) -> None:
        """A host enrolled with its token's labels. Known to the current epoch with other
        labels (re-enrolled): a new epoch, so that no (version, host) pair ever selects two
        different sets of agents. New to it: it learns them when the host subscribes."""
        async with self._lock:
            epoch = self.current
            if epoch is not None and host in epoch.labels and \
                    dict(epoch.labels[host]) != self.store.host_labels().get(host, {}):
                self._publish(self.store.next_version(), "enrollment", wait=False)

    def _know(self, host: str) -> Epoch | None:
        """The current epoch, knowing ``host``'s labels: a host enrolled since it began
        (here or through another replica) cannot have been sent this version yet, so the
        epoch takes the labels it has now."""
        epoch = self.current
        if epoch is not None and host not in epoch.labels:
            labels = {**epoch.labels, host: self.store.host_labels().get(host, {})}
            epoch = self.current = replace(epoch, labels=labels)
        return epoch

    async def quarantine(self, record: QuarantineRecord) -> Publication:
        """Store a quarantine and push it (deny-all, no grants) to every host it names."""
        async with self._lock:
            version = self.store.set_quarantine(record)
            return self._publish(version, "quarantine", wait=True)

    async def release(self, agent: str) -> tuple[Publication | None,
                                                 tuple[QuarantineRecord, ...]]:
        """Lift the agent's quarantines; its grants come back in the new epoch with
        windows that start now. Nothing to lift: (None, ())."""
        async with self._lock:
            version, lifted = self.store.release(agent)
            if not lifted:
                return None, ()
            return self._publish(version, "release", wait=True), lifted

    async def subscribe(self, session: Session, version_held: int) -> None:
        """A host (already attached to the hub) subscribed holding ``version_held``:
        send the current bundle unless it holds exactly that and it is fresh."""
        async with self._lock:
            if self.shared and self.current is not None and \
                    version_held > self.current.version:
                self._follow()  # the host was served by a replica that is ahead of us
            host, now, epoch = session.host, self.clock(), self._know(session.host)
            self._changed.set()  # the renewal loop now has someone to renew for
            if epoch is None:
                self.store.record_seen(host, now)
            elif version_held > self.store.current_version():
                # A host's word never moves shared state: starting a version
                # above its claim would push to every host (and a claim near
                # the top of the range would end all issuing). A host really
                # ahead (the database was restored from a backup) waits for
                # the operator to raise the counter.
                self.store.record_seen(host, now)
                logs.event("host claims a version ahead of the controller", logging.WARNING,
                           host=host, version_held=version_held, version=epoch.version)
                raise status.precondition(
                    f"subscribe.version_held: host {host} says it holds version "
                    f"{version_held}, but this controller's newest is {epoch.version}; if "
                    "the controller's database was restored from a backup, the operator "
                    f"runs `ztnet controller raise-version --above {version_held}`, else "
                    "the host's state is not this controller's")
            elif version_held > epoch.version:
                # ahead of the epoch but not of the counter: the operator raised
                # it (`controller raise-version`) since the epoch began. A new
                # epoch from the counter passes every claim up to the raise, so
                # this happens once per raise, whatever hosts say.
                self.store.record_seen(host, now)
                self._publish(self.store.next_version(), "raised version", wait=False)
            elif now >= epoch.renew_at:
                self.store.record_seen(host, now)
                self._publish(self.store.next_version(), "renewal", wait=False)
            elif version_held == epoch.version and epoch.fresh(now):
                self.store.record_seen(host, now, applied_version=version_held)
            else:
                self.store.record_seen(host, now)
                session.offer(new_push(epoch.version, self.issuer.envelope(epoch, host)))

    async def follow(self) -> bool:
        """Catch up with a change made through another replica (or an admin command on
        the database); True if a new epoch started."""
        async with self._lock:
            return self._follow()

    def _follow(self) -> bool:
        state = self.store.fleet_state()
        if state.policy is None or (self.current is not None and
                                    state.version <= self.current.version):
            return False
        if state.policy.version != self.policy_version:
            self.policy = parse_policy(state.policy.text,
                                       f"<policy version {state.policy.version}>")
            self.policy_version = state.policy.version
        self._publish(state.version, "followed", wait=False, revocations=state.revocations)
        return True

    def _publish(self, version: int, reason: str, *, wait: bool,
                 revocations: tuple[Revocation, ...] | None = None) -> Publication:
        """Start epoch ``version`` and offer it to every connected host. Only
        with the lock held, and only after the change is stored."""
        if self.policy is None:
            raise status.precondition("no policy has been applied yet")
        now = self.clock()
        if revocations is None:
            revocations = self.store.revocations()
        epoch = self.issuer.new_epoch(self.policy, policy_version=self.policy_version,
                                      revocations=revocations, version=version,
                                      now=now, reason=reason, labels=self.store.host_labels(),
                                      jit=self.store.jit_grants(now),
                                      quarantines=self.store.quarantines())
        self.current = epoch
        sessions = self.hub.sessions()
        for session in sessions:
            session.offer(new_push(version, self.issuer.envelope(epoch, session.host)))
        answers = self.hub.expect([s.host for s in sessions], version) if wait else {}
        self._changed.set()
        logs.event("epoch", version=version, reason=reason, policy_version=self.policy_version,
                   hosts=len(sessions), expires_in_s=round(epoch.expires - now, 1))
        return Publication(epoch, answers)

    async def _renewals(self) -> None:
        while True:
            try:
                await self._renew_when_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a renewal bug must not end renewals
                logs.event("renewal failed", logging.ERROR, error=repr(exc))
                await asyncio.sleep(1.0)

    async def _renew_when_due(self) -> None:
        self._changed.clear()
        epoch = self.current
        if epoch is None or not self.hub.sessions():
            await self._changed.wait()
            return
        delay = epoch.renew_at - self.clock()
        if delay > 0:
            try:
                await asyncio.wait_for(self._changed.wait(), delay)
                return  # something changed: look again
            except TimeoutError:
                pass
        async with self._lock:
            if self.current is not epoch or not self.hub.sessions():
                return
            if self.shared and self._follow():
                return  # another replica moved the counter since: its epoch is newer
            self._publish(self.store.next_version(), "renewal", wait=False)
