"""The daemon's state directory (0700): the last applied bundle, exactly as
it was signed, and the highest version applied. The version is written only
after its bundle was applied, so a crash in between can only make the daemon
re-apply, never skip or roll back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ztnet.errors import ConfigError
from ztnet.fsutil import replace_atomic

BUNDLE_FILE = "applied-bundle.json"
VERSION_FILE = "applied.json"


@dataclass(frozen=True, slots=True)
class Applied:
    version: int
    payload_sha256: str


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path
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
            return Applied(int(record["version"]), str(record["payload_sha256"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"daemon: {path} is corrupt ({exc}); refusing to guess the "
                              "applied version (rollback protection)") from exc

    def bundle(self) -> bytes | None:
        path = self.path / BUNDLE_FILE
        return path.read_bytes() if path.exists() else None

    def save(self, envelope: bytes, applied: Applied) -> None:
        replace_atomic(self.path / BUNDLE_FILE, envelope)
        replace_atomic(self.path / VERSION_FILE, json.dumps(
            {"version": applied.version, "payload_sha256": applied.payload_sha256}).encode())
