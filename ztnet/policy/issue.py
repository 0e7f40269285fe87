"""Policy → an unsigned grant bundle for one host (the issuing half of
``policy ──issue_bundle──▶ Bundle ──sign_bundle──▶ envelope``).

Issuing needs the policy compiler, so it lives in the policy layer; signing
and verifying the result are ``ztnet.grants.bundle``'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from ztnet.errors import ConfigError
from ztnet.grants.limits import MAX_BUNDLE_GRANTS, MAX_BUNDLE_NAMES
from ztnet.grants.model import AgentMode, Grant
from ztnet.grants.payload import (
    MAX_INT64,
    Bundle,
    GrantRecord,
    NameRecord,
    Quarantine,
    floor_ms,
    normalize_host,
)
from ztnet.policy.compile import compile_all
from ztnet.policy.document import MAX_TTL, Policy
from ztnet.policy.selectors import for_host

# Serial of a bundle's i-th grant: version * SERIALS_PER_VERSION + i. Serials
# are thus unique across versions as long as versions only grow, and a serial
# says which policy version issued it.
SERIALS_PER_VERSION = 1_000_000  # > MAX_BUNDLE_GRANTS + MAX_BUNDLE_NAMES: no collisions
MAX_ISSUE_VERSION = (MAX_INT64 - SERIALS_PER_VERSION) // SERIALS_PER_VERSION


def issue_bundle(
    policy: Policy,
    *,
    host: str,
    version: int,
    now: float,
    issuer: str,
    default_ttl: float = 300.0,
    bundle_ttl: float | None = None,
    labels: Mapping[str, str] | None = None,
    extra: Sequence[Grant] = (),
    quarantine: tuple[Quarantine, ...] = (),
) -> Bundle:
    """Compile ``policy`` for ``host`` as policy version ``version``. Times are
    rounded down to whole milliseconds (the payload's unit). The bundle expires
    ``bundle_ttl`` seconds after ``now``; None means when its first grant
    expires (at most ``default_ttl``), so a fresh bundle never holds an
    expired grant. Grant serials are ``version * SERIALS_PER_VERSION + i``.
    With ``labels`` (the host's labels, possibly empty) only agents whose
    ``hosts`` selector matches the host are issued; None issues every agent
    (to size an epoch, or where no host selection applies). ``extra`` grants
    (just-in-time grants, with windows of their own) follow the policy's.
    ``quarantine``: agents this host must deny everything; their grants (policy and
    just-in-time) are left out too, so a released agent gets fresh windows later."""
    try:
        audience = normalize_host(host)
    except ValueError as exc:
        raise ConfigError(f"bundle: bad host: {exc}") from None
    if not 1 <= version <= MAX_ISSUE_VERSION:
        raise ConfigError(f"bundle: version must be between 1 and {MAX_ISSUE_VERSION}")
    if bundle_ttl is not None and not 0 < bundle_ttl <= MAX_TTL:
        raise ConfigError(f"bundle: bundle ttl must be between 1ms and 365d, got {bundle_ttl}s")
    if labels is not None:
        policy = for_host(policy, audience, labels)
    start = floor_ms(now)
    grants, names = compile_all(policy, now=start, default_ttl=default_ttl)
    grants = grants + list(extra)
    quarantined = {entry.agent for entry in quarantine}
    grants = [grant for grant in grants if grant.agent not in quarantined]
    names = [name for name in names if name.agent not in quarantined]
    lifetime = bundle_ttl
    if lifetime is None:
        lifetime = min([default_ttl, *(grant.not_after - start for grant in grants),
                        *(name.not_after - start for name in names)])
    # quarantine overrides audit mode: a quarantined agent is enforced (and has no grants)
    audit_agents = tuple(sorted(agent.name for agent in policy.agents
                                if agent.mode is AgentMode.AUDIT and agent.name not in quarantined))
    if len(grants) + len(audit_agents) > MAX_BUNDLE_GRANTS:
        audited = f" and {len(audit_agents)} audited agents" if audit_agents else ""
        raise ConfigError(f"bundle: {len(grants)} grants{audited} for host {audience}, more "
                          f"than the {MAX_BUNDLE_GRANTS} one bundle can carry")
    if len(names) > MAX_BUNDLE_NAMES:
        raise ConfigError(f"bundle: {len(names)} hostname grants for host {audience}, more "
                          f"than the {MAX_BUNDLE_NAMES} one bundle can carry")
    records = tuple(
        GrantRecord(
            # start + ttl is a float sum; snap it back to the millisecond grid.
            replace(grant, not_after=round(grant.not_after * 1000) / 1000),
            serial=version * SERIALS_PER_VERSION + index,
        )
        for index, grant in enumerate(grants)
    )
    # hostname grants' serials follow the address grants' (unique within the version)
    name_records = tuple(
        NameRecord(replace(name, not_after=round(name.not_after * 1000) / 1000),
                   serial=version * SERIALS_PER_VERSION + len(grants) + index)
        for index, name in enumerate(names)
    )
    try:
        return Bundle(
            trust_domain=policy.trust_domain,
            issuer=issuer,
            audience=audience,
            version=version,
            issued_at=start,
            expires=round((start + lifetime) * 1000) / 1000,
            grants=records,
            audit_agents=audit_agents,
            quarantine=tuple(sorted(quarantine, key=lambda entry: entry.agent)),
            names=name_records,
        )
    except ValueError as exc:
        raise ConfigError(f"bundle: cannot issue: {exc}") from None
