"""The Store contract on both backends (SQLite, PostgreSQL: tests/controller/backends.py):
the version counter, tokens, certificates, hosts; then SQLite's own file and upgrades."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controller.backends import Backend
from tests.controller.schema_support import (
    drop_detect_schema,
    drop_jit_schema,
    drop_label_schema,
    drop_tpm_schema,
)
from ztnet.controller.detectstore import AlertRecord, QuarantineRecord
from ztnet.controller.store import SCHEMA_VERSION, HostBinding, SqliteStore, Store, TokenStatus
from ztnet.errors import ConfigError


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore.create(tmp_path / "ztnet.db", "test.example")
    yield store
    store.close()


def test_the_database_is_private_and_in_wal_mode(sqlite_store: SqliteStore,
                                                 tmp_path: Path) -> None:
    store = sqlite_store
    path = tmp_path / "ztnet.db"
    assert path.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.trust_domain() == "test.example"


def test_one_counter_for_policies_revocations_and_renewals(store: Store) -> None:
    assert store.current_version() == 0
    first = store.add_policy("p1", now=10.0)
    revoked, changed = store.set_revocation("bot", 7, now=11.0, revoked=True)
    renewal = store.next_version()
    ahead = store.next_version(at_least=100)
    second = store.add_policy("p2", now=12.0)
    versions = [first.version, revoked, renewal, ahead, second.version]
    assert versions == sorted(set(versions)) and changed
    assert ahead == 101 and store.current_version() == second.version
    current = store.current_policy()
    assert current is not None and (current.version, current.text) == (second.version, "p2")


def test_the_counter_survives_reopening(store: Store, backend: Backend) -> None:
    store.add_policy("p", now=1.0)
    version = store.next_version()
    store.close()
    assert backend.store().next_version() == version + 1


def test_the_fleet_state_is_one_snapshot(store: Store) -> None:
    assert store.fleet_state().policy is None
    store.add_policy("p1", now=1.0)
    version, _ = store.set_revocation("bot", None, now=2.0, revoked=True)
    state = store.fleet_state()
    assert state.version == version == store.current_version()
    assert state.policy is not None and state.policy.text == "p1"
    assert [r.agent for r in state.revocations] == ["bot"]


def test_revocations_keep_64_bit_grant_ids(store: Store) -> None:
    big = 2**64 - 5
    store.set_revocation("bot", big, now=1.0, revoked=True)
    store.set_revocation("other", None, now=1.0, revoked=True)
    assert [(r.agent, r.grant_id) for r in store.revocations()] == [("bot", big),
                                                                     ("other", None)]
    _, changed = store.set_revocation("bot", big, now=2.0, revoked=False)
    assert changed and [r.agent for r in store.revocations()] == ["other"]
    _, changed = store.set_revocation("bot", big, now=3.0, revoked=False)
    assert not changed


def test_a_token_is_used_once_before_it_expires(store: Store) -> None:
    store.add_token("d1", "web-1", now=100.0, expires_at=200.0)
    assert store.consume_token("d1", "web-2", now=150.0) is TokenStatus.WRONG_HOST
    assert store.consume_token("d1", "web-1", now=150.0) is TokenStatus.ACCEPTED
    assert store.consume_token("d1", "web-1", now=151.0) is TokenStatus.USED
    assert store.consume_token("nope", "web-1", now=150.0) is TokenStatus.UNKNOWN
    store.add_token("d2", "web-1", now=100.0, expires_at=200.0)
    assert store.consume_token("d2", "web-1", now=200.0) is TokenStatus.EXPIRED
    assert store.consume_token("d2", "web-1", now=199.9) is TokenStatus.ACCEPTED


def test_a_token_is_used_once_across_connections(store: Store, backend: Backend) -> None:
    store.add_token("d", "web-1", now=0.0, expires_at=10.0)
    other = backend.store()
    outcomes = {store.consume_token("d", "web-1", 1.0), other.consume_token("d", "web-1", 1.0)}
    assert outcomes == {TokenStatus.ACCEPTED, TokenStatus.USED}


def test_certificates_are_revoked_by_identity(store: Store) -> None:
    host = "spiffe://test.example/host/web-1"
    store.record_certificate(2**150, host, now=1.0, not_after=100.0)
    store.record_certificate(2, host, now=2.0, not_after=100.0)
    assert not store.certificate_revoked(2**150)
    store.record_certificate(3, host, now=3.0, not_after=100.0, replace_older=True)
    assert store.certificate_revoked(2**150) and store.certificate_revoked(2)
    assert not store.certificate_revoked(3)
    assert not store.certificate_revoked(99)  # unknown serials are not "revoked"
    assert store.revoke_certificates(host, now=4.0) == 1
    assert store.certificate_revoked(3)


def test_hosts_record_acks_and_nacks(store: Store) -> None:
    store.enroll_host("web-1", "spiffe://test.example/host/web-1", now=1.0)
    store.record_answer("web-1", 5, now=2.0, nack_reason=None)
    store.record_answer("web-1", 3, now=3.0, nack_reason=None)  # never goes backwards
    store.record_answer("web-1", 6, now=4.0, nack_reason="bundle: expired")
    (host,) = store.hosts()
    assert (host.applied_version, host.last_seen) == (5, 4.0)
    assert (host.nack_version, host.nack_reason) == (6, "bundle: expired")
    store.record_seen("web-1", now=9.0, applied_version=6)
    assert store.hosts()[0].applied_version == 6


def test_a_failed_transaction_changes_nothing(store: Store, backend: Backend) -> None:
    store.add_token("d", "web-1", now=0.0, expires_at=10.0)
    with pytest.raises(backend.integrity_error):
        store.add_token("d", "web-2", now=0.0, expires_at=10.0)
    assert store.consume_token("d", "web-1", now=1.0) is TokenStatus.ACCEPTED


def test_opening_something_else_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing"):
        SqliteStore.open(tmp_path / "absent.db")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema', '99')")
    with pytest.raises(ConfigError, match="schema 99"):
        SqliteStore.open(other)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(ConfigError, match="not a (ztnet )?database"):
        SqliteStore.open(garbage)


def test_a_require_tpm_token_is_left_unused_by_a_software_enrollment(
        store: Store) -> None:
    store.add_token("d", "web-1", now=0.0, expires_at=10.0, require_tpm=True)
    assert store.check_token("d", "web-1", now=1.0) is TokenStatus.ACCEPTED
    assert store.consume_token("d", "web-1", now=1.0) is TokenStatus.TPM_REQUIRED
    assert store.consume_token("d", "web-1", now=1.0, attested=True) is TokenStatus.ACCEPTED
    assert store.check_token("d", "web-1", now=1.0) is TokenStatus.USED


def test_a_host_binding_is_recorded_shown_and_revoked(store: Store) -> None:
    binding = HostBinding("tpm", "sha256:" + "ab" * 32, b"\x00\x23public")
    store.enroll_host("web-1", "spiffe://test.example/host/web-1", 1.0, binding=binding)
    store.enroll_host("web-2", "spiffe://test.example/host/web-2", 1.0)
    assert store.host_binding("web-1") == binding
    assert store.host_with_ek(binding.ek_hash) == "web-1"
    assert [(h.name, h.attestation, h.ek_hash) for h in store.hosts()] == [
        ("web-1", "tpm", binding.ek_hash), ("web-2", "software", "")]
    store.unbind_host("web-1")
    store.unbind_host("web-2")  # a software host has nothing to unbind
    assert store.host_binding("web-1") == HostBinding("revoked", "", b"")
    assert store.host_binding("web-2") == HostBinding("software", "", b"")
    assert store.host_with_ek(binding.ek_hash) is None


def test_a_schema_3_database_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "ztnet.db"
    store = SqliteStore.create(path, "test.example")
    store.add_token("d", "web-1", now=0.0, expires_at=10.0)
    store.enroll_host("web-0", "spiffe://test.example/host/web-0", 1.0)
    store.close()
    with sqlite3.connect(path) as db:
        drop_tpm_schema(db)
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    store = SqliteStore.open(path)
    try:
        assert store._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (
            str(SCHEMA_VERSION),)
        assert store.consume_token("d", "web-1", now=1.0) is TokenStatus.ACCEPTED
        assert store.host_binding("web-0") == HostBinding("software", "", b"")
    finally:
        store.close()


def test_a_schema_4_database_is_upgraded_with_unlabelled_hosts(tmp_path: Path) -> None:
    path = tmp_path / "ztnet.db"
    store = SqliteStore.create(path, "test.example")
    store.add_token("d", "web-1", now=0.0, expires_at=10.0)
    store.enroll_host("web-0", "spiffe://test.example/host/web-0", 1.0)
    store.close()
    with sqlite3.connect(path) as db:
        drop_label_schema(db)
        db.execute("UPDATE meta SET value = '4' WHERE key = 'schema'")
    store = SqliteStore.open(path)
    try:
        assert store._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (
            str(SCHEMA_VERSION),)
        assert store.host_labels() == {"web-0": {}}
        assert store.token_labels("d") == {}
        assert store.set_host_labels("web-0", {"env": "prod"})
        assert [dict(h.labels) for h in store.hosts()] == [{"env": "prod"}]
    finally:
        store.close()


def test_token_labels_become_the_host_labels(store: Store) -> None:
    store.add_token("d", "web-1", now=0.0, expires_at=10.0, labels={"role": "gpu", "env": "x"})
    assert store.token_labels("d") == {"env": "x", "role": "gpu"}
    assert store.token_labels("unknown") == {}
    store.enroll_host("web-1", "spiffe://test.example/host/web-1", 1.0,
                      labels=store.token_labels("d"))
    assert store.host_labels() == {"web-1": {"env": "x", "role": "gpu"}}
    # re-enrollment takes the new token's labels (none)
    store.enroll_host("web-1", "spiffe://test.example/host/web-1", 2.0)
    assert store.host_labels() == {"web-1": {}}
    assert not store.set_host_labels("nobody", {"env": "prod"})


def test_a_schema_5_database_is_upgraded_without_jit_grants(tmp_path: Path) -> None:
    path = tmp_path / "ztnet.db"
    store = SqliteStore.create(path, "test.example")
    store.close()
    with sqlite3.connect(path) as db:
        drop_jit_schema(db)
        db.execute("UPDATE meta SET value = '5' WHERE key = 'schema'")
    store = SqliteStore.open(path)
    try:
        assert store._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (
            str(SCHEMA_VERSION),)
        assert store.jit_grants() == () and store.grant_requests() == ()
    finally:
        store.close()


def test_jit_grants_and_requests_round_trip_and_approve_once(store: Store) -> None:
    from ztnet.controller.jitstore import GrantRequest, JitGrant
    from ztnet.grants.model import PortRange, Proto
    from ztnet.policy.fields import parse_destination

    request = GrantRequest("r-1", "web-1", "bot", parse_destination("10.0.0.7"), Proto.TCP,
                           PortRange(443, 443), 60.0, "why", "pending", 1.0)
    store.add_request(request)
    grant = JitGrant(2**64 - 5, "bot", parse_destination("10.0.0.7"), Proto.TCP,
                     PortRange(443, 443), 2.0, 62.0, ("web-1",), "why", "ops", "host:web-1",
                     "r-1", 2.0)
    before = store.current_version()
    assert store.add_jit_grant(grant, approve="r-1", decided_by="ops") == before + 1
    assert store.add_jit_grant(grant, approve="r-1", decided_by="ops") is None  # once only
    assert store.jit_grants(active_at=10.0) == (grant,)
    assert store.jit_grants(active_at=62.0) == ()
    decided = store.grant_request("r-1")
    assert decided is not None and (decided.state, decided.grant_id) == ("approved", grant.grant_id)
    assert not store.deny_request("r-1", "ops", 3.0, "late")
    assert store.grant_requests(state="pending") == ()


def test_quarantines_bump_the_version_and_release_lifts_every_host(store: Store) -> None:
    start = store.current_version()
    record = QuarantineRecord("bot", "", "scan", True, "alice", 0, 0, 5.0)
    version = store.set_quarantine(record)
    assert version == start + 1
    store.set_quarantine(QuarantineRecord("bot", "web-1", "again", False, "auto", 7, 0, 6.0))
    assert [(q.host, q.actor, q.freeze) for q in store.quarantines()] == [
        ("", "alice", True), ("web-1", "auto", False)]
    assert store.quarantines()[0].applies_to("web-2")
    assert not store.quarantines()[1].applies_to("web-2")
    released, lifted = store.release("bot")
    assert released == start + 3 and len(lifted) == 2 and store.quarantines() == ()
    assert store.release("bot") == (0, ())  # nothing to lift: no version spent
    assert store.current_version() == start + 3


def test_alerts_are_listed_oldest_first_after_an_id(store: Store) -> None:
    ids = [store.add_alert(AlertRecord(0, float(i), "bot" if i % 2 else "other", "web-1",
                                       "fan-out", f"alert {i}", (f"u{i}",), "alert", i))
           for i in range(5)]
    assert [a.id for a in store.alerts()] == ids
    assert [a.summary for a in store.alerts(agent="bot")] == ["alert 1", "alert 3"]
    assert [a.id for a in store.alerts(after_id=ids[2])] == ids[3:]
    assert [a.id for a in store.alerts(limit=2)] == ids[3:]
    assert store.alerts()[0].action == "alert" and store.alerts()[0].evidence == ("u0",)


def test_baselines_are_saved_read_and_reset(store: Store) -> None:
    assert store.baseline("bot") is None
    store.save_baseline("bot", {"destinations": [["tcp", "10.0.0.1/32", "443"]]}, 1.0)
    assert store.baseline("bot") == {"destinations": [["tcp", "10.0.0.1/32", "443"]]}
    assert store.reset_baseline("bot") and not store.reset_baseline("bot")
    assert store.baseline("bot") is None


def test_a_schema_6_database_is_upgraded_and_keeps_its_state(tmp_path: Path) -> None:
    path = tmp_path / "ztnet.db"
    store = SqliteStore.create(path, "test.example")
    store.add_policy('trust_domain = "test.example"\n', now=1.0)
    store.close()
    with sqlite3.connect(path) as db:
        drop_detect_schema(db)
        db.execute("UPDATE meta SET value = '6' WHERE key = 'schema'")
    store = SqliteStore.open(path)
    try:
        assert store._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (
            str(SCHEMA_VERSION),)
        assert store.current_policy() is not None and store.jit_grants() == ()
        assert store.quarantines() == () and store.alerts() == ()
        assert store.baseline("bot") is None
    finally:
        store.close()
