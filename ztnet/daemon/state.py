"""The daemon's state directory (0700): the last applied bundle, exactly as
it was signed, and the highest version applied. The version is written only
after its bundle was applied, so a crash in between can only make the daemon
re-apply, never skip or roll back."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ztnet.errors import ConfigError

BUNDLE_FILE = "applied-bundle.json"
VERSION_FILE = "applied.json"


@dataclass(frozen=True, slots=True)
class Applied:
    version: int
    payload_sha256: str


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` (0600) so that a crash or power loss leaves the old content or the
    new, never a mixture: a temporary file (``.NAME.tmp``), fsync, rename, fsync of the
    directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
        write_atomic(self.path / BUNDLE_FILE, envelope)
        write_atomic(self.path / VERSION_FILE, json.dumps(
            {"version": applied.version, "payload_sha256": applied.payload_sha256}).encode())
