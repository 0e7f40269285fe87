"""Just-in-time grants and grant requests in PostgreSQL: ``JitStore`` for ``PgStore``
(the semantics are ztnet.controller.jitstore's). Approving a request updates it
``WHERE state = 'pending'`` in the transaction that stores its grant and bumps the
version: under two replicas approving the same request at once, the row lock lets one
win; the other sees no pending row and stores nothing."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import psycopg

from ztnet.controller.int64 import signed64
from ztnet.controller.jitstore import (
    APPROVED,
    DENIED,
    LIST_LIMIT,
    PENDING,
    GrantRequest,
    JitGrant,
    jit_grant_row,
    jit_request_row,
    ports_text,
)

Conn = psycopg.Connection[tuple[Any, ...]]


class PgJitStore:
    def _tx(self, *, snapshot: bool = False) -> AbstractContextManager[Conn]:
        raise NotImplementedError

    def _bump(self, conn: Conn, at_least: int = 0) -> int:
        raise NotImplementedError

    def add_jit_grant(self, grant: JitGrant, *, approve: str = "", decided_by: str = ""
                      ) -> int | None:
        with self._tx() as conn:
            if approve:
                cursor = conn.execute(
                    "UPDATE grant_requests SET state = %s, decided_at = %s, decided_by = %s, "
                    "grant_id = %s WHERE id = %s AND state = %s",
                    (APPROVED, grant.created_at, decided_by, signed64(grant.grant_id), approve,
                     PENDING))
                if cursor.rowcount != 1:
                    return None
            version = self._bump(conn)
            conn.execute("INSERT INTO jit_grants VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, "
                         "%s, %s, %s, %s)", (
                             signed64(grant.grant_id), grant.agent, str(grant.network),
                             str(grant.proto), ports_text(grant.ports), grant.not_before,
                             grant.not_after, ",".join(grant.hosts), grant.reason,
                             grant.approver, grant.requested_by, grant.request_id,
                             grant.created_at))
        return version

    def jit_grants(self, active_at: float | None = None) -> tuple[JitGrant, ...]:
        with self._tx() as conn:
            if active_at is None:
                rows = conn.execute(f"SELECT * FROM jit_grants ORDER BY created_at DESC "
                                    f"LIMIT {LIST_LIMIT}".encode()).fetchall()
            else:
                rows = conn.execute("SELECT * FROM jit_grants WHERE not_after > %s "
                                    "ORDER BY not_after", (active_at,)).fetchall()
        return tuple(jit_grant_row(row) for row in rows)

    def add_request(self, request: GrantRequest) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO grant_requests VALUES (%s, %s, %s, %s, %s, %s, %s, %s, "
                         "%s, %s, %s, %s, %s, %s)", (
                             request.id, request.host, request.agent, str(request.network),
                             str(request.proto), ports_text(request.ports), request.ttl,
                             request.reason, request.state, request.created_at,
                             request.decided_at, request.decided_by,
                             signed64(request.grant_id), request.note))

    def grant_requests(self, *, state: str = "", host: str = "") -> tuple[GrantRequest, ...]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT * FROM grant_requests WHERE (%s = '' OR state = %s) AND "
                f"(%s = '' OR host = %s) ORDER BY created_at DESC LIMIT {LIST_LIMIT}".encode(),
                (state, state, host, host)).fetchall()
        return tuple(jit_request_row(row) for row in rows)

    def grant_request(self, request_id: str) -> GrantRequest | None:
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM grant_requests WHERE id = %s",
                               (request_id,)).fetchone()
        return None if row is None else jit_request_row(row)

    def deny_request(self, request_id: str, decided_by: str, now: float, note: str) -> bool:
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE grant_requests SET state = %s, decided_at = %s, decided_by = %s, "
                "note = %s WHERE id = %s AND state = %s",
                (DENIED, now, decided_by, note, request_id, PENDING))
            return cursor.rowcount == 1
