"""Signed grant bundles: sign, verify.

    policy ──issue_bundle──▶ Bundle ──sign_bundle──▶ envelope bytes
    envelope bytes ──verify_bundle──▶ VerifiedBundle (the only thing to apply)

Issuing (policy → Bundle) is the policy layer's: ``ztnet.policy.issue``.

verify_bundle checks the signature *first* and decodes only the bytes the
signature covers; then it checks, in this order, that the bundle is for this
host (audience), is not older than what the host already applied (rollback),
is still fresh (its own ``expires``: a stale bundle means updates are being
withheld, a freeze) and that no grant in it has already expired. Any failure
rejects the whole bundle. The payload format lives in ztnet.grants.payload;
its names are re-exported here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ztnet.errors import BundleRejected, ConfigError, GrantExpired
from ztnet.grants.envelope import TrustedKeys, VerifiedPayload, sign_envelope, verify_envelope
from ztnet.grants.model import Grant, format_grant_id
from ztnet.grants.names import NameGrant
from ztnet.grants.payload import (
    Bundle,
    GrantRecord,
    NameRecord,
    decode_payload,
    encode_payload,
    normalize_host,
    parse_spiffe_agent_id,
)
from ztnet.text import format_time

__all__ = [
    "BUNDLE_PAYLOAD_TYPE",
    "Bundle",
    "GrantRecord",
    "NameRecord",
    "VerifiedBundle",
    "check_bundle",
    "decode_payload",
    "encode_payload",
    "normalize_host",
    "parse_spiffe_agent_id",
    "sign_bundle",
    "verify_bundle",
]

BUNDLE_PAYLOAD_TYPE = "application/vnd.ztnet.bundle.v1+json"


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    """A bundle whose signature, audience, version and freshness were checked
    by verify_bundle (construct it only there). ``grants`` are the model
    grants to apply; ``key_id`` names the key that signed; ``payload_sha256``
    (hex) identifies the exact payload, e.g. to log what was applied."""

    bundle: Bundle
    grants: tuple[Grant, ...]
    key_id: str
    payload_sha256: str
    names: tuple[NameGrant, ...] = ()  # hostname grants, for the daemon's resolver

    @property
    def version(self) -> int:
        """The policy version: equal to the applied one means nothing to do."""
        return self.bundle.version


def sign_bundle(bundle: Bundle, private_key: Ed25519PrivateKey) -> bytes:
    """The signed envelope (JSON bytes) carrying ``bundle``."""
    return sign_envelope(encode_payload(bundle), BUNDLE_PAYLOAD_TYPE, private_key)


def verify_bundle(
    envelope: bytes,
    *,
    trusted: TrustedKeys,
    host: str | None,
    min_version: int,
    now: float,
    trust_domain: str | None = None,
) -> VerifiedBundle:
    """Verify and check a signed bundle; raise a GrantError subclass naming
    the reason. ``host`` None skips the audience check (for inspection only,
    never for applying); ``min_version`` is the version currently applied
    (equal is accepted, lower is a rollback); ``trust_domain``, if given,
    pins the bundle's trust domain. Expired bundle → BundleRejected; a grant
    already past its window → GrantExpired."""
    verified = verify_envelope(envelope, trusted=trusted, payload_type=BUNDLE_PAYLOAD_TYPE)
    return check_bundle(verified, host=host, min_version=min_version, now=now,
                        trust_domain=trust_domain)


def check_bundle(
    verified: VerifiedPayload,
    *,
    host: str | None,
    min_version: int,
    now: float,
    trust_domain: str | None = None,
) -> VerifiedBundle:
    """verify_bundle's checks of a payload whose signature ``verify_envelope`` checked."""
    if verified.payload_type != BUNDLE_PAYLOAD_TYPE:
        raise BundleRejected(f"bundle: payload type {verified.payload_type!r} is not "
                             f"{BUNDLE_PAYLOAD_TYPE!r}")
    bundle = decode_payload(verified.payload)  # only bytes the signature covered
    if trust_domain is not None and bundle.trust_domain != trust_domain:
        raise BundleRejected(
            f"bundle: trust domain {bundle.trust_domain} is not this host's {trust_domain}"
        )
    if host is not None:
        try:
            this_host = normalize_host(host)
        except ValueError as exc:
            raise ConfigError(f"bundle: bad host: {exc}") from None
        if bundle.audience != this_host:
            raise BundleRejected(
                f"bundle: this bundle is for host {bundle.audience}, this host is {this_host}"
            )
    if bundle.version < min_version:
        raise BundleRejected(
            f"bundle: version {bundle.version} is older than version {min_version} already "
            "applied; refusing a rollback"
        )
    if now >= bundle.expires:
        raise BundleRejected(
            f"bundle: version {bundle.version} expired at {format_time(bundle.expires)} "
            f"(now {format_time(now)}); refusing a stale policy"
        )
    for record in bundle.grants:
        grant = record.grant
        if grant.not_after <= now:
            raise GrantExpired(
                f"bundle: grant {grant.label} (agent {grant.agent}, {grant.proto} "
                f"{grant.network}) expired at {format_time(grant.not_after)}; "
                "refusing the whole bundle"
            )
    for name_record in bundle.names:
        name_grant = name_record.grant
        if name_grant.not_after <= now:
            raise GrantExpired(
                f"bundle: grant {format_grant_id(name_grant.grant_id)} (agent "
                f"{name_grant.agent}, {name_grant.proto} {name_grant.pattern}) expired at "
                f"{format_time(name_grant.not_after)}; refusing the whole bundle"
            )
    return VerifiedBundle(
        bundle=bundle,
        grants=tuple(record.grant for record in bundle.grants),
        key_id=verified.key_id,
        payload_sha256=hashlib.sha256(verified.payload).hexdigest(),
        names=tuple(record.grant for record in bundle.names),
    )
