"""`ztnet daemon`: verify signed bundles and keep the kernel enforcing the
last good one.

Nothing reaches the datapath unless ``verify_bundle`` accepted it: signed by
a trusted key, for this host, not older than what was applied (rollback), not
expired (freeze), every grant still valid. A rejected bundle is logged with
its reason and changes nothing. The loop is level-triggered: every resync
period it re-installs the current grant set (a diff: usually no map writes),
which activates later validity windows, re-registers recreated agent
cgroups and absorbs wall-clock steps.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from ztnet.daemon import logs
from ztnet.daemon.notify import notify
from ztnet.daemon.state import Applied, StateDir
from ztnet.daemon.watch import FileWatch
from ztnet.datapath.datapath import Datapath
from ztnet.datapath.probe import probe
from ztnet.errors import ConfigError, GrantError
from ztnet.grants.bundle import VerifiedBundle, verify_bundle
from ztnet.grants.keys import key_id, load_public_key
from ztnet.instance import Instance

MAX_BUNDLE_BYTES = 64 * 1024 * 1024


@dataclass
class DaemonConfig:
    trust: list[Path]
    bundle: Path | None
    state: Path
    host: str = field(default_factory=socket.gethostname)
    instance: str | None = None
    resync_seconds: float = 30.0


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        probe()  # no root, cgroup v2, bcc or headers: one line, before touching anything
        keys = [load_public_key(path) for path in config.trust]
        if not keys:
            raise ConfigError("daemon: at least one --trust key is needed")
        self.trusted = {key_id(key): key for key in keys}
        self.state = StateDir(config.state)
        self.applied = self.state.applied()
        self.current: VerifiedBundle | None = None
        self.instance = Instance.resolve(config.instance)
        self.datapath: Datapath | None = None
        self.rejected = 0
        self._stop = False
        self._reload = False

    # --- applying ------------------------------------------------------------------------

    def apply(self, envelope: bytes, source: str) -> str:
        """Verify and apply; returns "applied", "unchanged" or "rejected"."""
        assert self.datapath is not None
        now = time.time()
        floor = self.applied.version if self.applied else 0
        started = time.monotonic()
        try:
            verified = verify_bundle(envelope, trusted=self.trusted, host=self.config.host,
                                     min_version=floor, now=now)
            if self.applied and verified.version == self.applied.version \
                    and verified.payload_sha256 != self.applied.payload_sha256 \
                    and self.current is not None:
                raise GrantError(f"bundle: version {verified.version} is already applied with "
                                 "different content; a new policy needs a new version")
        except GrantError as exc:
            self.rejected += 1
            logs.event("bundle rejected", logging.WARNING, source=source, reason=str(exc),
                       applied_version=floor)
            return "rejected"
        if self.current is not None and self.applied is not None \
                and verified.version == self.applied.version:
            logs.event("bundle unchanged", source=source, version=verified.version)
            return "unchanged"
        verify_seconds = time.monotonic() - started
        result = self.datapath.replace(verified.grants, now=now)
        self.current = verified
        self.applied = Applied(verified.version, verified.payload_sha256)
        self.state.save(envelope, self.applied)
        cut = self.datapath.cut_unauthorized(now=now)
        logs.event("bundle applied", source=source, version=verified.version,
                   grants=len(verified.grants), entries=result.entries,
                   key_id=verified.key_id[:16], payload_sha256=verified.payload_sha256[:16],
                   verify_ms=round(verify_seconds * 1000, 1),
                   apply_ms=round(result.seconds * 1000, 1), flows_cut=len(cut))
        return "applied"

    def _read_bundle_file(self) -> bytes | None:
        path = self.config.bundle
        if path is None:
            return None
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_BUNDLE_BYTES + 1)
        except FileNotFoundError:
            logs.event("bundle file missing", logging.WARNING, path=str(path))
            return None
        except OSError as exc:
            logs.event("bundle file unreadable", logging.WARNING, path=str(path),
                       reason=exc.strerror)
            return None
        if len(data) > MAX_BUNDLE_BYTES:
            self.rejected += 1
            logs.event("bundle rejected", logging.WARNING, source=str(path),
                       reason=f"bundle: larger than {MAX_BUNDLE_BYTES} bytes")
            return None
        return data

    def reload(self) -> None:
        data = self._read_bundle_file()
        if data is not None:
            self.apply(data, str(self.config.bundle))

    def resync(self) -> None:
        """Re-install the current set: later windows, recreated cgroups, clock steps."""
        if self.current is None or self.datapath is None:
            return
        if self.current.bundle.expires <= time.time():
            return  # a frozen bundle is not renewed; its grants lapse in the kernel
        result = self.datapath.replace(self.current.grants)
        if result.written or result.deleted:
            logs.event("resync changed the kernel", logging.WARNING, written=result.written,
                       deleted=result.deleted)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.datapath = Datapath.open(self.instance)
        logs.event("datapath ready", instance=self.instance.name,
                   cgroup=str(self.instance.cgroup_root), pins=str(self.instance.pin_dir),
                   generation=self.datapath.generation)
        persisted = self.state.bundle()
        if persisted is not None:
            # the persisted bundle first, re-verified, before any other input
            self.current = None
            self.apply(persisted, f"{self.state.path}/applied-bundle.json")
        self.reload()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True

    def run(self) -> int:
        self.start()
        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        selector = selectors.DefaultSelector()
        selector.register(wake_r, selectors.EVENT_READ)
        watch = FileWatch(self.config.bundle) if self.config.bundle else None
        if watch is not None:
            selector.register(watch, selectors.EVENT_READ)
        notify(f"READY=1\nSTATUS=enforcing version "
               f"{self.applied.version if self.applied else 'none'}")
        logs.event("daemon ready", host=self.config.host,
                   version=self.applied.version if self.applied else None)
        next_resync = time.monotonic() + self.config.resync_seconds
        try:
            while not self._stop:
                timeout = max(0.0, next_resync - time.monotonic())
                for key, _ in selector.select(timeout):
                    if key.fileobj is watch and watch is not None and watch.changed():
                        self._reload = True
                    elif key.fileobj == wake_r:
                        while True:
                            try:
                                if not os.read(wake_r, 512):
                                    break
                            except BlockingIOError:
                                break
                if self._reload and not self._stop:
                    self._reload = False
                    self.reload()
                if time.monotonic() >= next_resync:
                    self.resync()
                    next_resync = time.monotonic() + self.config.resync_seconds
        finally:
            notify("STOPPING=1")
            if watch is not None:
                watch.close()
            if self.datapath is not None:
                self.datapath.close()  # programs stay attached: enforcement outlives us
            logs.event("daemon stopped; enforcement stays in place")
        return 0
