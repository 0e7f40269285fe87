"""Quarantines, alerts and baselines in PostgreSQL: ``DetectStore`` for ``PgStore`` (the
semantics are ztnet.controller.detectstore's). A quarantine and a release bump the
version in their own transaction, so every replica follows them like a revocation."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from typing import Any

import psycopg

from ztnet.controller.detectstore import (
    MAX_ALERTS,
    AlertRecord,
    QuarantineRecord,
    alert_row,
    quarantine_row,
)

Conn = psycopg.Connection[tuple[Any, ...]]


class PgDetectStore:
    def _tx(self, *, snapshot: bool = False) -> AbstractContextManager[Conn]:
        raise NotImplementedError

    def _bump(self, conn: Conn, at_least: int = 0) -> int:
        raise NotImplementedError

    def set_quarantine(self, record: QuarantineRecord) -> int:
        with self._tx() as conn:
            version = self._bump(conn)
            conn.execute("INSERT INTO quarantines VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                         "ON CONFLICT (agent, host) DO UPDATE SET reason = excluded.reason, "
                         "\"freeze\" = excluded.\"freeze\", actor = excluded.actor, "
                         "alert_id = excluded.alert_id, version = excluded.version, "
                         "created_at = excluded.created_at",
                         (record.agent, record.host, record.reason, record.freeze,
                          record.actor, record.alert_id, version, record.created_at))
        return version

    def release(self, agent: str) -> tuple[int, tuple[QuarantineRecord, ...]]:
        with self._tx() as conn:
            lifted = tuple(quarantine_row(row) for row in conn.execute(
                "SELECT * FROM quarantines WHERE agent = %s ORDER BY host COLLATE \"C\" "
                "FOR UPDATE", (agent,)).fetchall())
            if not lifted:
                return 0, ()
            version = self._bump(conn)
            conn.execute("DELETE FROM quarantines WHERE agent = %s", (agent,))
        return version, lifted

    def quarantines(self) -> tuple[QuarantineRecord, ...]:
        with self._tx() as conn:
            rows = conn.execute("SELECT * FROM quarantines ORDER BY agent COLLATE \"C\", "
                                "host COLLATE \"C\"").fetchall()
        return tuple(quarantine_row(row) for row in rows)

    def add_alert(self, alert: AlertRecord) -> int:
        with self._tx() as conn:
            row = conn.execute(
                "INSERT INTO alerts (time, agent, host, detector, summary, evidence, action, "
                "first_evidence_ns) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (alert.time, alert.agent, alert.host, alert.detector, alert.summary,
                 json.dumps(list(alert.evidence)), alert.action,
                 alert.first_evidence_ns)).fetchone()
            alert_id = int(row[0]) if row else 0
            if alert_id > MAX_ALERTS and alert_id % 1000 == 0:
                conn.execute("DELETE FROM alerts WHERE id <= %s", (alert_id - MAX_ALERTS,))
        return alert_id

    def alerts(self, *, agent: str = "", after_id: int = 0,
               limit: int = 100) -> tuple[AlertRecord, ...]:
        where, args = "id > %s", list[object]([after_id])
        if agent:
            where += " AND agent = %s"
            args.append(agent)
        with self._tx() as conn:
            rows = conn.execute(
                f"SELECT * FROM (SELECT * FROM alerts WHERE {where} ORDER BY id DESC "
                "LIMIT %s) AS newest ORDER BY id".encode(), (*args, limit)).fetchall()
        return tuple(alert_row(row) for row in rows)

    def baseline(self, agent: str) -> dict[str, object] | None:
        with self._tx() as conn:
            row = conn.execute("SELECT body FROM baselines WHERE agent = %s",
                               (agent,)).fetchone()
        if row is None:
            return None
        body = json.loads(row[0])
        return body if isinstance(body, dict) else None

    def save_baseline(self, agent: str, body: dict[str, object], now: float) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO baselines VALUES (%s, %s, %s) ON CONFLICT (agent) DO "
                         "UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
                         (agent, json.dumps(body, sort_keys=True), now))

    def reset_baseline(self, agent: str) -> bool:
        with self._tx() as conn:
            return conn.execute("DELETE FROM baselines WHERE agent = %s",
                                (agent,)).rowcount > 0
