"""Epochs (what a version contains, when it is renewed) and the hub (who
waits for which answer), without a server."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ztnet import pki
from ztnet.controller.authz import Peer
from ztnet.controller.epochs import MIN_RENEW_INTERVAL, Issuer, effective_policy
from ztnet.controller.hub import Answer, Hub, Session, new_push
from ztnet.controller.store import Revocation
from ztnet.errors import ConfigError
from ztnet.grants.bundle import verify_bundle
from ztnet.policy.compile import compile_grants
from ztnet.policy.document import parse_policy
from ztnet.testing.controller import policy_toml

T0 = 1_800_000_000.0
POLICY = parse_policy(policy_toml({"bot": [("10.0.0.1", "443"), ("10.0.0.2", "80")],
                                   "other": [("10.9.0.0/16", "22")]}), "test")


def grant_ids(agent: str) -> list[int]:
    return [g.grant_id for g in compile_grants(POLICY, now=T0) if g.agent == agent]


def test_revocations_remove_grants_and_keep_agents() -> None:
    first, second = grant_ids("bot")
    revoked = (Revocation("bot", first, 2, T0), Revocation("other", None, 3, T0))
    effective = effective_policy(POLICY, revoked)
    remaining = compile_grants(effective, now=T0)
    assert [g.grant_id for g in remaining] == [second]
    assert [a.name for a in effective.agents] == ["bot", "other"]


def test_an_epoch_signs_the_same_bytes_for_a_host_every_time() -> None:
    key = Ed25519PrivateKey.generate()
    issuer = Issuer(key, grant_ttl=300)
    epoch = issuer.new_epoch(POLICY, policy_version=1, revocations=(), version=7, now=T0,
                             reason="test")
    web1 = issuer.envelope(epoch, "web-1")
    assert Issuer(key, grant_ttl=300).envelope(epoch, "web-1") == web1  # deterministic
    assert issuer.envelope(epoch, "web-2") != web1
    verified = verify_bundle(web1, trusted=[key.public_key()], host="web-1", min_version=7,
                             now=T0 + 1, trust_domain="test.example")
    assert verified.version == 7 and len(verified.grants) == 3


def test_renewal_is_due_at_half_the_shortest_lifetime() -> None:
    issuer = Issuer(Ed25519PrivateKey.generate(), grant_ttl=300)
    epoch = issuer.new_epoch(POLICY, policy_version=1, revocations=(), version=1, now=T0,
                             reason="test")
    assert (epoch.expires, epoch.renew_at) == (T0 + 300, T0 + 150)
    short = parse_policy(policy_toml({"bot": [("10.0.0.1", "443")]}).replace(
        'proto = "tcp"', 'proto = "tcp"\nttl = "1s"'), "short")
    brief = issuer.new_epoch(short, policy_version=1, revocations=(), version=2, now=T0,
                             reason="test")
    assert brief.expires == T0 + 1 and brief.renew_at == T0 + MIN_RENEW_INTERVAL
    assert brief.fresh(T0 + 0.99) and not brief.fresh(T0 + 1)


def test_a_policy_that_cannot_be_issued_is_caught_by_check() -> None:
    issuer = Issuer(Ed25519PrivateKey.generate(), grant_ttl=300)
    with pytest.raises(ConfigError):
        Issuer(Ed25519PrivateKey.generate(), grant_ttl=0).check(POLICY, T0)
    issuer.check(POLICY, T0)


# --- the hub -------------------------------------------------------------------------


def session(host: str) -> Session:
    identity = pki.spiffe_id("test.example", "host", host)
    return Session(host, Peer(identity, serial=1, not_after=T0 + 3600))


def test_a_newer_push_replaces_an_unsent_one() -> None:
    async def scenario() -> None:
        s = session("web-1")
        s.offer(new_push(1, b"one"))
        s.offer(new_push(2, b"two"))
        push = await s.next_push(1.0)
        assert push is not None and push.version == 2
        assert await s.next_push(0.05) is None  # nothing left: a timeout
        assert s.sent_version(push.nonce) == 2

    asyncio.run(scenario())


def test_answers_resolve_waiters_for_that_version_or_earlier() -> None:
    async def scenario() -> None:
        hub = Hub()
        for host in ("ack", "nack", "late", "silent", "gone"):
            hub.attach(session(host))
        answers = hub.expect(["ack", "nack", "late", "silent", "gone"], 5)
        hub.answer("ack", Answer(6, True))  # a later version also covers 5
        hub.answer("nack", Answer(5, False, "bundle: bad"))
        hub.answer("late", Answer(4, True))  # an answer to an older push: still waiting
        hub.detach(hub.sessions()[-1])
        results = await hub.collect(answers, 5, timeout=0.1)
        assert [(r.host, r.outcome, r.version, r.reason) for r in results] == [
            ("ack", "ack", 6, ""), ("gone", "disconnected", 5, ""),
            ("late", "timeout", 5, ""), ("nack", "nack", 5, "bundle: bad"),
            ("silent", "timeout", 5, "")]

    asyncio.run(scenario())


def test_a_reconnecting_host_keeps_its_waiters() -> None:
    async def scenario() -> None:
        hub = Hub()
        old = session("web-1")
        hub.attach(old)
        answers = hub.expect(["web-1"], 3)
        new = session("web-1")
        hub.attach(new)
        assert old.closed and old.failure is not None and "replaced" in str(old.failure)
        hub.detach(old)  # the old stream's cleanup must not touch the new one
        assert hub.is_connected("web-1")
        hub.answer("web-1", Answer(3, True))
        assert [r.outcome for r in await hub.collect(answers, 3, timeout=1)] == ["ack"]

    asyncio.run(scenario())
