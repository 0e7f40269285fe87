"""Just-in-time grants and grant requests in the controller's database (schema 6).

``JitStore`` is the storage interface (part of ``ztnet.controller.store.Store``);
``SqliteJitStore`` its SQLite implementation, mixed into ``SqliteStore``. Issuing a grant
bumps the version counter in the same transaction (a new grant is a new epoch), and
approving a request issues its grant in that same transaction, so a request is never
approved without its grant nor granted twice.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from ztnet.controller.int64 import signed64, unsigned64
from ztnet.grants.model import Grant, IPNetwork, PortRange, Proto
from ztnet.policy.fields import parse_destination, parse_ports

JIT_SCHEMA = (
    "CREATE TABLE jit_grants (grant_id INTEGER PRIMARY KEY, agent TEXT NOT NULL, "
    "destination TEXT NOT NULL, proto TEXT NOT NULL, ports TEXT NOT NULL, "
    "not_before REAL NOT NULL, not_after REAL NOT NULL, "
    "hosts TEXT NOT NULL,  -- comma-separated names; '': wherever the agent's selector matches\n"
    "reason TEXT NOT NULL, approver TEXT NOT NULL, requested_by TEXT NOT NULL, "
    "request_id TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL)",
    "CREATE INDEX jit_grants_by_expiry ON jit_grants (not_after)",
    "CREATE TABLE grant_requests (id TEXT PRIMARY KEY, host TEXT NOT NULL, "
    "agent TEXT NOT NULL, destination TEXT NOT NULL, proto TEXT NOT NULL, "
    "ports TEXT NOT NULL, ttl REAL NOT NULL, reason TEXT NOT NULL, "
    "state TEXT NOT NULL,  -- pending, approved, denied\n"
    "created_at REAL NOT NULL, decided_at REAL NOT NULL DEFAULT 0, "
    "decided_by TEXT NOT NULL DEFAULT '', grant_id INTEGER NOT NULL DEFAULT 0, "
    "note TEXT NOT NULL DEFAULT '')",
    "CREATE INDEX grant_requests_by_state ON grant_requests (state, created_at)",
    "CREATE INDEX grant_requests_by_host ON grant_requests (host, created_at)",
)

PENDING, APPROVED, DENIED = "pending", "approved", "denied"
LIST_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class JitGrant:
    """A signed-when-issued grant outside the policy file. ``hosts`` empty: every host
    the agent's host selector matches. ``approver``: the admin, or ``auto`` (an
    ``[[jit.auto_approve]]`` rule); ``requested_by``: ``admin:NAME`` or ``host:NAME``."""

    grant_id: int
    agent: str
    network: IPNetwork
    proto: Proto
    ports: PortRange | None
    not_before: float
    not_after: float
    hosts: tuple[str, ...]
    reason: str
    approver: str
    requested_by: str
    request_id: str = ""
    created_at: float = 0.0

    def grant(self) -> Grant:
        return Grant(grant_id=self.grant_id, agent=self.agent, proto=self.proto,
                     network=self.network, ports=self.ports, not_before=self.not_before,
                     not_after=self.not_after)

    def for_host(self, host: str) -> bool:
        return not self.hosts or host in self.hosts


@dataclass(frozen=True, slots=True)
class GrantRequest:
    """What a host asked for on behalf of one of its agents. ``reason`` is the agent's
    text, bounded and escaped when stored (it is untrusted)."""

    id: str
    host: str
    agent: str
    network: IPNetwork
    proto: Proto
    ports: PortRange | None
    ttl: float
    reason: str
    state: str
    created_at: float
    decided_at: float = 0.0
    decided_by: str = ""
    grant_id: int = 0
    note: str = ""


class JitStore(Protocol):
    def add_jit_grant(self, grant: JitGrant, *, approve: str = "", decided_by: str = ""
                      ) -> int | None:
        """Store ``grant`` and bump the version (returned). ``approve``: the id of the
        pending request this grant approves, in the same transaction; None if that request
        is no longer pending (nothing is stored)."""
        ...

    def jit_grants(self, active_at: float | None = None) -> tuple[JitGrant, ...]:
        """Grants live at ``active_at`` (None: the newest LIST_LIMIT, live or not)."""
        ...

    def add_request(self, request: GrantRequest) -> None: ...

    def grant_requests(self, *, state: str = "", host: str = "") -> tuple[GrantRequest, ...]:
        """Newest first, at most LIST_LIMIT; empty filters match everything."""
        ...

    def grant_request(self, request_id: str) -> GrantRequest | None: ...

    def deny_request(self, request_id: str, decided_by: str, now: float, note: str) -> bool:
        """Deny a pending request; False if it is not pending (or unknown)."""
        ...


class SqliteJitStore:
    _db: sqlite3.Connection

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _bump(self, db: sqlite3.Connection, at_least: int = 0) -> int:
        raise NotImplementedError

    def add_jit_grant(self, grant: JitGrant, *, approve: str = "", decided_by: str = ""
                      ) -> int | None:
        with self._tx() as db:
            if approve:
                cursor = db.execute(
                    "UPDATE grant_requests SET state = ?, decided_at = ?, decided_by = ?, "
                    "grant_id = ? WHERE id = ? AND state = ?",
                    (APPROVED, grant.created_at, decided_by, signed64(grant.grant_id), approve,
                     PENDING))
                if cursor.rowcount != 1:
                    return None
            version = self._bump(db)
            db.execute("INSERT INTO jit_grants VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (
                signed64(grant.grant_id), grant.agent, str(grant.network), str(grant.proto),
                ports_text(grant.ports), grant.not_before, grant.not_after, ",".join(grant.hosts),
                grant.reason, grant.approver, grant.requested_by, grant.request_id,
                grant.created_at))
        return version

    def jit_grants(self, active_at: float | None = None) -> tuple[JitGrant, ...]:
        if active_at is None:
            rows = self._db.execute(f"SELECT * FROM jit_grants ORDER BY created_at DESC "
                                    f"LIMIT {LIST_LIMIT}").fetchall()
        else:
            rows = self._db.execute("SELECT * FROM jit_grants WHERE not_after > ? "
                                    "ORDER BY not_after", (active_at,)).fetchall()
        return tuple(jit_grant_row(row) for row in rows)

    def add_request(self, request: GrantRequest) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO grant_requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                       "?, ?)", (
                           request.id, request.host, request.agent, str(request.network),
                           str(request.proto), ports_text(request.ports), request.ttl,
                           request.reason, request.state, request.created_at,
                           request.decided_at, request.decided_by,
                           signed64(request.grant_id), request.note))

    def grant_requests(self, *, state: str = "", host: str = "") -> tuple[GrantRequest, ...]:
        rows = self._db.execute(
            "SELECT * FROM grant_requests WHERE (? = '' OR state = ?) AND (? = '' OR host = ?) "
            f"ORDER BY created_at DESC LIMIT {LIST_LIMIT}", (state, state, host, host)
        ).fetchall()
        return tuple(jit_request_row(row) for row in rows)

    def grant_request(self, request_id: str) -> GrantRequest | None:
        row = self._db.execute("SELECT * FROM grant_requests WHERE id = ?",
                               (request_id,)).fetchone()
        return None if row is None else jit_request_row(row)

    def deny_request(self, request_id: str, decided_by: str, now: float, note: str) -> bool:
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE grant_requests SET state = ?, decided_at = ?, decided_by = ?, note = ? "
                "WHERE id = ? AND state = ?", (DENIED, now, decided_by, note, request_id,
                                              PENDING))
        return cursor.rowcount == 1


def ports_text(ports: PortRange | None) -> str:
    """How a port range is stored (both backends)."""
    return "any" if ports is None else str(ports)


def jit_grant_row(row: tuple[object, ...]) -> JitGrant:
    """A ``jit_grants`` row (both backends)."""
    (grant_id, agent, destination, proto, ports, not_before, not_after, hosts, reason,
     approver, requested_by, request_id, created_at) = row
    return JitGrant(unsigned64(int(str(grant_id))), str(agent),
                    parse_destination(str(destination)), Proto.parse(str(proto)),
                    parse_ports(str(ports)), float(str(not_before)), float(str(not_after)),
                    tuple(h for h in str(hosts).split(",") if h), str(reason), str(approver),
                    str(requested_by), str(request_id), float(str(created_at)))


def jit_request_row(row: tuple[object, ...]) -> GrantRequest:
    """A ``grant_requests`` row (both backends)."""
    (request_id, host, agent, destination, proto, ports, ttl, reason, state, created_at,
     decided_at, decided_by, grant_id, note) = row
    return GrantRequest(str(request_id), str(host), str(agent),
                        parse_destination(str(destination)), Proto.parse(str(proto)),
                        parse_ports(str(ports)), float(str(ttl)), str(reason), str(state),
                        float(str(created_at)), float(str(decided_at)), str(decided_by),
                        unsigned64(int(str(grant_id))), str(note))
