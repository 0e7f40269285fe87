"""The PostgreSQL schema of the controller's state, and its versioned migrations.

PostgreSQL has its own schema numbers (``PG_SCHEMA_VERSION``), separate from SQLite's
(ztnet.controller.sqlitedb): one schema, one list of migrations, each applied once in its
own transaction and recorded in ``schema_migrations``. ``migrate`` runs them under a
session-level ``pg_advisory_lock``, so replicas starting together migrate one after the
other: the first applies what is missing, the others then find nothing to do.

The tables mirror SQLite schema 4 (sqlitedb.py, flowstore.py) with two differences:

* counters (the bundle version, the flow row count) are rows of ``counters`` (BIGINT)
  rather than text in ``meta``. The version is bumped with ``UPDATE … RETURNING`` inside
  the transaction that records the change: the row lock serialises every change across
  replicas, so versions are unique, and they commit in the order they were allocated. A
  replica that reads version N therefore also sees every change up to N (a SEQUENCE would
  hand out N+1 while N may still be uncommitted: a replica could follow N+1 and never see
  N's revocation).
* ``flows`` is partitioned by receive day (``received_ns``, UTC days): retention drops
  whole partitions (ztnet.controller.pgflows). A unique index on a partitioned table must
  contain the partition key, so uuid uniqueness is enforced at insert under the host's
  ``flow_hosts`` row lock instead (a host's uuids come only from that host).
"""

from __future__ import annotations

import os
import socket
import time

import psycopg

# 1: SQLite schema 4's tables (policies, revocations, tokens, certificates, hosts with TPM
#    bindings, flows partitioned by receive day, per-host flow counts)
# 2: SQLite schemas 5 and 6: host and token labels, just-in-time grants, grant requests
# 3: SQLite schema 7: quarantines, alerts, baselines (ztnet.controller.pgdetect)
# 4: each replica's audit chain head (an anchor off the replica's host; PostgreSQL only)
PG_SCHEMA_VERSION = 4
# pg_advisory_lock key: "ztnet" in ASCII, a fixed number every replica agrees on
MIGRATION_LOCK = 0x7A746E6574
CHANNEL = "ztnet_changes"

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
        "INSERT INTO counters VALUES ('version', 0), ('flow_rows', 0)",
        """CREATE TABLE policies (version BIGINT PRIMARY KEY, text TEXT NOT NULL,
            applied_at DOUBLE PRECISION NOT NULL)""",
        # grant_id 0: every grant of the agent; 64-bit ids stored signed, as in SQLite
        """CREATE TABLE revocations (agent TEXT NOT NULL, grant_id BIGINT NOT NULL,
            version BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (agent, grant_id))""",
        """CREATE TABLE tokens (digest TEXT PRIMARY KEY, host TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
            used_at DOUBLE PRECISION, require_tpm BOOLEAN NOT NULL DEFAULT false)""",
        """CREATE TABLE certificates (serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL,
            issued_at DOUBLE PRECISION NOT NULL, not_after DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION)""",
        "CREATE INDEX certificates_by_id ON certificates (spiffe_id)",
        """CREATE TABLE hosts (name TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL,
            enrolled_at DOUBLE PRECISION NOT NULL, applied_version BIGINT NOT NULL DEFAULT 0,
            last_seen DOUBLE PRECISION NOT NULL DEFAULT 0,
            nack_version BIGINT NOT NULL DEFAULT 0, nack_reason TEXT NOT NULL DEFAULT '',
            attestation TEXT NOT NULL DEFAULT 'software', ek_hash TEXT NOT NULL DEFAULT '',
            enrollment_key BYTEA)""",
        "CREATE INDEX hosts_by_ek ON hosts (ek_hash)",
        "CREATE SEQUENCE flow_ids",
        """CREATE TABLE flows (id BIGINT NOT NULL DEFAULT nextval('flow_ids'),
            time_ns BIGINT NOT NULL, host TEXT NOT NULL, agent TEXT NOT NULL,
            verdict TEXT NOT NULL, drop_reason TEXT NOT NULL, event_type TEXT NOT NULL,
            proto INTEGER NOT NULL, destination TEXT NOT NULL,
            destination_port INTEGER NOT NULL, grant_id TEXT NOT NULL, uuid TEXT NOT NULL,
            record TEXT NOT NULL, received_ns BIGINT NOT NULL)
            PARTITION BY RANGE (received_ns)""",
        # the same indexes as SQLite's (each partition gets its own copy)
        "CREATE INDEX flows_by_time ON flows (time_ns, uuid)",
        "CREATE INDEX flows_by_received ON flows (received_ns, time_ns)",
        "CREATE INDEX flows_by_agent ON flows (agent, received_ns, time_ns)",
        "CREATE INDEX flows_by_host ON flows (host, received_ns, time_ns)",
        "CREATE INDEX flows_by_verdict ON flows (verdict, received_ns, time_ns)",
        """CREATE TABLE flow_hosts (host TEXT PRIMARY KEY, sequence BIGINT NOT NULL,
            rows BIGINT NOT NULL DEFAULT 0)""",
    ),
    2: (
        # `k=v,k=v`, sorted (ztnet.policy.selectors), as in SQLite
        "ALTER TABLE hosts ADD COLUMN labels TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE tokens ADD COLUMN labels TEXT NOT NULL DEFAULT ''",
        # ztnet.controller.jitstore; ids stored signed, as in SQLite
        """CREATE TABLE jit_grants (grant_id BIGINT PRIMARY KEY, agent TEXT NOT NULL,
            destination TEXT NOT NULL, proto TEXT NOT NULL, ports TEXT NOT NULL,
            not_before DOUBLE PRECISION NOT NULL, not_after DOUBLE PRECISION NOT NULL,
            hosts TEXT NOT NULL, reason TEXT NOT NULL, approver TEXT NOT NULL,
            requested_by TEXT NOT NULL, request_id TEXT NOT NULL DEFAULT '',
            created_at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX jit_grants_by_expiry ON jit_grants (not_after)",
        """CREATE TABLE grant_requests (id TEXT PRIMARY KEY, host TEXT NOT NULL,
            agent TEXT NOT NULL, destination TEXT NOT NULL, proto TEXT NOT NULL,
            ports TEXT NOT NULL, ttl DOUBLE PRECISION NOT NULL, reason TEXT NOT NULL,
            state TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
            decided_at DOUBLE PRECISION NOT NULL DEFAULT 0,
            decided_by TEXT NOT NULL DEFAULT '', grant_id BIGINT NOT NULL DEFAULT 0,
            note TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX grant_requests_by_state ON grant_requests (state, created_at)",
        "CREATE INDEX grant_requests_by_host ON grant_requests (host, created_at)",
    ),
    3: (
        # host '': every host
        """CREATE TABLE quarantines (agent TEXT NOT NULL, host TEXT NOT NULL,
            reason TEXT NOT NULL, "freeze" BOOLEAN NOT NULL, actor TEXT NOT NULL,
            alert_id BIGINT NOT NULL, version BIGINT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (agent, host))""",
        """CREATE TABLE alerts (id BIGSERIAL PRIMARY KEY, time DOUBLE PRECISION NOT NULL,
            agent TEXT NOT NULL, host TEXT NOT NULL, detector TEXT NOT NULL,
            summary TEXT NOT NULL, evidence TEXT NOT NULL, action TEXT NOT NULL,
            first_evidence_ns BIGINT NOT NULL)""",
        "CREATE INDEX alerts_by_agent ON alerts (agent, id)",
        """CREATE TABLE baselines (agent TEXT PRIMARY KEY, body TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL)""",
    ),
    4: (
        """CREATE TABLE audit_heads (replica TEXT PRIMARY KEY, seq BIGINT NOT NULL,
            hash TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL)""",
    ),
}


def migrate(conn: psycopg.Connection[tuple[object, ...]]) -> list[int]:
    """Apply the missing migrations, holding the migration lock; returns those this call
    applied (empty: another replica had, or nothing was missing). ``conn`` must be in
    autocommit mode; each migration is one transaction."""
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY "
                     "KEY, applied_at DOUBLE PRECISION NOT NULL, applied_by TEXT NOT NULL)")
        done = {int(row[0]) for row in  # type: ignore[call-overload]
                conn.execute("SELECT version FROM schema_migrations").fetchall()}
        newer = [v for v in done if v > PG_SCHEMA_VERSION]
        if newer:
            raise psycopg.DataError(f"the database has schema {max(newer)}; this ztnet reads "
                                    f"schema {PG_SCHEMA_VERSION}")
        applied = []
        for version in sorted(set(_MIGRATIONS) - done):
            with conn.transaction():
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement.encode())
                conn.execute("INSERT INTO schema_migrations VALUES (%s, %s, %s)",
                             (version, time.time(), f"{socket.gethostname()}:{os.getpid()}"))
            applied.append(version)
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def schema_version(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """The highest applied migration (0: none, or not a ztnet database)."""
    if conn.execute("SELECT to_regclass('schema_migrations')").fetchone() == (None,):
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0  # type: ignore[call-overload]

