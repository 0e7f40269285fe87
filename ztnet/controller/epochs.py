"""Epochs: what every host is sent for one version, and when to renew it.

An epoch is one version of the grants: the current policy minus the
revocations, issued at one instant, for the hosts' labels at that instant
(each host gets only the agents whose host selector matches it). Every
host's bundle for that version is compiled with the epoch's ``issued_at``,
so the same (version, host) always yields the same bytes (Ed25519
signatures are deterministic): a host that reconnects mid-epoch is sent
exactly what it may already hold, never an equal version with other content
(which a daemon refuses).

A bundle is fresh until its first grant expires (``issue_bundle``'s
default), at most the grant ttl. The controller starts a new epoch, with a
new version, at ``RENEW_FRACTION`` of that lifetime, so hosts hold grants
that are renewed long before they lapse, and lapse on time if the
controller goes away.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ztnet.controller.detectstore import QuarantineRecord
from ztnet.controller.jit import MIN_REMAINING, RENEW_BEFORE
from ztnet.controller.jitstore import JitGrant
from ztnet.controller.store import Revocation
from ztnet.grants.bundle import sign_bundle
from ztnet.grants.model import AgentMode, Grant
from ztnet.grants.payload import Quarantine
from ztnet.policy.compile import grant_id_for
from ztnet.policy.document import Policy
from ztnet.policy.issue import issue_bundle

ISSUER = "ztnet-controller"
RENEW_FRACTION = 0.5
# Renewing more often than this buys nothing and would spin on 1 s ttls.
MIN_RENEW_INTERVAL = 0.5
# A stand-in audience for bundles issued only to learn whether issuing works and when the
# epoch's bundles expire (nothing issued for it is signed or sent).
_PLACEHOLDER_HOST = "localhost"


@dataclass(frozen=True, slots=True)
class Epoch:
    version: int
    policy_version: int
    policy: Policy  # the effective policy: revoked grants already removed
    issued_at: float
    expires: float
    reason: str
    # every enrolled host's labels when the epoch began: a (version, host) pair always
    # selects the same agents (host selectors, ztnet.policy.selectors)
    labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # live just-in-time grants (ztnet.controller.jit), each for the hosts it names
    jit: tuple[JitGrant, ...] = ()
    # Quarantined agents (each for one host or every host): their hosts' bundles carry
    # the quarantine flag and none of their grants.
    quarantines: tuple[QuarantineRecord, ...] = ()

    def quarantine_for(self, host: str) -> tuple[Quarantine, ...]:
        """What ``host``'s bundle says is quarantined there (freeze if any record says so)."""
        freeze: dict[str, bool] = {}
        for record in self.quarantines:
            if record.applies_to(host):
                freeze[record.agent] = freeze.get(record.agent, False) or record.freeze
        return tuple(Quarantine(agent, frozen) for agent, frozen in sorted(freeze.items()))

    @property
    def renew_at(self) -> float:
        lifetime = self.expires - self.issued_at
        renew = self.issued_at + max(MIN_RENEW_INTERVAL, lifetime * RENEW_FRACTION)
        # the next epoch leaves out a JIT grant just before it ends (a bundle holding an
        # expired grant is refused whole); hosts' bundles expire with their first grant
        return min([renew, *(grant.not_after - RENEW_BEFORE for grant in self.jit)])

    def jit_for(self, host: str) -> list[Grant]:
        """The JIT grants ``host``'s bundle carries: named for it, or (naming no host) for
        an agent whose host selector matches it."""
        labels = self.labels.get(host, {})
        chosen = []
        for grant in self.jit:
            agent = self.policy.agent(grant.agent)
            if agent is None or (grant.hosts and host not in grant.hosts):
                continue
            if not grant.hosts and agent.hosts is not None and \
                    not agent.hosts.matches(host, labels):
                continue
            chosen.append(grant.grant())
        return chosen

    def fresh(self, now: float) -> bool:
        return now < self.expires


def effective_jit(policy: Policy, revocations: tuple[Revocation, ...],
                  grants: tuple[JitGrant, ...], now: float) -> tuple[JitGrant, ...]:
    """The JIT grants an epoch starting at ``now`` carries: not revoked (the grant, or its
    whole agent), for an agent of the policy, with more than MIN_REMAINING left."""
    whole = {r.agent for r in revocations if r.grant_id is None}
    single = {r.grant_id for r in revocations if r.grant_id is not None}
    return tuple(g for g in grants if g.agent not in whole and g.grant_id not in single
                 and policy.agent(g.agent) is not None and g.not_after - now > MIN_REMAINING
                 and g.not_before <= now)


def effective_policy(policy: Policy, revocations: tuple[Revocation, ...]) -> Policy:
    """``policy`` without the revoked grants. A revoked agent keeps its name
    but loses every rule and is enforced even if the policy audits it: it
    stays known, and may reach nothing."""
    whole = {r.agent for r in revocations if r.grant_id is None}
    single = {(r.agent, r.grant_id) for r in revocations if r.grant_id is not None}
    agents = tuple(
        replace(agent, allow=tuple(
            rule for rule in agent.allow
            if agent.name not in whole
            and (agent.name, grant_id_for(policy.trust_domain, agent.name, rule)) not in single),
            mode=AgentMode.ENFORCE if agent.name in whole else agent.mode)
        for agent in policy.agents)
    return replace(policy, agents=agents)


class Issuer:
    """Signs bundles; keeps the current epoch's envelopes, one per host."""

    def __init__(self, signing_key: Ed25519PrivateKey, *, grant_ttl: float) -> None:
        self.signing_key = signing_key
        self.grant_ttl = grant_ttl
        self._cached_version = 0
        self._cache: dict[str, bytes] = {}

    def check(self, policy: Policy, now: float) -> None:
        """Raise the ConfigError issuing would raise (too many grants, …)."""
        issue_bundle(policy, host=_PLACEHOLDER_HOST, version=1, now=now, issuer=ISSUER,
                     default_ttl=self.grant_ttl)

    def new_epoch(self, policy: Policy, *, policy_version: int,
                  revocations: tuple[Revocation, ...], version: int, now: float,
                  reason: str, labels: Mapping[str, Mapping[str, str]] | None = None,
                  jit: tuple[JitGrant, ...] = (),
                  quarantines: tuple[QuarantineRecord, ...] = ()) -> Epoch:
        effective = effective_policy(policy, revocations)
        # every agent (labels None): the epoch renews before any host's first grant lapses
        sample = issue_bundle(effective, host=_PLACEHOLDER_HOST, version=version, now=now,
                              issuer=ISSUER, default_ttl=self.grant_ttl)
        return Epoch(version, policy_version, effective, sample.issued_at, sample.expires,
                     reason, dict(labels or {}),
                     effective_jit(policy, revocations, jit, sample.issued_at), quarantines)

    def envelope(self, epoch: Epoch, host: str) -> bytes:
        if epoch.version != self._cached_version:
            self._cached_version, self._cache = epoch.version, {}
        cached = self._cache.get(host)
        if cached is None:
            bundle = issue_bundle(epoch.policy, host=host, version=epoch.version,
                                  now=epoch.issued_at, issuer=ISSUER, default_ttl=self.grant_ttl,
                                  labels=epoch.labels.get(host, {}),
                                  extra=epoch.jit_for(host),
                                  quarantine=epoch.quarantine_for(host))
            cached = self._cache[host] = sign_bundle(bundle, self.signing_key)
        return cached
