"""``Store`` on PostgreSQL (`controller serve --database postgresql://…`): the state of
every replica in one database (docs/controller.md, "Running several replicas").

psycopg 3 with a connection pool: each method is one transaction on a pooled
connection (committed when it returns, rolled back when it raises), so the store is
safe from any thread. The schema and its migrations are in ztnet.controller.pgschema,
the flow records in ztnet.controller.pgflows.

Every change that starts a version also NOTIFYs ``ztnet_changes`` in its transaction:
PostgreSQL delivers it at commit, to every replica listening
(ztnet.controller.replicas).

A lost database: a failed connection or statement raises ``DatabaseUnavailable``
(UNAVAILABLE at the RPC boundary) and marks the store unavailable. While a watcher
(the replica listener) runs, calls then fail at once instead of waiting on a
connection timeout each, until the watcher reconnects and marks it available again.
Nothing is ever answered from a cache: no token, certificate or bundle comes from
state the database did not just confirm.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from ztnet import logs
from ztnet.controller import pgschema
from ztnet.controller.int64 import signed64, unsigned64
from ztnet.controller.pgdetect import PgDetectStore
from ztnet.controller.pgflows import PgFlowStore
from ztnet.controller.pgjit import PgJitStore
from ztnet.controller.status import DatabaseUnavailable
from ztnet.controller.store import (
    FleetState,
    HostBinding,
    HostRecord,
    PolicyRecord,
    Revocation,
    TokenStatus,
    serial_key,
    token_outcome,
)
from ztnet.errors import ConfigError
from ztnet.policy.selectors import decode_labels, encode_labels

CONNECT_TIMEOUT = 3  # seconds, per connection attempt
POOL_TIMEOUT = 3.0  # seconds to wait for a pooled connection
POOL_SIZE = 8
_LOST = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)

Conn = psycopg.Connection[tuple[Any, ...]]


def is_database_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


def describe(url: str) -> str:
    """``url`` without its password: user@host:port/dbname (for messages and logs)."""
    try:
        parts = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<an unparsable database URL>"
    user = f"{parts['user']}@" if parts.get("user") else ""
    return f"postgresql://{user}{parts.get('host', '')}:{parts.get('port', 5432)}/" \
           f"{parts.get('dbname', '')}"


class PgStore(PgFlowStore, PgJitStore, PgDetectStore):
    def __init__(self, url: str, pool: ConnectionPool[Conn], trust_domain: str) -> None:
        self.url = url
        self._pool = pool
        self._trust_domain = trust_domain
        self._available = True
        self._watched = False
        self._state_lock = threading.Lock()
        self._listeners: list[Callable[[bool], object]] = []
        self._partitions: set[int] = set()

    @classmethod
    def open(cls, url: str, *, trust_domain: str | None = None,
             migrate: bool = True) -> PgStore:
        """Connect, migrate (``migrate``: under the migration lock; else refuse an old
        schema) and check the trust domain: ``trust_domain`` given, the database takes it
        if it has none yet, and must already have it otherwise."""
        where = describe(url)
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
                if migrate:
                    applied = pgschema.migrate(conn)
                    if applied:
                        logs.event("database migrated", database=where,
                                   migrations=",".join(map(str, applied)))
                schema = pgschema.schema_version(conn)
                if schema != pgschema.PG_SCHEMA_VERSION:
                    raise ConfigError(
                        f"controller: {where} has schema {schema}; this ztnet reads schema "
                        f"{pgschema.PG_SCHEMA_VERSION} (run `ztnet controller migrate "
                        "--database URL`)")
                stored = _trust_domain(conn, trust_domain)
        except psycopg.Error as exc:
            raise ConfigError(f"controller: database {where}: {_first_line(exc)}") from None
        if stored is None:
            raise ConfigError(f"controller: {where} has no trust domain yet; give it one with "
                              "`ztnet controller migrate --state DIR --database URL`")
        if trust_domain is not None and stored != trust_domain:
            raise ConfigError(f"controller: {where} belongs to trust domain {stored!r}, but "
                              f"this state directory's is {trust_domain!r}")
        pool: ConnectionPool[Conn] = ConnectionPool(
            url, min_size=1, max_size=POOL_SIZE, timeout=POOL_TIMEOUT, open=True,
            kwargs={"connect_timeout": CONNECT_TIMEOUT},
            check=ConnectionPool.check_connection, name="ztnet-store")
        return cls(url, pool, stored)

    def close(self) -> None:
        self._pool.close()

    @property
    def where(self) -> str:
        return describe(self.url)

    def holds_state(self) -> bool:
        """Anything issued from this database yet (a certificate, a policy)?"""
        row = self._one("SELECT EXISTS (SELECT 1 FROM certificates) OR "
                        "EXISTS (SELECT 1 FROM policies)")
        return bool(row and row[0])

    # --- availability (ztnet.controller.replicas watches it) ---------------------

    @property
    def available(self) -> bool:
        return self._available

    def watch_availability(self, listener: Callable[[bool], object]) -> None:
        """``listener(available)`` on each change (from any thread); from now on calls
        fail at once while the database is marked unavailable."""
        self._listeners.append(listener)
        self._watched = True

    def set_available(self, available: bool, reason: str = "") -> None:
        with self._state_lock:
            if available == self._available:
                return
            self._available = available
        logs.event("database available" if available else "database unavailable",
                   logging.INFO if available else logging.ERROR, database=describe(self.url),
                   reason=reason)
        for listener in self._listeners:
            listener(available)

    @contextmanager
    def _tx(self, *, snapshot: bool = False) -> Iterator[Conn]:
        if self._watched and not self._available:
            raise DatabaseUnavailable("controller: the database is unavailable; nothing is "
                                      "issued until it is back")
        try:
            with self._pool.connection() as conn:
                if snapshot:
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                yield conn
        except _LOST as exc:
            self.set_available(False, _first_line(exc))
            raise DatabaseUnavailable(f"controller: the database is unavailable "
                                      f"({_first_line(exc)}); nothing is issued until it is "
                                      "back") from None

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        with self._tx() as conn:
            row: tuple[Any, ...] | None = conn.execute(sql.encode(), params).fetchone()
            return row

    def _bump(self, conn: Conn, at_least: int = 0) -> int:
        row = conn.execute("UPDATE counters SET value = greatest(value, %s) + 1 "
                           "WHERE name = 'version' RETURNING value", (at_least,)).fetchone()
        assert row is not None
        version = int(row[0])
        conn.execute("SELECT pg_notify(%s, %s)", (pgschema.CHANNEL, str(version)))
        return version

    # --- versions and policies ------------------------------------------------------

    def trust_domain(self) -> str:
        return self._trust_domain

    def current_version(self) -> int:
        row = self._one("SELECT value FROM counters WHERE name = 'version'")
        return int(row[0]) if row else 0

    def next_version(self, at_least: int = 0) -> int:
        with self._tx() as conn:
            return self._bump(conn, at_least)

    def add_policy(self, text: str, now: float) -> PolicyRecord:
        with self._tx() as conn:
            version = self._bump(conn)
            conn.execute("INSERT INTO policies VALUES (%s, %s, %s)", (version, text, now))
        return PolicyRecord(version, text, now)

    def current_policy(self) -> PolicyRecord | None:
        with self._tx() as conn:
            return _policy(conn)

    def set_revocation(self, agent: str, grant_id: int | None, now: float,
                       revoked: bool) -> tuple[int, bool]:
        key = signed64(grant_id or 0)
        with self._tx() as conn:
            version = self._bump(conn)
            if revoked:
                cursor = conn.execute("INSERT INTO revocations VALUES (%s, %s, %s, %s) "
                                      "ON CONFLICT DO NOTHING", (agent, key, version, now))
            else:
                cursor = conn.execute("DELETE FROM revocations WHERE agent = %s AND "
                                      "grant_id = %s", (agent, key))
            return version, cursor.rowcount > 0

    def revocations(self) -> tuple[Revocation, ...]:
        with self._tx() as conn:
            return _revocations(conn)

    def fleet_state(self) -> FleetState:
        with self._tx(snapshot=True) as conn:
            row = conn.execute("SELECT value FROM counters WHERE name = 'version'").fetchone()
            return FleetState(int(row[0]) if row else 0, _policy(conn), _revocations(conn))

    # --- enrollment tokens -----------------------------------------------------------

    def add_token(self, digest: str, host: str, now: float, expires_at: float, *,
                  require_tpm: bool = False, labels: Mapping[str, str] | None = None) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO tokens (digest, host, created_at, expires_at, used_at, "
                         "require_tpm, labels) VALUES (%s, %s, %s, %s, NULL, %s, %s)",
                         (digest, host, now, expires_at, require_tpm,
                          encode_labels(labels or {})))

    def token_labels(self, digest: str) -> dict[str, str]:
        row = self._one("SELECT labels FROM tokens WHERE digest = %s", (digest,))
        return decode_labels(str(row[0])) if row else {}

    def consume_token(self, digest: str, host: str, now: float, *,
                      attested: bool = False) -> TokenStatus:
        with self._tx() as conn:
            # FOR UPDATE: two replicas enrolling with one token, one wins
            row = conn.execute("SELECT host, expires_at, used_at, require_tpm FROM tokens "
                               "WHERE digest = %s FOR UPDATE", (digest,)).fetchone()
            outcome = token_outcome(row, host, now, attested)
            if outcome is TokenStatus.ACCEPTED:
                conn.execute("UPDATE tokens SET used_at = %s WHERE digest = %s", (now, digest))
        return outcome

    def check_token(self, digest: str, host: str, now: float) -> TokenStatus:
        row = self._one("SELECT host, expires_at, used_at, require_tpm FROM tokens "
                        "WHERE digest = %s", (digest,))
        return token_outcome(row, host, now, True)

    # --- certificates and hosts ------------------------------------------------------

    def record_certificate(self, serial: int, spiffe_id: str, now: float, not_after: float, *,
                           replace_older: bool = False) -> None:
        with self._tx() as conn:
            if replace_older:
                conn.execute("UPDATE certificates SET revoked_at = %s "
                             "WHERE spiffe_id = %s AND revoked_at IS NULL", (now, spiffe_id))
            conn.execute("INSERT INTO certificates VALUES (%s, %s, %s, %s, NULL)",
                         (serial_key(serial), spiffe_id, now, not_after))

    def certificate_revoked(self, serial: int) -> bool:
        row = self._one("SELECT revoked_at FROM certificates WHERE serial = %s",
                        (serial_key(serial),))
        return row is not None and row[0] is not None

    def revoke_certificates(self, spiffe_id: str, now: float) -> int:
        with self._tx() as conn:
            cursor = conn.execute("UPDATE certificates SET revoked_at = %s WHERE spiffe_id = %s "
                                  "AND revoked_at IS NULL", (now, spiffe_id))
            return cursor.rowcount

    def enroll_host(self, name: str, spiffe_id: str, now: float, *,
                    binding: HostBinding | None = None,
                    labels: Mapping[str, str] | None = None) -> None:
        bound = binding or HostBinding("software", "", b"")
        with self._tx() as conn:
            conn.execute("INSERT INTO hosts (name, spiffe_id, enrolled_at, attestation, "
                         "ek_hash, enrollment_key, labels) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                         "ON CONFLICT (name) DO UPDATE SET spiffe_id = excluded.spiffe_id, "
                         "enrolled_at = excluded.enrolled_at, applied_version = 0, "
                         "attestation = excluded.attestation, ek_hash = excluded.ek_hash, "
                         "enrollment_key = excluded.enrollment_key, labels = excluded.labels",
                         (name, spiffe_id, now, bound.attestation, bound.ek_hash,
                          bound.enrollment_key or None, encode_labels(labels or {})))
            self.reset_flow_sequence(conn, name)

    def set_host_labels(self, name: str, labels: Mapping[str, str]) -> bool:
        with self._tx() as conn:
            cursor = conn.execute("UPDATE hosts SET labels = %s WHERE name = %s",
                                  (encode_labels(labels), name))
            return cursor.rowcount > 0

    def host_labels(self) -> dict[str, dict[str, str]]:
        with self._tx() as conn:
            rows = conn.execute("SELECT name, labels FROM hosts").fetchall()
        return {str(name): decode_labels(str(text)) for name, text in rows}

    def host_binding(self, name: str) -> HostBinding | None:
        row = self._one("SELECT attestation, ek_hash, enrollment_key FROM hosts "
                        "WHERE name = %s", (name,))
        if row is None:
            return None
        return HostBinding(str(row[0]), str(row[1]), bytes(row[2] or b""))

    def host_with_ek(self, ek_hash: str) -> str | None:
        row = self._one("SELECT name FROM hosts WHERE ek_hash = %s AND attestation = 'tpm' "
                        "ORDER BY name LIMIT 1", (ek_hash,))
        return None if row is None else str(row[0])

    def unbind_host(self, name: str) -> None:
        with self._tx() as conn:
            # "revoked": a later renewal must not fall back to the software path
            conn.execute("UPDATE hosts SET attestation = 'revoked', ek_hash = '', "
                         "enrollment_key = NULL WHERE name = %s AND attestation = 'tpm'",
                         (name,))

    def record_seen(self, host: str, now: float, applied_version: int | None = None) -> None:
        with self._tx() as conn:
            if applied_version is None:
                conn.execute("UPDATE hosts SET last_seen = %s WHERE name = %s", (now, host))
            else:
                conn.execute("UPDATE hosts SET last_seen = %s, applied_version = %s "
                             "WHERE name = %s", (now, applied_version, host))

    def record_answer(self, host: str, version: int, now: float, nack_reason: str | None) -> None:
        with self._tx() as conn:
            if nack_reason is None:
                conn.execute("UPDATE hosts SET last_seen = %s, applied_version = "
                             "greatest(applied_version, %s) WHERE name = %s",
                             (now, version, host))
            else:
                conn.execute("UPDATE hosts SET last_seen = %s, nack_version = %s, "
                             "nack_reason = %s WHERE name = %s",
                             (now, version, nack_reason, host))

    # --- audit chain heads (PostgreSQL only: ztnet.controller.replicas anchors them) ----

    def record_audit_head(self, replica: str, seq: int, digest: str, now: float) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO audit_heads VALUES (%s, %s, %s, %s) ON CONFLICT "
                         "(replica) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, "
                         "updated_at = excluded.updated_at WHERE audit_heads.seq <= "
                         "excluded.seq", (replica, seq, digest, now))

    def audit_heads(self) -> dict[str, tuple[int, str]]:
        """replica → (seq, hash) of its audit trail's last anchored record."""
        with self._tx() as conn:
            rows = conn.execute("SELECT replica, seq, hash FROM audit_heads").fetchall()
        return {str(r): (int(seq), str(h)) for r, seq, h in rows}

    def hosts(self) -> tuple[HostRecord, ...]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT name, spiffe_id, enrolled_at, applied_version, last_seen, "
                "nack_version, nack_reason, attestation, ek_hash, labels FROM hosts "
                "ORDER BY name COLLATE \"C\"").fetchall()
        return tuple(HostRecord(str(r[0]), str(r[1]), float(r[2]), int(r[3]), float(r[4]),
                                int(r[5]), str(r[6]), str(r[7]), str(r[8]),
                                decode_labels(str(r[9]))) for r in rows)


def _policy(conn: Conn) -> PolicyRecord | None:
    row = conn.execute("SELECT version, text, applied_at FROM policies "
                       "ORDER BY version DESC LIMIT 1").fetchone()
    return PolicyRecord(int(row[0]), str(row[1]), float(row[2])) if row else None


def _revocations(conn: Conn) -> tuple[Revocation, ...]:
    # byte order, as SQLite sorts text
    rows = conn.execute("SELECT agent, grant_id, version, created_at FROM revocations "
                        "ORDER BY agent COLLATE \"C\", grant_id").fetchall()
    return tuple(Revocation(str(agent), unsigned64(int(grant)) or None, int(version),
                            float(created)) for agent, grant, version, created in rows)


def _trust_domain(conn: Conn, wanted: str | None) -> str | None:
    if wanted is not None:
        conn.execute("INSERT INTO meta VALUES ('trust_domain', %s) ON CONFLICT DO NOTHING",
                     (wanted,))
    row = conn.execute("SELECT value FROM meta WHERE key = 'trust_domain'").fetchone()
    return None if row is None else str(row[0])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
