"""The SQLite plumbing under ``SqliteStore``: the schema and its upgrades,
how a connection is opened, and WAL checkpoints in a thread of their own.

Checkpoints: by default SQLite checkpoints inside whichever commit takes the
write-ahead log past 1000 pages. With flow batches arriving, that is a commit
on the server's event loop, which then copies megabytes into the database and
fsyncs it while grant pushes wait. ``Checkpointer`` (used by `controller
serve`) turns that off for the serving connection and checkpoints twice a
second on a connection of its own, where sqlite3 releases the GIL while it
works. Measured over a million flow inserts (batches of 500): 43,000 against
17,000 records a second, and the slowest batch 0.1 s against 0.6 s.

PASSIVE checkpoints alone never take the write lock nor wait for readers, but
then the log is never started over while batches keep arriving: SQLite
rewinds it only when a writer begins with every frame already copied, and
with a batch committed every few milliseconds that moment never comes (the
log grew by 40 MB a second, 786 MB in a 20-second run, each frame written to
newly allocated blocks the kernel zeroes first). So each round copies what it
can without blocking (PASSIVE, repeated while that catches up), and once what
is left is small, a RESTART takes the write lock for that remainder (waiting
at most ``RESTART_WAIT`` for the serving connection's transaction or a
reader; if it cannot, the next round tries again) so that the next commit
writes the log from its start, and truncates it to ``WAL_LIMIT`` if it was
longer. The log then stays near one round of writes. Other processes
(`controller token create` …) keep the default.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from ztnet import logs
from ztnet.controller.detectstore import DETECT_SCHEMA
from ztnet.controller.flowstore import FLOW_SCHEMA, FLOW_UPGRADE_3
from ztnet.controller.jitstore import JIT_SCHEMA
from ztnet.errors import ConfigError

SCHEMA_VERSION = 7  # 2: flow records; 3: receive times, per-host row counts; 4: TPM;
# 5: host labels; 6: just-in-time grants and grant requests (ztnet.controller.jitstore);
# 7: quarantines, alerts, baselines (ztnet.controller.detectstore)
CHECKPOINT_INTERVAL = 0.5
# A RESTART holds the write lock while it copies what PASSIVE rounds left: it is
# tried only once that is at most this many frames (4 MiB of 4 KiB pages) …
RESTART_BELOW_FRAMES = 1024
# … and waits at most this long for the writer's transaction and for readers (an
# event loop blocked on BEGIN IMMEDIATE waits as long).
RESTART_WAIT_MS = 20
WAL_LIMIT = 64 << 20  # bytes of log kept on disk after it starts over
_CATCH_UP_ROUNDS = 4

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE policies (
    version INTEGER PRIMARY KEY, text TEXT NOT NULL, applied_at REAL NOT NULL);
CREATE TABLE revocations (
    agent TEXT NOT NULL, grant_id INTEGER NOT NULL,  -- 0: every grant of the agent
    version INTEGER NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (agent, grant_id));
CREATE TABLE tokens (
    digest TEXT PRIMARY KEY, host TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, used_at REAL);
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, issued_at REAL NOT NULL,
    not_after REAL NOT NULL, revoked_at REAL);
CREATE INDEX certificates_by_id ON certificates (spiffe_id);
CREATE TABLE hosts (
    name TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, enrolled_at REAL NOT NULL,
    applied_version INTEGER NOT NULL DEFAULT 0, last_seen REAL NOT NULL DEFAULT 0,
    nack_version INTEGER NOT NULL DEFAULT 0, nack_reason TEXT NOT NULL DEFAULT '');
"""

# Schema 4: how each host proved its identity ("software" or "tpm"), its TPM's EK hash
# and enrollment key (TPMT_PUBLIC, checked at each renewal), and tokens that refuse
# software enrollment.
TPM_SCHEMA = (
    "ALTER TABLE hosts ADD COLUMN attestation TEXT NOT NULL DEFAULT 'software'",
    "ALTER TABLE hosts ADD COLUMN ek_hash TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE hosts ADD COLUMN enrollment_key BLOB",
    "CREATE INDEX hosts_by_ek ON hosts (ek_hash)",
    "ALTER TABLE tokens ADD COLUMN require_tpm INTEGER NOT NULL DEFAULT 0",
)

# Schema 5: host labels (`k=v,k=v`, sorted; ztnet.policy.selectors), and the labels a
# token gives the host it enrolls.
LABEL_SCHEMA = (
    "ALTER TABLE hosts ADD COLUMN labels TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE tokens ADD COLUMN labels TEXT NOT NULL DEFAULT ''",
)

# schema N -> (the schema it becomes, the statements that make it so)
_UPGRADES: dict[int, tuple[int, tuple[str, ...]]] = {
    1: (3, FLOW_SCHEMA), 2: (3, FLOW_UPGRADE_3), 3: (4, TPM_SCHEMA), 4: (5, LABEL_SCHEMA),
    5: (6, JIT_SCHEMA), 6: (7, DETECT_SCHEMA)}


def create_schema(db: sqlite3.Connection) -> None:
    """Every table of the current schema (the caller adds the meta rows)."""
    db.executescript(_SCHEMA)  # commits on its own
    for statement in (*FLOW_SCHEMA, *TPM_SCHEMA, *LABEL_SCHEMA, *JIT_SCHEMA, *DETECT_SCHEMA):
        db.execute(statement)


def upgrade(db: sqlite3.Connection) -> str:
    """Bring an older schema up to date, inside the caller's write transaction
    (read again under its lock: another process may have upgraded it); returns
    the schema now. A newer schema than this ztnet knows is left alone."""
    schema = str(db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0])
    while schema.isdigit() and int(schema) in _UPGRADES:
        target, statements = _UPGRADES[int(schema)]
        for statement in statements:
            db.execute(statement)
        schema = str(target)
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (schema,))
    return schema


def connect(path: Path) -> sqlite3.Connection:
    try:
        # isolation_level None: no implicit transactions; _tx() says where they are.
        db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        db.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints; safe with WAL
        # up to 64 MiB of page cache (the default is 2 MiB): flow inserts write at
        # the end of each agent's and host's range in the indexes, and queries
        # reread the newest pages
        db.execute("PRAGMA cache_size = -65536")
    except sqlite3.Error as exc:
        raise ConfigError(f"controller: cannot open {path}: {exc}") from None
    if str(mode).lower() != "wal":
        raise ConfigError(f"controller: {path}: cannot switch to WAL mode (got {mode})")
    return db


class Checkpointer:
    def __init__(self, path: Path, interval: float = CHECKPOINT_INTERVAL, *,
                 wal_limit: int = WAL_LIMIT) -> None:
        self.path = path
        self.interval = interval
        self.wal_limit = wal_limit
        self.restarts = 0  # rounds that rewound the log (for tests and benchmarks)
        self._frames_seen = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._serving: sqlite3.Connection | None = None

    def start(self, serving: sqlite3.Connection) -> None:
        """Take checkpointing away from ``serving`` (the event loop's connection)."""
        self._serving = serving
        serving.execute("PRAGMA wal_autocheckpoint = 0")
        # applied by the serving connection's first commit after a RESTART
        serving.execute(f"PRAGMA journal_size_limit = {int(self.wal_limit)}")
        self._thread = threading.Thread(target=self._run, name="ztnet-wal-checkpoint",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._serving is not None:
            # back to the default, so closing the connection checkpoints what is left
            self._serving.execute("PRAGMA wal_autocheckpoint = 1000")

    def _run(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {RESTART_WAIT_MS}")
        failed = False
        try:
            while not self._stop.wait(self.interval):
                try:
                    self._round(db)
                    failed = False
                except sqlite3.Error as exc:
                    if not failed:  # once per run of failures, not twice a second
                        logs.event("wal checkpoint failed", logging.WARNING, error=str(exc))
                    failed = True
        finally:
            db.close()

    def _round(self, db: sqlite3.Connection) -> None:
        for _ in range(_CATCH_UP_ROUNDS):
            _busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            left = frames - copied
            if left <= RESTART_BELOW_FRAMES:
                break
        else:
            return  # writes outpace copying: keep copying next round, never block the writer
        # All copied is not enough: the serving connection starts the log over only
        # if it begins a transaction with nothing left to copy, and under a stream of
        # batches it has always committed once more by then.
        idle = frames == self._frames_seen
        self._frames_seen = frames
        if frames <= 0 or (left <= 0 and idle):
            return
        busy, self._frames_seen, _copied = db.execute(
            "PRAGMA wal_checkpoint(RESTART)").fetchone()
        if not busy:
            self.restarts += 1
