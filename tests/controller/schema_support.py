"""Older database schemas, rebuilt from a current one, for the upgrade tests."""

from __future__ import annotations

import sqlite3


def drop_jit_schema(db: sqlite3.Connection) -> None:
    """Undo schema 6 (just-in-time grants: ztnet.controller.jitstore.JIT_SCHEMA) and the
    schemas after it."""
    drop_detect_schema(db)
    db.execute("DROP TABLE jit_grants")
    db.execute("DROP TABLE grant_requests")


def drop_label_schema(db: sqlite3.Connection) -> None:
    """Undo schema 5 (host labels: ztnet.controller.sqlitedb.LABEL_SCHEMA) and the
    schemas after it."""
    drop_jit_schema(db)
    db.execute("ALTER TABLE hosts DROP COLUMN labels")
    db.execute("ALTER TABLE tokens DROP COLUMN labels")


def drop_tpm_schema(db: sqlite3.Connection) -> None:
    """Undo schema 4 (TPM attestation: ztnet.controller.sqlitedb.TPM_SCHEMA) and the
    schemas after it."""
    drop_label_schema(db)
    db.execute("DROP INDEX hosts_by_ek")
    for column in ("attestation", "ek_hash", "enrollment_key"):
        db.execute(f"ALTER TABLE hosts DROP COLUMN {column}")
    db.execute("ALTER TABLE tokens DROP COLUMN require_tpm")


def drop_detect_schema(db: sqlite3.Connection) -> None:
    """Undo schema 7 (quarantines, alerts, baselines: ztnet.controller.detectstore)."""
    for table in ("quarantines", "alerts", "baselines"):
        db.execute(f"DROP TABLE {table}")
