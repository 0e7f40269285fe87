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

PASSIVE checkpoints never take the write lock nor wait for readers, but alone
they never start the log over while batches keep arriving: SQLite rewinds it
only when a writer begins with every frame already copied, and with a batch
committed every few milliseconds that moment never comes (the log grew by
40 MB a second, 786 MB in a 20-second run, each frame written to newly
allocated blocks the kernel zeroes first, and the file never shrank). So each
round copies what it can without blocking (PASSIVE, repeated while that
catches up); once the log holds more than ``WAL_LIMIT`` bytes, the round holds
the serving connection's next transaction back (``SqliteStore``'s write lock,
which its transactions take, waiting at most ``WRITER_WAIT`` for it) while one
more PASSIVE copies the last frames, so that the next commit writes the log
from its start and truncates the file to ``WAL_LIMIT``. The writer then waits
for a copy of a few frames and two fsyncs once per ``WAL_LIMIT`` of writes (of
more, if writes outpace copying until the log is four times the limit).
(A RESTART checkpoint would do the same through SQLite's locks, but the writer
waiting in BEGIN IMMEDIATE holds a read mark the RESTART waits for, and SQLite's
busy handler sleeps in growing steps: batches took up to 135 ms.) Other
processes (`controller token create` …) keep the default.
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
# The writer is held back while the last frames are copied (and both files fsynced): only
# once PASSIVE rounds have left at most this many (4 MiB of 4 KiB pages) …
CATCH_UP_FRAMES = 1024
# … and the writer's lock is ours within this many seconds (else: next round).
WRITER_WAIT = 0.02
WAL_LIMIT = 256 << 20  # bytes of log before it is started over, and kept on disk after
_CATCH_UP_ROUNDS = 4
_FAR_PAST = 4  # x the limit: the writer waits however much is left to copy
_FRAME_HEADER = 24  # bytes before each page in the log

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
    def __init__(self, path: Path, writer: threading.Lock,
                 interval: float = CHECKPOINT_INTERVAL, *, wal_limit: int = WAL_LIMIT) -> None:
        self.path = path
        self.writer = writer  # held by the serving connection's write transactions
        self.interval = interval
        self.wal_limit = wal_limit
        # rounds that copied every frame with the writer held back, so that its next
        # commit starts the log over (for tests and benchmarks)
        self.restarts = 0
        self._restart_frames = 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._serving: sqlite3.Connection | None = None

    def start(self, serving: sqlite3.Connection) -> None:
        """Take checkpointing away from ``serving`` (the event loop's connection)."""
        self._serving = serving
        serving.execute("PRAGMA wal_autocheckpoint = 0")
        # applied by the serving connection's first commit after the log starts over
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
        page = int(db.execute("PRAGMA page_size").fetchone()[0])
        self._restart_frames = max(1, self.wal_limit // (page + _FRAME_HEADER))
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
            frames, left = self._passive(db)
            if left <= CATCH_UP_FRAMES:
                break
        # All copied is not enough: the serving connection starts the log over only
        # if it begins a transaction with nothing left to copy, and under a stream of
        # batches it has always committed once more by then. So, once the log is
        # past the limit, the last few frames are copied with its transactions held
        # back (on our lock: it wakes the moment we are done, where SQLite's busy
        # handler would sleep on), and its next one starts the log over.
        if frames < self._restart_frames:
            return
        if left > CATCH_UP_FRAMES and frames < _FAR_PAST * self._restart_frames:
            return  # writes outpace copying: the writer waits only for a log far past the limit
        if not self.writer.acquire(timeout=WRITER_WAIT):
            return
        try:
            frames, left = self._passive(db)
        finally:
            self.writer.release()
        if left == 0:
            self.restarts += 1

    @staticmethod
    def _passive(db: sqlite3.Connection) -> tuple[int, int]:
        """(frames in the log, frames not yet copied) after a PASSIVE checkpoint."""
        _busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(frames), int(frames) - int(copied)
