"""What only the PostgreSQL store has: migrations under a lock, one version counter for
several replicas, day partitions dropped by retention, the database going away and
coming back. A real server (tests/conftest.py ``postgres_server``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from tests.controller.flow_support import NS, make_record
from tests.controller.test_cli import ztnet
from ztnet.controller import pgschema
from ztnet.controller.enrollment import token_digest
from ztnet.controller.flowstore import FlowRow
from ztnet.controller.pgflows import DAY_NS
from ztnet.controller.pgstore import PgStore, describe
from ztnet.controller.status import DatabaseUnavailable
from ztnet.errors import ConfigError
from ztnet.testing.postgres import PostgresServer

T = TypeVar("T")
DAY0 = 20_000  # a day number (2024-10-04)


def together(count: int, work: Callable[[int], T]) -> list[T]:
    """``work(i)`` in ``count`` threads released at the same instant."""
    barrier = threading.Barrier(count)
    results: list[T | BaseException] = [RuntimeError("not run")] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def test_replicas_starting_together_migrate_once(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    stores = together(4, lambda _: PgStore.open(url, trust_domain="test.example"))
    try:
        with psycopg.connect(url) as conn:
            applied = conn.execute("SELECT version, count(*) FROM schema_migrations "
                                   "GROUP BY version ORDER BY version").fetchall()
        assert applied == [(v, 1) for v in range(1, pgschema.PG_SCHEMA_VERSION + 1)]
        assert {store.trust_domain() for store in stores} == {"test.example"}
    finally:
        for store in stores:
            store.close()


def test_two_replicas_never_issue_the_same_version(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    stores = [PgStore.open(url, trust_domain="test.example") for _ in range(2)]
    try:
        def issue(i: int) -> list[int]:
            store = stores[i]
            out = []
            for n in range(50):
                if n % 3 == 0:
                    out.append(store.add_policy(f"p{i}-{n}", now=float(n)).version)
                elif n % 3 == 1:
                    out.append(store.set_revocation(f"a{i}", n, now=float(n), revoked=True)[0])
                else:
                    out.append(store.next_version())
            return out

        a, b = together(2, issue)
        assert len(set(a) | set(b)) == 100 and max(a + b) == stores[0].current_version() == 100
        assert a == sorted(a) and b == sorted(b)  # each replica's own go up
    finally:
        for store in stores:
            store.close()


def test_the_database_url_and_trust_domain_are_checked(
        postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    with pytest.raises(ConfigError, match="no trust domain yet"):
        PgStore.open(url)
    PgStore.open(url, trust_domain="test.example").close()
    with pytest.raises(ConfigError, match="belongs to trust domain 'test.example'"):
        PgStore.open(url, trust_domain="other.example")
    with pytest.raises(ConfigError, match=r"has schema 0;.*controller migrate"):
        PgStore.open(postgres_server.create_database(), migrate=False)
    secret = f"postgresql://ztnet:hunter2@127.0.0.1:{postgres_server.port}/absent"
    with pytest.raises(ConfigError) as excinfo:
        PgStore.open(secret)
    assert "absent" in str(excinfo.value) and "hunter2" not in str(excinfo.value)
    assert describe(secret) == f"postgresql://ztnet@127.0.0.1:{postgres_server.port}/absent"


def _at(day: int, host: str, count: int, start: int = 0) -> list[FlowRow]:
    """``count`` records received (and made) on ``day``, a second apart."""
    times = [day * DAY_NS + (start + i) * NS for i in range(count)]
    return [FlowRow.of(make_record(host, time_ns=t), t) for t in times]


def test_retention_drops_whole_days(postgres_server: PostgresServer) -> None:
    store = PgStore.open(postgres_server.create_database(), trust_domain="test.example")
    try:
        store.store_flows("h1", 1, _at(DAY0, "h1", 5) + _at(DAY0 + 1, "h1", 3))
        store.store_flows("h2", 1, _at(DAY0, "h2", 2) + _at(DAY0 + 2, "h2", 4))
        assert store.flow_partitions() == [DAY0, DAY0 + 1, DAY0 + 2]
        # everything received before day 1 ends, and one row of day 2
        before = (DAY0 + 2) * DAY_NS + NS // 2
        assert store.prune_flows(before_ns=before, max_rows=0, chunk=1000) == 5 + 3 + 2 + 1
        assert store.flow_partitions() == [DAY0 + 2]
        assert store.flow_count() == 3
        assert store.prune_flows(before_ns=0, max_rows=0, max_rows_per_host=1, chunk=10) == 2
        with store._pool.connection() as conn:
            counts = dict(conn.execute("SELECT host, rows FROM flow_hosts").fetchall())
        assert counts == {"h1": 0, "h2": 1} and store.flow_count() == 1
        # a later batch for a dropped day gets its partition again
        store.store_flows("h1", 2, _at(DAY0, "h1", 1, start=50))
        assert store.flow_partitions() == [DAY0, DAY0 + 2] and store.flow_count() == 2
    finally:
        store.close()


def test_a_lost_database_refuses_everything_until_it_is_back(
        postgres_server: PostgresServer) -> None:
    store = PgStore.open(postgres_server.create_database(), trust_domain="test.example")
    changes: list[bool] = []
    store.watch_availability(changes.append)
    try:
        store.add_token("d", "web-1", now=0.0, expires_at=10.0)
        postgres_server.stop()
        try:
            for call in (lambda: store.consume_token("d", "web-1", now=1.0),
                         store.next_version, lambda: store.certificate_revoked(1)):
                with pytest.raises(DatabaseUnavailable):
                    call()
            assert not store.available and changes == [False]
        finally:
            postgres_server.restart()
        store.set_available(True)  # what the replica listener does once it reconnects
        assert store.consume_token("d", "web-1", now=1.0).value == "accepted"
        assert changes == [False, True]
    finally:
        store.close()


def test_the_admin_commands_work_on_the_database(tmp_path: Path,
                                                 postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    state = tmp_path / "state"
    result = ztnet("controller", "init", "--state", state, "--trust-domain", "test.example",
                   "--database", url)
    assert result.returncode == 0, result.stderr
    assert not (state / "ztnet.db").exists() and "--database URL" in result.stdout
    again = ztnet("controller", "init", "--state", tmp_path / "other", "--trust-domain",
                  "test.example", "--database", url)
    assert again.returncode != 0 and "already holds a controller's state" in again.stderr
    assert not (tmp_path / "other").exists()
    for _ in range(2):  # migrating is idempotent
        result = ztnet("controller", "migrate", "--state", state, "--database", url)
        assert result.returncode == 0 and f"at schema {pgschema.PG_SCHEMA_VERSION}" in \
            result.stdout, result.stderr
    token = ztnet("controller", "token", "create", "--state", state, "--host", "web-1",
                  "--json", env={"ZTNET_DATABASE": url})
    assert token.returncode == 0, token.stderr
    assert ztnet("controller", "admin-cert", "--state", state, "--out", tmp_path / "admin",
                 "--name", "ops", "--database", url).returncode == 0
    assert ztnet("controller", "revoke-admin", "--state", state, "--name", "ops",
                 "--database", url).returncode == 0
    raised = ztnet("controller", "raise-version", "--state", state, "--above", "41",
                   "--database", url)
    assert "to 42" in raised.stdout, raised.stderr
    store = PgStore.open(url)
    try:
        assert store.current_version() == 42
        assert store.check_token(token_digest(json.loads(token.stdout)["token"]), "web-1",
                                 time.time()).value == "accepted"
    finally:
        store.close()
    bad = ztnet("controller", "raise-version", "--state", state, "--above", "1",
                "--database", "mysql://x")
    assert bad.returncode != 0 and "postgresql://" in bad.stderr


def test_a_schema_1_database_is_migrated(postgres_server: PostgresServer,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url = postgres_server.create_database()
    with monkeypatch.context() as older:  # what the first PostgreSQL release made
        for later in range(2, pgschema.PG_SCHEMA_VERSION + 1):
            older.delitem(pgschema._MIGRATIONS, later)
        older.setattr(pgschema, "PG_SCHEMA_VERSION", 1)
        with psycopg.connect(url, autocommit=True) as conn:
            assert pgschema.migrate(conn) == [1]
            conn.execute("INSERT INTO meta VALUES ('trust_domain', 'test.example')")
            conn.execute("INSERT INTO hosts (name, spiffe_id, enrolled_at) VALUES "
                         "('web-0', 'spiffe://test.example/host/web-0', 1.0)")
    with pytest.raises(ConfigError, match=f"has schema 1; this ztnet reads schema "
                       f"{pgschema.PG_SCHEMA_VERSION}"):
        PgStore.open(url, migrate=False)
    store = PgStore.open(url)
    try:
        assert [dict(h.labels) for h in store.hosts()] == [{}]
        assert store.jit_grants() == () and store.grant_requests() == ()
        assert store.quarantines() == () and store.alerts() == ()
    finally:
        store.close()
