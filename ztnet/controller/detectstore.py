"""Detection and response state in the controller's database: quarantines, alerts and
per-agent baselines (docs/detection.md).

``DetectStore`` is the storage interface (part of ``ztnet.controller.store.Store``);
``SqliteDetectStore`` is its SQLite implementation, mixed into ``SqliteStore``. Schema 5
added the three tables; ``open`` upgrades an older database.

A quarantine is stored like a revocation: it bumps the version counter in the same
transaction (the bundles change), and it outlives policy applies and controller
restarts until an operator releases it.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

DETECT_SCHEMA = (
    # host '' : every host
    """CREATE TABLE quarantines (
        agent TEXT NOT NULL, host TEXT NOT NULL, reason TEXT NOT NULL,
        freeze INTEGER NOT NULL, actor TEXT NOT NULL, alert_id INTEGER NOT NULL,
        version INTEGER NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (agent, host))""",
    """CREATE TABLE alerts (
        id INTEGER PRIMARY KEY, time REAL NOT NULL, agent TEXT NOT NULL, host TEXT NOT NULL,
        detector TEXT NOT NULL, summary TEXT NOT NULL, evidence TEXT NOT NULL,
        action TEXT NOT NULL, first_evidence_ns INTEGER NOT NULL)""",
    "CREATE INDEX alerts_by_agent ON alerts (agent, id)",
    """CREATE TABLE baselines (
        agent TEXT PRIMARY KEY, body TEXT NOT NULL, updated_at REAL NOT NULL)""",
)
# Alerts kept: the newest this many (older ones are in the audit trail).
MAX_ALERTS = 100_000


@dataclass(frozen=True, slots=True)
class QuarantineRecord:
    """``host`` "" : the agent is quarantined on every host. ``actor``: the admin who
    quarantined it, or "auto" (then ``alert_id`` names the alert that triggered it)."""

    agent: str
    host: str
    reason: str
    freeze: bool
    actor: str
    alert_id: int
    version: int
    created_at: float

    def applies_to(self, host: str) -> bool:
        return not self.host or self.host == host


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """One detector firing. ``evidence``: uuids of the flow records that made it fire;
    ``action``: what was done ("alert", "quarantine", or why not: "quarantine
    (rate-limited)" …); ``first_evidence_ns``: the time of the earliest record."""

    id: int
    time: float
    agent: str
    host: str
    detector: str
    summary: str
    evidence: tuple[str, ...]
    action: str
    first_evidence_ns: int

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "time": self.time, "agent": self.agent, "host": self.host,
                "detector": self.detector, "summary": self.summary,
                "evidence": list(self.evidence), "action": self.action,
                "first_evidence_ns": self.first_evidence_ns}


class DetectStore(Protocol):
    def set_quarantine(self, record: QuarantineRecord) -> int:
        """Store (or replace) a quarantine; returns the new version (the record's own
        ``version`` is ignored)."""
        ...

    def release(self, agent: str) -> tuple[int, tuple[QuarantineRecord, ...]]:
        """Lift every quarantine of ``agent``; returns (new version, what was lifted).
        Nothing lifted: no version is spent (0)."""
        ...

    def quarantines(self) -> tuple[QuarantineRecord, ...]: ...

    def add_alert(self, alert: AlertRecord) -> int:
        """Store an alert (its ``id`` is ignored); returns its id."""
        ...

    def alerts(self, *, agent: str = "", after_id: int = 0,
               limit: int = 100) -> tuple[AlertRecord, ...]:
        """Alerts with an id above ``after_id``, oldest first."""
        ...

    def baseline(self, agent: str) -> dict[str, object] | None: ...

    def save_baseline(self, agent: str, body: dict[str, object], now: float) -> None: ...

    def reset_baseline(self, agent: str) -> bool: ...


class SqliteDetectStore:
    """``DetectStore`` on the store's connection (mixed into SqliteStore)."""

    _db: sqlite3.Connection

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # SqliteStore's

    def _bump(self, db: sqlite3.Connection, at_least: int = 0) -> int:
        raise NotImplementedError  # SqliteStore's

    def set_quarantine(self, record: QuarantineRecord) -> int:
        with self._tx() as db:
            version = self._bump(db)
            db.execute("INSERT OR REPLACE INTO quarantines VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (record.agent, record.host, record.reason, int(record.freeze),
                        record.actor, record.alert_id, version, record.created_at))
        return version

    def release(self, agent: str) -> tuple[int, tuple[QuarantineRecord, ...]]:
        with self._tx() as db:
            lifted = tuple(quarantine_row(row) for row in db.execute(
                "SELECT * FROM quarantines WHERE agent = ? ORDER BY host", (agent,)))
            if not lifted:
                return 0, ()
            version = self._bump(db)
            db.execute("DELETE FROM quarantines WHERE agent = ?", (agent,))
        return version, lifted

    def quarantines(self) -> tuple[QuarantineRecord, ...]:
        return tuple(quarantine_row(row) for row in self._db.execute(
            "SELECT * FROM quarantines ORDER BY agent, host"))

    def add_alert(self, alert: AlertRecord) -> int:
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO alerts (time, agent, host, detector, summary, evidence, action, "
                "first_evidence_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (alert.time, alert.agent, alert.host, alert.detector, alert.summary,
                 json.dumps(list(alert.evidence)), alert.action, alert.first_evidence_ns))
            alert_id = int(cursor.lastrowid or 0)
            if alert_id > MAX_ALERTS and alert_id % 1000 == 0:
                db.execute("DELETE FROM alerts WHERE id <= ?", (alert_id - MAX_ALERTS,))
        return alert_id

    def alerts(self, *, agent: str = "", after_id: int = 0,
               limit: int = 100) -> tuple[AlertRecord, ...]:
        where, args = "id > ?", list[object]([after_id])
        if agent:
            where += " AND agent = ?"
            args.append(agent)
        rows = self._db.execute(
            f"SELECT * FROM (SELECT * FROM alerts WHERE {where} ORDER BY id DESC LIMIT ?) "
            "ORDER BY id", (*args, limit))
        return tuple(alert_row(row) for row in rows)

    def baseline(self, agent: str) -> dict[str, object] | None:
        row = self._db.execute("SELECT body FROM baselines WHERE agent = ?",
                               (agent,)).fetchone()
        if row is None:
            return None
        body = json.loads(row[0])
        return body if isinstance(body, dict) else None

    def save_baseline(self, agent: str, body: dict[str, object], now: float) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO baselines VALUES (?, ?, ?)",
                       (agent, json.dumps(body, sort_keys=True), now))

    def reset_baseline(self, agent: str) -> bool:
        with self._tx() as db:
            cursor = db.execute("DELETE FROM baselines WHERE agent = ?", (agent,))
        return cursor.rowcount > 0


def quarantine_row(row: tuple[Any, ...]) -> QuarantineRecord:
    """A ``quarantines`` row (both backends)."""
    agent, host, reason, freeze, actor, alert_id, version, created = row
    return QuarantineRecord(str(agent), str(host), str(reason), bool(freeze), str(actor),
                            int(alert_id), int(version), float(created))


def alert_row(row: tuple[Any, ...]) -> AlertRecord:
    """An ``alerts`` row (both backends)."""
    alert_id, time, agent, host, detector, summary, evidence, action, first = row
    return AlertRecord(int(alert_id), float(time), str(agent), str(host), str(detector),
                       str(summary), tuple(json.loads(str(evidence))), str(action), int(first))
