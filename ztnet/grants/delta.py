"""Signed bundle deltas: one grant added or revoked without re-sending 100,000.

A delta names the exact state it applies to, by version *and* by the SHA-256
of the payload that produced that state (a bundle's, or the previous
delta's), and the version it leads to::

    {"add":[<grant objects, as in a bundle>],"audience":"web-1",
     "base_sha256":"<64 hex>","base_version":7,"issued_at_ms":…,"issuer":"…",
     "revoke":["g-…"],"trust_domain":"example.org","version":8}

It travels in the same DSSE envelope as a bundle, under its own payload type
(``DELTA_PAYLOAD_TYPE``; the type is signed, so a delta cannot be replayed as
a bundle or the other way round). Because the base digest is part of the
signed bytes, the states of a host form a hash chain: a delta applies to one
state only, so replaying it, applying it twice or out of order, or on a host
that missed one, is refused ("send a whole bundle"), and the state reached
after a delta is identified by that delta's digest.

A delta changes address grants only. The bundle's expiry (its freshness), its
audit and quarantine lists and its hostname grants change with a whole bundle;
a delta keeps them, so a delta never renews a stale policy and is refused once
its base has expired.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ztnet.errors import BundleRejected, GrantExpired
from ztnet.grants import strictjson
from ztnet.grants.bundle import VerifiedBundle
from ztnet.grants.envelope import VerifiedPayload, sign_envelope
from ztnet.grants.limits import (
    MAX_BUNDLE_GRANTS,
    MAX_DELTA_CHANGES,
    MAX_DELTA_PAYLOAD_BYTES,
    MAX_ISSUER,
    structure_kept,
)
from ztnet.grants.model import Grant, format_grant_id, parse_grant_id
from ztnet.grants.payload import (
    Bundle,
    GrantRecord,
    _integer,
    _object,
    _printable_ascii,
    _string,
    decode_grant_record,
    encode_grant_record,
    normalize_host,
    to_ms,
)
from ztnet.text import format_time

DELTA_PAYLOAD_TYPE = "application/vnd.ztnet.bundle-delta.v1+json"
DELTA_KEYS = frozenset({"trust_domain", "issuer", "audience", "base_version", "base_sha256",
                        "version", "issued_at_ms", "add", "revoke"})
_SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")


@dataclass(frozen=True, slots=True)
class BundleDelta:
    """Grants to add and grant ids to revoke, against one exact state."""

    trust_domain: str
    issuer: str
    audience: str
    base_version: int
    base_sha256: str
    version: int
    issued_at: float
    add: tuple[GrantRecord, ...] = ()
    revoke: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.base_version < self.version:
            raise ValueError(f"version {self.version} must be above base version "
                             f"{self.base_version}")
        if not _SHA256_RE.match(self.base_sha256):
            raise ValueError("base_sha256 must be 64 lower-case hex digits")
        if not 0 < len(self.issuer) <= MAX_ISSUER or not _printable_ascii(self.issuer):
            raise ValueError("issuer must be 1-256 printable ASCII characters")
        if normalize_host(self.audience) != self.audience:
            raise ValueError(f"audience {self.audience!r} is not a lower-case host name")
        if not self.add and not self.revoke:
            raise ValueError("a delta must add or revoke at least one grant")
        if len(self.add) + len(self.revoke) > MAX_DELTA_CHANGES:
            raise ValueError(f"{len(self.add)} additions and {len(self.revoke)} revocations, "
                             f"more than the {MAX_DELTA_CHANGES} a delta may carry")
        to_ms(self.issued_at, "issued_at")
        added = [record.grant.grant_id for record in self.add]
        if len(set(added)) != len(added):
            raise ValueError("an added grant id appears more than once")
        if list(self.revoke) != sorted(set(self.revoke)):
            raise ValueError("revoked grant ids must be sorted and unique")
        if set(added) & set(self.revoke):
            raise ValueError("a grant id is both added and revoked")
        serials = [record.serial for record in self.add]
        if len(set(serials)) != len(serials):
            raise ValueError("added grant serials must be unique")


def encode_delta(delta: BundleDelta) -> bytes:
    return strictjson.dumps({
        "trust_domain": delta.trust_domain,
        "issuer": delta.issuer,
        "audience": delta.audience,
        "base_version": delta.base_version,
        "base_sha256": delta.base_sha256,
        "version": delta.version,
        "issued_at_ms": to_ms(delta.issued_at),
        "add": [encode_grant_record(delta.trust_domain, record) for record in delta.add],
        "revoke": [format_grant_id(grant_id) for grant_id in delta.revoke],
    })


def decode_delta(data: bytes) -> BundleDelta:
    """Strict and canonical, like a bundle's payload; BundleRejected names what is wrong."""
    if len(data) > MAX_DELTA_PAYLOAD_BYTES:
        raise _malformed(f"{len(data)} bytes, more than the limit of {MAX_DELTA_PAYLOAD_BYTES}")
    # at most one object per added grant (two with a budget) and the payload itself
    limit = 2 * MAX_DELTA_CHANGES + 3
    if len(structure_kept(data, b"{[", stop_above=limit)) > limit:
        raise _malformed("more JSON structure than a delta can have; refused before parsing")
    try:
        obj = _object(strictjson.loads(data), DELTA_KEYS, "delta")
        trust_domain = _string(obj, "trust_domain", "")
        raw_add, raw_revoke = obj["add"], obj["revoke"]
        if not isinstance(raw_add, list) or not isinstance(raw_revoke, list) \
                or len(raw_add) + len(raw_revoke) > MAX_DELTA_CHANGES:
            raise _malformed(f"add and revoke must be lists of at most {MAX_DELTA_CHANGES} "
                             "entries together")
        add = tuple(decode_grant_record(raw, f"add[{index}]", trust_domain)
                    for index, raw in enumerate(raw_add))
        revoke = tuple(_grant_id(raw, f"revoke[{index}]") for index, raw in enumerate(raw_revoke))
        base_sha256 = _string(obj, "base_sha256", "")
        delta = BundleDelta(
            trust_domain=trust_domain,
            issuer=_string(obj, "issuer", ""),
            audience=_string(obj, "audience", ""),
            base_version=_integer(obj, "base_version", ""),
            base_sha256=base_sha256,
            version=_integer(obj, "version", ""),
            issued_at=_integer(obj, "issued_at_ms", "") / 1000,
            add=add,
            revoke=revoke,
        )
    except strictjson.StrictJSONError as exc:
        raise _malformed(str(exc)) from None
    except BundleRejected as exc:  # the bundle payload's field checks say "bundle:"
        if str(exc).startswith("delta:"):
            raise
        raise BundleRejected("delta: " + str(exc).removeprefix("bundle: ")) from None
    except ValueError as exc:
        raise _malformed(str(exc)) from None
    if encode_delta(delta) != data:
        raise _malformed("not in canonical form (sorted keys, no whitespace, ASCII)")
    return delta


def sign_delta(delta: BundleDelta, private_key: Ed25519PrivateKey) -> bytes:
    return sign_envelope(encode_delta(delta), DELTA_PAYLOAD_TYPE, private_key)


def diff_bundles(base: VerifiedBundle, target: Bundle) -> BundleDelta:
    """The delta that gives the state ``base`` the address grants of ``target`` (a bundle
    issued later, e.g. from an edited policy): grant ids ``base`` holds stay as they are
    (a delta never changes a grant in place; grant ids follow the rule's content), new
    ids are added as ``target`` issued them, ids it no longer has are revoked. The bundle's
    expiry stays ``base``'s. ValueError when only a whole bundle can say it: another host
    or trust domain, other audited or quarantined agents or hostname grants."""
    held = base.bundle
    for field in ("trust_domain", "audience", "audit_agents", "quarantine"):
        if getattr(held, field) != getattr(target, field):
            raise ValueError(f"the bundles differ in {field}: only a whole bundle changes it")
    if {r.grant.grant_id for r in held.names} != {r.grant.grant_id for r in target.names}:
        raise ValueError("the bundles differ in hostname grants: only a whole bundle "
                         "changes them")
    if target.version <= base.version:
        raise ValueError(f"version {target.version} must be above the held version "
                         f"{base.version}")
    before = {record.grant.grant_id for record in held.grants}
    after = {record.grant.grant_id for record in target.grants}
    return BundleDelta(
        trust_domain=target.trust_domain, issuer=target.issuer, audience=target.audience,
        base_version=base.version, base_sha256=base.payload_sha256, version=target.version,
        issued_at=target.issued_at,
        add=tuple(record for record in target.grants if record.grant.grant_id not in before),
        revoke=tuple(sorted(before - after)))


class HeldGrants:
    """The held state's grant ids and serials, kept beside it so that checking a delta
    against 100,000 grants costs a few dictionary lookups, not a pass over them."""

    def __init__(self, verified: VerifiedBundle) -> None:
        bundle = verified.bundle
        self.by_id: dict[int, GrantRecord] = {record.grant.grant_id: record
                                              for record in bundle.grants}
        self.name_ids = frozenset(record.grant.grant_id for record in bundle.names)
        self.serials = {record.serial for record in bundle.grants} | \
            {record.serial for record in bundle.names}
        self._shared = False

    def shared_by_id(self) -> Mapping[int, GrantRecord]:
        """``by_id`` for a reader that keeps it (the flow pipeline, whose reader thread
        looks grants up in it): the next ``apply`` changes a copy, never what was shared."""
        self._shared = True
        return self.by_id

    def apply(self, delta: BundleDelta) -> None:
        if self._shared:
            self.by_id, self._shared = dict(self.by_id), False
        for grant_id in delta.revoke:
            self.serials.discard(self.by_id.pop(grant_id).serial)
        for record in delta.add:
            self.by_id[record.grant.grant_id] = record
            self.serials.add(record.serial)


@dataclass(frozen=True, slots=True)
class VerifiedDelta:
    """A delta checked against the state it applies to (construct it only in
    ``verify_delta``): ``added`` and ``revoked`` are the model grants to change."""

    delta: BundleDelta
    added: tuple[Grant, ...]
    revoked: tuple[Grant, ...]
    key_id: str
    payload_sha256: str

    @property
    def version(self) -> int:
        return self.delta.version

    def apply_to(self, base: VerifiedBundle) -> VerifiedBundle:
        """The state after this delta: ``base`` with its grants changed, in the order the
        datapath keeps them (what stayed, then what was added)."""
        gone = frozenset(self.delta.revoke)
        records = tuple(record for record in base.bundle.grants
                        if record.grant.grant_id not in gone) + self.delta.add
        bundle = base.bundle.with_grants(self.delta.version, self.delta.issued_at, records)
        return replace(base, bundle=bundle, grants=tuple(r.grant for r in records),
                       key_id=self.key_id, payload_sha256=self.payload_sha256)


def verify_delta(verified: VerifiedPayload, *, base: VerifiedBundle, held: HeldGrants,
                 now: float, restoring: bool = False) -> VerifiedDelta:
    """Check a delta whose signature checked out (``verified``) against the state this
    host holds (``base``, with its ``held`` index); raise a GrantError naming the reason.
    ``base`` was verified for this host and trust domain, so matching its audience and
    trust domain pins the delta to them too. ``restoring``: the delta was applied before
    (the daemon's own record, read at a start), so a grant it added that has expired
    since is no reason to refuse it (it is simply not installed) — refusing would bring
    back what the delta revoked."""
    if verified.payload_type != DELTA_PAYLOAD_TYPE:
        raise BundleRejected(f"delta: payload type {verified.payload_type!r} is not "
                             f"{DELTA_PAYLOAD_TYPE!r}")
    delta = decode_delta(verified.payload)
    bundle = base.bundle
    if delta.trust_domain != bundle.trust_domain:
        raise BundleRejected(f"delta: trust domain {delta.trust_domain} is not this host's "
                             f"{bundle.trust_domain}")
    if delta.audience != bundle.audience:
        raise BundleRejected(f"delta: this delta is for host {delta.audience}, this host is "
                             f"{bundle.audience}")
    if (delta.base_version, delta.base_sha256) != (base.version, base.payload_sha256):
        raise BundleRejected(
            f"delta: applies to version {delta.base_version} ({delta.base_sha256[:16]}), this "
            f"host holds version {base.version} ({base.payload_sha256[:16]}); "
            "send a whole bundle")
    if now >= bundle.expires:
        raise BundleRejected(
            f"delta: the bundle it changes (version {base.version}) expired at "
            f"{format_time(bundle.expires)} (now {format_time(now)}); a delta does not renew "
            "a policy, send a whole bundle")
    revoked = []
    for grant_id in delta.revoke:
        record = held.by_id.get(grant_id)
        if record is None:
            what = "a hostname grant (those change with a whole bundle)" \
                if grant_id in held.name_ids else "not held"
            raise BundleRejected(f"delta: revoke {format_grant_id(grant_id)}: {what}")
        revoked.append(record.grant)
    for index, record in enumerate(delta.add):
        grant = record.grant
        if grant.grant_id in held.by_id or grant.grant_id in held.name_ids:
            raise BundleRejected(f"delta: add[{index}]: grant id "
                                 f"{format_grant_id(grant.grant_id)} is already held")
        if record.serial in held.serials:
            raise BundleRejected(f"delta: add[{index}]: serial {record.serial} is already held")
        if grant.not_after <= now and not restoring:
            raise GrantExpired(
                f"delta: grant {grant.label} (agent {grant.agent}, {grant.proto} "
                f"{grant.network}) expired at {format_time(grant.not_after)}; "
                "refusing the whole delta")
    total = len(held.by_id) - len(revoked) + len(delta.add) + len(bundle.audit_agents)
    if total > MAX_BUNDLE_GRANTS:
        raise BundleRejected(f"delta: leaves {total} grants and audited agents, more than the "
                             f"limit of {MAX_BUNDLE_GRANTS}")
    return VerifiedDelta(delta, tuple(record.grant for record in delta.add), tuple(revoked),
                         verified.key_id, hashlib.sha256(verified.payload).hexdigest())


def _grant_id(raw: Any, where: str) -> int:
    if not isinstance(raw, str):
        raise _malformed(f"{where}: expected a grant id string")
    try:
        return parse_grant_id(raw)  # one spelling only: g- and 16 lower-case hex digits
    except ValueError as exc:
        raise _malformed(f"{where}: {exc}") from None


def _malformed(what: str) -> BundleRejected:
    return BundleRejected(f"delta: malformed payload: {what}")
