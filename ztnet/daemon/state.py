"""The daemon's state directory (0700): the last applied bundle, exactly as
it was signed, the deltas applied on top of it since (``applied-deltas/``, in
order), and the highest version applied. The version is written only after
its bundle or delta was applied, so a crash in between can only make the
daemon re-apply, never skip or roll back. A new whole bundle is written
before the deltas of the old one are removed: a crash in between leaves
deltas whose base no longer matches, which the next start refuses (logged)
while the new bundle stands."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ztnet.errors import ConfigError
from ztnet.fsutil import read_bounded, replace_atomic
from ztnet.grants.limits import MAX_DELTA_PAYLOAD_BYTES

BUNDLE_FILE = "applied-bundle.json"
VERSION_FILE = "applied.json"
DELTA_DIR = "applied-deltas"
# How many deltas may stand on one bundle: each is re-verified at every start, and a
# longer chain is refused (the controller or the operator then sends a whole bundle).
MAX_DELTA_CHAIN = 256
# A delta's envelope: its payload in base64 and the signatures around it.
MAX_DELTA_ENVELOPE_BYTES = 4 * -(-MAX_DELTA_PAYLOAD_BYTES // 3) + 8192


@dataclass(frozen=True, slots=True)
class Applied:
    version: int
    payload_sha256: str
    # The version of the whole bundle the applied deltas stand on (= version without any).
    bundle_version: int = 0

    @property
    def base_version(self) -> int:
        return self.bundle_version or self.version


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._deltas: int | None = None
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.chmod(0o700)
        except OSError as exc:
            raise ConfigError(f"daemon: cannot use state directory {path}: {exc.strerror}") from exc

    def applied(self) -> Applied | None:
        path = self.path / VERSION_FILE
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
            return Applied(int(record["version"]), str(record["payload_sha256"]),
                           int(record.get("bundle_version", 0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"daemon: {path} is corrupt ({exc}); refusing to guess the "
                              "applied version (rollback protection)") from exc

    def bundle(self) -> bytes | None:
        path = self.path / BUNDLE_FILE
        return path.read_bytes() if path.exists() else None

    def deltas(self) -> list[tuple[Path, bytes]]:
        """The applied deltas, oldest first (each to be verified again: its file is
        only bytes, like any other input)."""
        directory = self.path / DELTA_DIR
        if not directory.is_dir():
            return []
        files = sorted(p for p in directory.iterdir()
                       if p.suffix == ".json" and p.stem.isdigit())
        return [(p, read_bounded(p, MAX_DELTA_ENVELOPE_BYTES)) for p in files]

    def delta_count(self) -> int:
        """Deltas standing on the recorded bundle (counted once, then kept: this process
        is the directory's only writer)."""
        if self._deltas is None:
            directory = self.path / DELTA_DIR
            self._deltas = sum(1 for p in directory.iterdir() if p.suffix == ".json") \
                if directory.is_dir() else 0
        return self._deltas

    def save(self, envelope: bytes, applied: Applied) -> None:
        """A whole bundle: it replaces the bundle and every delta."""
        replace_atomic(self.path / BUNDLE_FILE, envelope)
        directory = self.path / DELTA_DIR
        if directory.is_dir():
            for path in directory.iterdir():
                path.unlink()
        self._deltas = 0
        self._save_version(Applied(applied.version, applied.payload_sha256))

    def save_delta(self, envelope: bytes, applied: Applied) -> None:
        directory = self.path / DELTA_DIR
        directory.mkdir(mode=0o700, exist_ok=True)
        count = self.delta_count() + 1
        replace_atomic(directory / f"{count:06d}.json", envelope)
        self._deltas = count
        self._save_version(applied)

    def _save_version(self, applied: Applied) -> None:
        record: dict[str, object] = {"version": applied.version,
                                     "payload_sha256": applied.payload_sha256}
        if applied.bundle_version:
            record["bundle_version"] = applied.bundle_version
        replace_atomic(self.path / VERSION_FILE, json.dumps(record).encode())
