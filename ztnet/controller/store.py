"""The controller's durable state behind a small interface.

``Store`` is what the rest of the controller uses; ``SqliteStore`` is the
embedded default (one file in the state directory, WAL mode, so `controller
token create` can write while `controller serve` reads). A server database
can replace it by implementing the same protocol.

The version counter: one monotonic number shared by every change that
produces new bundles: a policy apply, a revocation (or its lifting), and a
renewal. Hosts refuse a lower version (rollback) and an equal version with
other content, so every bundle the controller ever signs gets a version no
earlier bundle had; the counter is bumped in the same transaction that
records the change, and never reused, even across restarts.

Flow records (``FlowStore``, ztnet.controller.flowstore) live in the same
database; schema 2 added them, and ``open`` upgrades a schema-1 database.
"""

from __future__ import annotations

import enum
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ztnet.controller.detectstore import DetectStore, SqliteDetectStore
from ztnet.controller.flowstore import FlowStore, SqliteFlowStore
from ztnet.controller.int64 import signed64, unsigned64
from ztnet.controller.jitstore import JitStore, SqliteJitStore
from ztnet.controller.sqlitedb import (
    CHECKPOINT_INTERVAL,
    SCHEMA_VERSION,
    WAL_LIMIT,
    Checkpointer,
    connect,
    create_schema,
    upgrade,
)
from ztnet.errors import ConfigError
from ztnet.policy.selectors import decode_labels, encode_labels

__all__ = ["SCHEMA_VERSION", "FleetState", "HostBinding", "HostRecord", "PolicyRecord",
           "Revocation", "SqliteStore", "Store", "TokenStatus"]

@dataclass(frozen=True, slots=True)
class PolicyRecord:
    version: int
    text: str
    applied_at: float


@dataclass(frozen=True, slots=True)
class Revocation:
    """``grant_id`` None: every grant of ``agent``."""

    agent: str
    grant_id: int | None
    version: int
    created_at: float


@dataclass(frozen=True, slots=True)
class HostRecord:
    name: str
    spiffe_id: str
    enrolled_at: float
    applied_version: int
    last_seen: float
    nack_version: int
    nack_reason: str
    # "software" or "tpm" (schema 3); for "tpm", the EK hash ("sha256:…")
    attestation: str = "software"
    ek_hash: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)  # schema 5


@dataclass(frozen=True, slots=True)
class HostBinding:
    """How an enrolled host proves itself at renewal: a TPM-bound host signs with the
    enrollment key recorded here (``enrollment_key``: its TPMT_PUBLIC)."""

    attestation: str
    ek_hash: str
    enrollment_key: bytes


@dataclass(frozen=True, slots=True)
class FleetState:
    """What an epoch is built from, read in one snapshot: the counter, the newest policy
    and the revocations as of that counter (replicas follow it: ztnet.controller.replicas)."""

    version: int
    policy: PolicyRecord | None
    revocations: tuple[Revocation, ...]


class TokenStatus(enum.Enum):
    ACCEPTED = "accepted"
    UNKNOWN = "unknown"
    USED = "used"
    EXPIRED = "expired"
    WRONG_HOST = "wrong host"
    TPM_REQUIRED = "tpm required"


class Store(FlowStore, JitStore, DetectStore, Protocol):
    def trust_domain(self) -> str: ...

    def current_version(self) -> int: ...

    def next_version(self, at_least: int = 0) -> int:
        """A version no bundle had: above the counter and above ``at_least``."""
        ...

    def add_policy(self, text: str, now: float) -> PolicyRecord: ...

    def current_policy(self) -> PolicyRecord | None: ...

    def set_revocation(self, agent: str, grant_id: int | None, now: float,
                       revoked: bool) -> tuple[int, bool]:
        """Add (or lift) a revocation; returns (new version, whether anything changed)."""
        ...

    def revocations(self) -> tuple[Revocation, ...]: ...

    def fleet_state(self) -> FleetState: ...

    def add_token(self, digest: str, host: str, now: float, expires_at: float, *,
                  require_tpm: bool = False, labels: Mapping[str, str] | None = None) -> None:
        """``labels``: what the host it enrolls is labelled (already validated)."""
        ...

    def token_labels(self, digest: str) -> dict[str, str]:
        """The labels of the token with this digest ({} if none, or no such token)."""
        ...

    def consume_token(self, digest: str, host: str, now: float, *,
                      attested: bool = False) -> TokenStatus:
        """Atomically mark an unused, unexpired token for ``host`` used; a token made with
        ``require_tpm`` is left unused (TPM_REQUIRED) unless the enrollment is ``attested``."""
        ...

    def check_token(self, digest: str, host: str, now: float) -> TokenStatus:
        """What ``consume_token(attested=True)`` would say, without using the token."""
        ...

    def record_certificate(self, serial: int, spiffe_id: str, now: float, not_after: float, *,
                           replace_older: bool = False) -> None:
        """Remember an issued certificate; ``replace_older`` revokes every earlier
        certificate of the same identity (re-enrollment replaces a host's identity)."""
        ...

    def certificate_revoked(self, serial: int) -> bool: ...

    def revoke_certificates(self, spiffe_id: str, now: float) -> int: ...

    def enroll_host(self, name: str, spiffe_id: str, now: float, *,
                    binding: HostBinding | None = None,
                    labels: Mapping[str, str] | None = None) -> None:
        """Also forgets the host's flow batch sequence (a new spool starts at 1).
        ``binding`` None: a software enrollment. ``labels`` replace the host's."""
        ...

    def set_host_labels(self, name: str, labels: Mapping[str, str]) -> bool:
        """Replace an enrolled host's labels; False if there is no such host."""
        ...

    def host_labels(self) -> dict[str, dict[str, str]]:
        """Every enrolled host's labels."""
        ...

    def host_binding(self, name: str) -> HostBinding | None: ...

    def host_with_ek(self, ek_hash: str) -> str | None:
        """The enrolled, unrevoked host bound to this TPM, if any."""
        ...

    def unbind_host(self, name: str) -> None:
        """Forget the host's TPM binding (revocation: it must attest again)."""
        ...

    def record_seen(self, host: str, now: float, applied_version: int | None = None) -> None: ...

    def record_answer(self, host: str, version: int, now: float, nack_reason: str | None) -> None:
        """An ACK (``nack_reason`` None: ``version`` is applied) or a NACK."""
        ...

    def hosts(self) -> tuple[HostRecord, ...]: ...

    def close(self) -> None: ...


class SqliteStore(SqliteFlowStore, SqliteJitStore, SqliteDetectStore):
    """``Store`` on one SQLite file. Not thread-safe: one owner (the server's
    event loop, or one CLI command) per instance, except ``query_flows``
    (its own read-only connection); other processes may open the same file
    concurrently (WAL, busy timeout)."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self._path = path
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        # taken by every write transaction: the checkpointer holds one back with it
        self._write_lock = threading.Lock()

    @classmethod
    def create(cls, path: Path, trust_domain: str) -> SqliteStore:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except OSError as exc:
            raise ConfigError(f"controller: cannot create {path}: {exc.strerror}") from None
        store = cls(connect(path), path)
        # a half-made database never matters: init builds the state directory
        # aside and renames it at the end
        create_schema(store._db)
        with store._tx() as db:
            db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("schema", str(SCHEMA_VERSION)), ("trust_domain", trust_domain),
                ("version", "0")])
        return store

    @classmethod
    def open(cls, path: Path) -> SqliteStore:
        if not path.is_file():
            raise ConfigError(f"controller: {path} is missing (run `ztnet controller init`)")
        store = cls(connect(path), path)
        try:
            schema = store._meta("schema")
            if schema != str(SCHEMA_VERSION):
                with store._tx() as db:
                    schema = upgrade(db)
        except (sqlite3.DatabaseError, ConfigError) as exc:
            store.close()
            raise ConfigError(f"controller: {path} is not a ztnet database: {exc}") from None
        if schema != str(SCHEMA_VERSION):
            store.close()
            raise ConfigError(f"controller: {path} has schema {schema}; this ztnet reads "
                              f"schema {SCHEMA_VERSION}")
        return store

    def checkpoint_in_background(self, interval: float = CHECKPOINT_INTERVAL, *,
                                 wal_limit: int = WAL_LIMIT) -> Checkpointer:
        """WAL checkpoints off this connection (`serve`); stop() it before close()."""
        checkpointer = Checkpointer(self._path, self._write_lock, interval, wal_limit=wal_limit)
        checkpointer.start(self._db)
        return checkpointer

    def close(self) -> None:
        self.close_reader()
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock at once: a read-then-write (token use,
        # version bump) cannot interleave with another writer.
        with self._write_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _meta(self, key: str) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise ConfigError(f"controller: the database has no {key!r}")
        return str(row[0])

    def _bump(self, db: sqlite3.Connection, at_least: int = 0) -> int:
        current = int(db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0])
        version = max(current, at_least) + 1
        db.execute("UPDATE meta SET value = ? WHERE key = 'version'", (str(version),))
        return version

    # --- versions and policies ------------------------------------------------------

    def trust_domain(self) -> str:
        return self._meta("trust_domain")

    def current_version(self) -> int:
        return int(self._meta("version"))

    def next_version(self, at_least: int = 0) -> int:
        with self._tx() as db:
            return self._bump(db, at_least)

    def add_policy(self, text: str, now: float) -> PolicyRecord:
        with self._tx() as db:
            version = self._bump(db)
            db.execute("INSERT INTO policies VALUES (?, ?, ?)", (version, text, now))
        return PolicyRecord(version, text, now)

    def current_policy(self) -> PolicyRecord | None:
        row = self._db.execute(
            "SELECT version, text, applied_at FROM policies ORDER BY version DESC LIMIT 1"
        ).fetchone()
        return PolicyRecord(int(row[0]), str(row[1]), float(row[2])) if row else None

    def set_revocation(self, agent: str, grant_id: int | None, now: float,
                       revoked: bool) -> tuple[int, bool]:
        # SQLite integers are signed 64-bit; grant ids use all 64 bits.
        key = signed64(grant_id or 0)
        with self._tx() as db:
            version = self._bump(db)
            if revoked:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO revocations VALUES (?, ?, ?, ?)",
                    (agent, key, version, now))
            else:
                cursor = db.execute(
                    "DELETE FROM revocations WHERE agent = ? AND grant_id = ?", (agent, key))
        return version, cursor.rowcount > 0

    def revocations(self) -> tuple[Revocation, ...]:
        rows = self._db.execute(
            "SELECT agent, grant_id, version, created_at FROM revocations "
            "ORDER BY agent, grant_id").fetchall()
        return tuple(Revocation(str(agent), unsigned64(grant) or None, int(version),
                                float(created)) for agent, grant, version, created in rows)

    def fleet_state(self) -> FleetState:
        self._db.execute("BEGIN")  # one read snapshot
        try:
            return FleetState(self.current_version(), self.current_policy(),
                              self.revocations())
        finally:
            self._db.execute("COMMIT")

    # --- enrollment tokens -----------------------------------------------------------

    def add_token(self, digest: str, host: str, now: float, expires_at: float, *,
                  require_tpm: bool = False, labels: Mapping[str, str] | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO tokens (digest, host, created_at, expires_at, used_at, "
                       "require_tpm, labels) VALUES (?, ?, ?, ?, NULL, ?, ?)",
                       (digest, host, now, expires_at, int(require_tpm),
                        encode_labels(labels or {})))

    def token_labels(self, digest: str) -> dict[str, str]:
        row = self._db.execute("SELECT labels FROM tokens WHERE digest = ?",
                               (digest,)).fetchone()
        return decode_labels(str(row[0])) if row else {}

    def consume_token(self, digest: str, host: str, now: float, *,
                      attested: bool = False) -> TokenStatus:
        with self._tx() as db:
            outcome = _token_status(db, digest, host, now, attested)
            if outcome is TokenStatus.ACCEPTED:
                db.execute("UPDATE tokens SET used_at = ? WHERE digest = ?", (now, digest))
        return outcome

    def check_token(self, digest: str, host: str, now: float) -> TokenStatus:
        return _token_status(self._db, digest, host, now, True)

    # --- certificates and hosts ------------------------------------------------------

    def record_certificate(self, serial: int, spiffe_id: str, now: float, not_after: float, *,
                           replace_older: bool = False) -> None:
        with self._tx() as db:
            if replace_older:
                db.execute("UPDATE certificates SET revoked_at = ? "
                           "WHERE spiffe_id = ? AND revoked_at IS NULL", (now, spiffe_id))
            db.execute("INSERT INTO certificates VALUES (?, ?, ?, ?, NULL)",
                       (serial_key(serial), spiffe_id, now, not_after))

    def certificate_revoked(self, serial: int) -> bool:
        row = self._db.execute("SELECT revoked_at FROM certificates WHERE serial = ?",
                               (serial_key(serial),)).fetchone()
        return row is not None and row[0] is not None

    def revoke_certificates(self, spiffe_id: str, now: float) -> int:
        with self._tx() as db:
            cursor = db.execute("UPDATE certificates SET revoked_at = ? "
                                "WHERE spiffe_id = ? AND revoked_at IS NULL", (now, spiffe_id))
        return cursor.rowcount

    def enroll_host(self, name: str, spiffe_id: str, now: float, *,
                    binding: HostBinding | None = None,
                    labels: Mapping[str, str] | None = None) -> None:
        bound = binding or HostBinding("software", "", b"")
        with self._tx() as db:
            db.execute("INSERT INTO hosts (name, spiffe_id, enrolled_at, attestation, ek_hash, "
                       "enrollment_key, labels) VALUES (?, ?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET spiffe_id = excluded.spiffe_id, "
                       "enrolled_at = excluded.enrolled_at, applied_version = 0, "
                       "attestation = excluded.attestation, ek_hash = excluded.ek_hash, "
                       "enrollment_key = excluded.enrollment_key, labels = excluded.labels",
                       (name, spiffe_id, now, bound.attestation, bound.ek_hash,
                        bound.enrollment_key or None, encode_labels(labels or {})))
            self.reset_flow_sequence(db, name)

    def set_host_labels(self, name: str, labels: Mapping[str, str]) -> bool:
        with self._tx() as db:
            cursor = db.execute("UPDATE hosts SET labels = ? WHERE name = ?",
                                (encode_labels(labels), name))
        return cursor.rowcount > 0

    def host_labels(self) -> dict[str, dict[str, str]]:
        rows = self._db.execute("SELECT name, labels FROM hosts").fetchall()
        return {str(name): decode_labels(str(text)) for name, text in rows}

    def host_binding(self, name: str) -> HostBinding | None:
        row = self._db.execute("SELECT attestation, ek_hash, enrollment_key FROM hosts "
                               "WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        return HostBinding(str(row[0]), str(row[1]), bytes(row[2] or b""))

    def host_with_ek(self, ek_hash: str) -> str | None:
        row = self._db.execute("SELECT name FROM hosts WHERE ek_hash = ? AND attestation = "
                               "'tpm' ORDER BY name LIMIT 1", (ek_hash,)).fetchone()
        return None if row is None else str(row[0])

    def unbind_host(self, name: str) -> None:
        with self._tx() as db:
            # "revoked": a later renewal must not fall back to the software path
            db.execute("UPDATE hosts SET attestation = 'revoked', ek_hash = '', "
                       "enrollment_key = NULL WHERE name = ? AND attestation = 'tpm'", (name,))

    def record_seen(self, host: str, now: float, applied_version: int | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE hosts SET last_seen = ? WHERE name = ?", (now, host))
            if applied_version is not None:
                db.execute("UPDATE hosts SET applied_version = ? WHERE name = ?",
                           (applied_version, host))

    def record_answer(self, host: str, version: int, now: float, nack_reason: str | None) -> None:
        with self._tx() as db:
            if nack_reason is None:
                db.execute("UPDATE hosts SET last_seen = ?, applied_version = "
                           "max(applied_version, ?) WHERE name = ?", (now, version, host))
            else:
                db.execute("UPDATE hosts SET last_seen = ?, nack_version = ?, nack_reason = ? "
                           "WHERE name = ?", (now, version, nack_reason, host))

    def hosts(self) -> tuple[HostRecord, ...]:
        rows = self._db.execute(
            "SELECT name, spiffe_id, enrolled_at, applied_version, last_seen, nack_version, "
            "nack_reason, attestation, ek_hash, labels FROM hosts ORDER BY name").fetchall()
        return tuple(HostRecord(str(r[0]), str(r[1]), float(r[2]), int(r[3]), float(r[4]),
                                int(r[5]), str(r[6]), str(r[7]), str(r[8]),
                                decode_labels(str(r[9]))) for r in rows)


def _token_status(db: sqlite3.Connection, digest: str, host: str, now: float,
                  attested: bool) -> TokenStatus:
    row = db.execute("SELECT host, expires_at, used_at, require_tpm FROM tokens "
                     "WHERE digest = ?", (digest,)).fetchone()
    return token_outcome(row, host, now, attested)


def token_outcome(row: tuple[object, ...] | None, host: str, now: float,
                  attested: bool) -> TokenStatus:
    """What a token row (host, expires_at, used_at, require_tpm) says to ``host`` at
    ``now`` (shared by both backends)."""
    if row is None:
        return TokenStatus.UNKNOWN
    token_host, expires_at, used_at, require_tpm = row
    if used_at is not None:
        return TokenStatus.USED
    if now >= float(expires_at):  # type: ignore[arg-type]
        return TokenStatus.EXPIRED
    if token_host != host:
        return TokenStatus.WRONG_HOST
    if require_tpm and not attested:
        return TokenStatus.TPM_REQUIRED
    return TokenStatus.ACCEPTED


def serial_key(serial: int) -> str:
    """How a certificate serial (up to 160 bits) is stored: lower-case hex."""
    return format(serial, "x")


