"""`ztnet daemon`: verify signed bundles and keep the kernel enforcing the
last good one.

Nothing reaches the datapath unless ``check_bundle`` (or, for a delta against the
held state, ``verify_delta``) accepted it: signed by
a trusted key, for this host, not older than what was applied (rollback), not
expired (freeze), every grant still valid. A rejected bundle is logged with
its reason and changes nothing. The loop is level-triggered: every resync
period it re-installs the current grant set (a diff: usually no map writes),
which activates later validity windows, re-registers recreated agent
cgroups and absorbs wall-clock steps.

Bundles come from a file (``--bundle``, reloaded on SIGHUP or when it changes) or from the
controller (``--controller``, after ``ztnet enroll``): a ControllerClient (client.py) keeps
the grant stream in its own threads and hands every pushed bundle to this loop, which
verifies and applies it here, on the main thread, and answers Ack or Nack with the reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Literal

from ztnet import logs
from ztnet.daemon.credentials import HostCredentials
from ztnet.daemon.flows import FlowPipeline
from ztnet.daemon.memory import (
    collector_paused,
    return_free_heap,
    return_large_buffers,
    settle_long_lived,
)
from ztnet.daemon.notify import notify
from ztnet.daemon.resolverconf import QueryRecord, ResolverSettings
from ztnet.daemon.spool import DEFAULT_MAX_BYTES
from ztnet.daemon.state import MAX_DELTA_CHAIN, Applied, StateDir
from ztnet.daemon.watch import FileWatch
from ztnet.datapath.compile import kernel_not_after
from ztnet.datapath.datapath import Datapath, instance_lock
from ztnet.datapath.probe import probe
from ztnet.errors import ConfigError, DatapathError, GrantError, IdentityError
from ztnet.fsutil import FileTooLarge, read_bounded
from ztnet.grants.bundle import (
    BUNDLE_PAYLOAD_TYPE,
    VerifiedBundle,
    check_bundle,
    verify_bundle,
)
from ztnet.grants.delta import DELTA_PAYLOAD_TYPE, HeldGrants, VerifiedDelta, verify_delta
from ztnet.grants.envelope import VerifiedPayload, verify_envelope
from ztnet.grants.keys import key_id, load_public_key
from ztnet.grants.limits import MAX_ENVELOPE_BYTES
from ztnet.identity import cgroups
from ztnet.instance import Instance

if TYPE_CHECKING:
    # Imported where they are first used: gRPC (controller mode) and dnspython (--dns) are
    # ~18 MiB of resident memory that a daemon enforcing a bundle file never needs.
    from ztnet.daemon.client import ControllerClient
    from ztnet.daemon.requests import RequestSocket
    from ztnet.daemon.resolver import Resolver

# Wall-clock steps smaller than this are NTP slewing noise, not worth a log line.
CLOCK_STEP_REPORT_NS = 1_000_000_000


@dataclass
class DaemonConfig:
    trust: list[Path]
    bundle: Path | None
    state: Path
    host: str = field(default_factory=socket.gethostname)
    instance: str | None = None
    resync_seconds: float = 30.0
    # Controller mode: the controller's address; credentials come from ``state``.
    controller: str | None = None
    # Refuse bundles of any other trust domain (controller mode: the enrolled one).
    trust_domain: str | None = None
    backoff_cap: float = 30.0
    # Flow tracing: records in <state>/flows.jsonl, audit trail, optional metrics listener.
    flows: bool = True
    metrics_listen: str | None = None
    # Controller mode: the bound of the spool of flow records awaiting upload.
    spool_max_bytes: int = DEFAULT_MAX_BYTES
    # Every flow record also to this OpenTelemetry collector (HOST:PORT, OTLP/gRPC).
    otlp_endpoint: str | None = None
    # Controller mode: the local grant-request socket (ztnet.daemon.requests); None: off.
    request_socket: Path | None = None
    # ztnet's resolver for hostname grants (docs/daemon.md): None leaves agents' DNS to
    # address grants (and denied without one).
    dns: ResolverSettings | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What apply() did: "applied", "unchanged" or "rejected" (then ``reason`` says why)."""

    status: Literal["applied", "unchanged", "rejected"]
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "rejected"


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
        self.held: HeldGrants | None = None  # self.current's grant ids, for deltas
        self.instance = Instance.resolve(config.instance)
        self.datapath: Datapath | None = None
        self.rejected = 0
        self.credentials: HostCredentials | None = None
        if config.controller is not None:
            self.credentials = HostCredentials(config.state)  # missing or corrupt: fail now
        self.client: ControllerClient | None = None
        self.flows: FlowPipeline | None = None
        self.resolver: Resolver | None = None
        self._stop = False
        self._reload = False
        self._reported_step_ns = 0  # the wall-clock step last logged

    # --- applying ------------------------------------------------------------------------

    def apply(self, envelope: bytes, source: str) -> Outcome:
        """Verify and apply a whole bundle or a delta; a rejection carries the verifier's
        reason."""
        with collector_paused():  # see ztnet.daemon.memory: the collector doubles a verify
            return self._apply(envelope, source)

    def _apply(self, envelope: bytes, source: str) -> Outcome:
        assert self.datapath is not None
        now = time.time()
        floor = self.applied.version if self.applied else 0
        started, cpu_started = time.monotonic(), time.thread_time()
        try:
            signed = verify_envelope(envelope, trusted=self.trusted,
                                     payload_type=frozenset({BUNDLE_PAYLOAD_TYPE,
                                                             DELTA_PAYLOAD_TYPE}))
            if signed.payload_type == DELTA_PAYLOAD_TYPE:
                delta = self._check_delta(signed, now)
                if delta is None:
                    logs.event("bundle unchanged", source=source, version=floor)
                    return Outcome("unchanged")
                return self._apply_delta(delta, envelope, source, now, started, cpu_started)
            verified = check_bundle(signed, host=self.config.host, min_version=floor, now=now,
                                    trust_domain=self.config.trust_domain)
            if self.applied and verified.version == self.applied.version \
                    and verified.payload_sha256 != self.applied.payload_sha256 \
                    and self.current is not None:
                raise GrantError(f"bundle: version {verified.version} is already applied with "
                                 "different content; a new policy needs a new version")
        except GrantError as exc:
            return self._rejected(source, str(exc), floor)
        except Exception as exc:  # noqa: BLE001 - hostile bytes: any failure is a rejection
            # The verifier raises only GrantError by design; anything else is a verifier
            # bug that hostile input found. It must not take the daemon down (in bundle-file
            # mode that is a crash loop on one tampered file): reject, and say what broke.
            return self._rejected(source, f"bundle: the verifier failed on this input "
                                  f"({type(exc).__name__}); rejected", floor, logging.ERROR)
        if self.current is not None and self.applied is not None \
                and verified.version == self.applied.version:
            logs.event("bundle unchanged", source=source, version=verified.version)
            return Outcome("unchanged")
        applied = Applied(verified.version, verified.payload_sha256)
        return self._enforce(verified, applied, source, now, started, cpu_started,
                             lambda: self.state.save(envelope, applied))

    def _enforce(self, verified: VerifiedBundle, applied: Applied, source: str, now: float,
                 started: float, cpu_started: float, record: Callable[[], None] | None,
                 held: HeldGrants | None = None, *, restored: bool = False) -> Outcome:
        """Make a verified state the enforced one, whole, and ``record`` it (``restored``:
        the state directory's, enforced again at start)."""
        assert self.datapath is not None
        verify_seconds = time.monotonic() - started
        try:
            # quarantine first: the agent is denied everything before anything else moves
            quarantined, released = self.datapath.set_quarantine(
                entry.agent for entry in verified.bundle.quarantine)
            flags_at = time.time()
            result = self.datapath.install(verified, now=now)
        except (DatapathError, IdentityError) as exc:
            # The swap is atomic: the kernel still enforces the previous set.
            logs.event("bundle not applied", logging.ERROR, source=source,
                       version=verified.version, reason=str(exc))
            return Outcome("rejected", str(exc))
        self.applied = applied
        self.held = None  # built once the bookkeeping below is done
        try:
            if record is not None:
                record()
        except OSError as exc:  # e.g. ENOSPC: the kernel holds the new set regardless
            logs.event("state not recorded", logging.ERROR, version=verified.version,
                       state=str(self.state.path),
                       reason=f"daemon: cannot record the applied bundle in "
                              f"{self.state.path}: {exc.strerror or exc}; a restart "
                              "re-verifies the bundle it is given")
        previous, self.current = self.current, verified
        self._configure_resolver(verified)  # learned entries of vanished grants go first
        cut = self.datapath.cut_unauthorized(now=now)  # a quarantined agent has no grants
        self._freeze(verified, previous)
        held = held or HeldGrants(verified)
        if self.flows is not None:
            self.flows.bundle_applied(verified, held, restored=restored)
        if quarantined or released:
            logs.event("quarantine changed", logging.WARNING, version=verified.version,
                       quarantined=sorted(quarantined), released=sorted(released),
                       flags_at=round(flags_at, 4))
        self.held = held
        logs.event("bundle applied", source=source, version=verified.version,
                   grants=len(verified.grants), entries=result.entries,
                   key_id=verified.key_id[:16], payload_sha256=verified.payload_sha256[:16],
                   verify_ms=round(verify_seconds * 1000, 1),
                   apply_ms=round(result.seconds * 1000, 1), flows_cut=len(cut),
                   total_ms=round((time.monotonic() - started) * 1000, 1),
                   cpu_ms=round((time.thread_time() - cpu_started) * 1000, 1))
        del previous  # the replaced state goes now, before the survivors are frozen
        settle_long_lived()
        return Outcome("applied")

    def _restore(self) -> None:
        """Enforce the state directory's bundle and deltas again, verified like any
        input, as one state installed whole. If any part fails, nothing of it is
        installed: a bundle without a later delta would bring back the grants that
        delta revoked (the kernel keeps what it enforces until a new bundle comes)."""
        persisted = self.state.bundle()
        if persisted is None:
            return
        source = f"{self.state.path}/applied-bundle.json"
        now = time.time()
        started, cpu_started = time.monotonic(), time.thread_time()
        floor = self.applied.base_version if self.applied else 0
        try:
            state = verify_bundle(persisted, trusted=self.trusted, host=self.config.host,
                                  min_version=floor, now=now,
                                  trust_domain=self.config.trust_domain)
            held = HeldGrants(state)
            for path, envelope in self.state.deltas():
                source = str(path)
                signed = verify_envelope(envelope, trusted=self.trusted,
                                         payload_type=DELTA_PAYLOAD_TYPE)
                delta = verify_delta(signed, base=state, held=held, now=now, restoring=True)
                state = delta.apply_to(state)
                held.apply(delta.delta)
        except GrantError as exc:
            self._rejected(source, f"{exc}; the recorded state is not restored",
                           floor, logging.ERROR)
            return
        except (OSError, FileTooLarge) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            self._rejected(source, f"daemon: cannot read the recorded state: {reason}",
                           floor, logging.ERROR)
            return
        self._enforce(state, Applied(state.version, state.payload_sha256,
                                     self.applied.base_version if self.applied else 0),
                      source, now, started, cpu_started, None, held, restored=True)

    def _check_delta(self, signed: VerifiedPayload, now: float) -> VerifiedDelta | None:
        """A signed delta checked against the held state (None: it is the one applied
        last); GrantError names why it cannot be applied."""
        base, held, applied = self.current, self.held, self.applied
        if base is None or held is None or applied is None:
            raise GrantError("delta: this host holds no bundle to apply it to; "
                             "send a whole bundle")
        if hashlib.sha256(signed.payload).hexdigest() == applied.payload_sha256:
            return None
        verified = verify_delta(signed, base=base, held=held, now=now)
        chain = self.state.delta_count()
        if chain >= MAX_DELTA_CHAIN:
            raise GrantError(f"delta: {chain} deltas already stand on version "
                             f"{applied.base_version}, the most one bundle may carry; "
                             "send a whole bundle")
        return verified

    def _apply_delta(self, verified: VerifiedDelta, envelope: bytes, source: str, now: float,
                     started: float, cpu_started: float) -> Outcome:
        """A checked delta: the kernel is changed entry by entry (Datapath.apply_delta);
        audit trail, flow metadata and the state directory follow."""
        assert self.datapath is not None
        base, held, applied = self.current, self.held, self.applied
        assert base is not None and held is not None and applied is not None
        verify_seconds = time.monotonic() - started
        try:
            result = self.datapath.apply_delta(verified.added, verified.revoked,
                                               bundle_expires=base.bundle.expires, now=now)
        except (DatapathError, IdentityError) as exc:
            logs.event("delta not applied", logging.ERROR, source=source,
                       version=verified.version, reason=str(exc))
            return Outcome("rejected", str(exc))
        # the kernel enforces the change once apply_delta's own time has passed; what it
        # does after that (its record of the grant set) and all below is bookkeeping
        enforced = verify_seconds + result.seconds
        self.current = current = verified.apply_to(base)
        held.apply(verified.delta)
        self.applied = Applied(verified.version, verified.payload_sha256,
                               applied.base_version)
        try:
            self.state.save_delta(envelope, self.applied)
        except OSError as exc:
            logs.event("state not recorded", logging.ERROR, version=verified.version,
                       state=str(self.state.path),
                       reason=f"daemon: cannot record the applied delta in "
                              f"{self.state.path}: {exc.strerror or exc}; a restart "
                              "re-applies the bundle and deltas recorded before it")
        cut = self.datapath.cut_unauthorized(now=now) if verified.revoked else []
        if self.flows is not None:
            self.flows.delta_applied(current, verified.added, verified.revoked, held)
        logs.event("delta applied", source=source, version=verified.version,
                   base_version=verified.delta.base_version, added=len(verified.added),
                   revoked=len(verified.revoked), grants=len(current.grants),
                   entries=result.entries, written=result.written, deleted=result.deleted,
                   key_id=verified.key_id[:16], payload_sha256=verified.payload_sha256[:16],
                   verify_ms=round(verify_seconds * 1000, 3),
                   kernel_ms=round(result.seconds * 1000, 3),
                   enforce_ms=round(enforced * 1000, 3), flows_cut=len(cut),
                   total_ms=round((time.monotonic() - started) * 1000, 1),
                   cpu_ms=round((time.thread_time() - cpu_started) * 1000, 1))
        return Outcome("applied")

    def _freeze(self, bundle: VerifiedBundle, previous: VerifiedBundle | None) -> None:
        """Freeze the agents the bundle says to freeze; thaw those the previous bundle
        froze and this one does not (an operator's own cgroup.freeze is left alone)."""
        assert self.datapath is not None
        want = {entry.agent for entry in bundle.bundle.quarantine if entry.freeze}
        had = {entry.agent for entry in previous.bundle.quarantine if entry.freeze} \
            if previous is not None else set()
        for agent in sorted(want | had):
            path = self.instance.agent_cgroup(agent)
            try:
                if agent in want and not cgroups.is_frozen(path):
                    cgroups.set_frozen(path, True)
                elif agent not in want and agent in had:
                    cgroups.set_frozen(path, False)
            except IdentityError as exc:
                logs.event("freeze failed", logging.ERROR, agent=agent, reason=str(exc))
    def _configure_resolver(self, verified: VerifiedBundle) -> None:
        """Hand the bundle's hostname grants to the resolver; every agent of the bundle
        gets a resolver port (also agents that have only hostname grants, registered here)."""
        if self.datapath is None:
            return
        if self.resolver is None:
            if verified.names:
                logs.event("hostname grants not enforced", logging.WARNING,
                           grants=len(verified.names),
                           reason="daemon: the resolver is off (start with --dns); these "
                                  "agents' DNS stays denied unless an address grant allows it")
            return
        with instance_lock(self.instance):
            self.datapath.ensure_agents({g.agent for g in verified.grants} |
                                        {g.agent for g in verified.names})
        agents = self.datapath.agent_names()
        removed = self.resolver.configure(verified.names, verified.bundle.expires, agents,
                                          kernel_not_after=kernel_not_after)
        if removed:
            logs.event("learned addresses removed", entries=removed, version=verified.version)

    def _on_dns_query(self, record: QueryRecord) -> None:
        level = logging.INFO if record.verdict in ("answered", "nodata", "nxdomain") \
            else logging.WARNING
        logs.event("dns query", level, agent=record.agent, qname=record.name,
                   type=record.qtype, verdict=record.verdict, answers=list(record.answers),
                   stripped=list(record.stripped), chain=list(record.chain), ttl=record.ttl,
                   reason=record.reason or None, transport=record.transport,
                   upstream_ms=record.upstream_ms, install_ms=record.install_ms)
        if self.flows is not None:
            self.flows.dns_query(record)

    def _rejected(self, source: str, reason: str, floor: int,
                  level: int = logging.WARNING) -> Outcome:
        self.rejected += 1
        logs.event("bundle rejected", level, source=source, reason=reason, applied_version=floor)
        if self.flows is not None:
            self.flows.bundle_rejected(source, reason)
        return Outcome("rejected", reason)

    def version_held(self) -> int:
        """What Subscribe reports: the applied version while its bundle is still fresh, else
        0 (nothing usable held: the controller should send its current bundle)."""
        current, applied = self.current, self.applied
        if current is None or applied is None or current.bundle.expires <= time.time():
            return 0
        return applied.version

    def on_pushes(self, client: ControllerClient) -> None:
        """Apply what the controller pushed, in order, and answer each."""
        for push in client.pushes():
            outcome = self.apply(push.envelope, f"controller {self.config.controller}")
            client.answer(push, outcome.ok, outcome.reason)

    def _read_bundle_file(self) -> bytes | None:
        path = self.config.bundle
        if path is None:
            return None
        try:
            return read_bounded(path, MAX_ENVELOPE_BYTES)
        except FileNotFoundError:
            logs.event("bundle file missing", logging.WARNING, path=str(path))
            return None
        except OSError as exc:
            logs.event("bundle file unreadable", logging.WARNING, path=str(path),
                       reason=exc.strerror)
            return None
        except FileTooLarge:
            self.rejected += 1
            logs.event("bundle rejected", logging.WARNING, source=str(path),
                       reason=f"bundle: larger than {MAX_ENVELOPE_BYTES} bytes")
            return None

    def reload(self) -> None:
        data = self._read_bundle_file()
        if data is not None:
            self.apply(data, str(self.config.bundle))

    def resync(self) -> None:
        """Compare the kernel with what was installed and repair drift, then re-install the
        current set: later windows, recreated cgroups. A stale bundle is re-installed too:
        that renews nothing (its entries end by its expiry plus the grace, on the pinned
        clock) but still removes whatever someone else wrote."""
        if self.current is None or self.datapath is None:
            return
        step_ns = self.datapath.clock_step_ns()
        if abs(step_ns - self._reported_step_ns) >= CLOCK_STEP_REPORT_NS:
            # once per step, not at every resync after it
            self._reported_step_ns = step_ns
            logs.event("wall clock stepped; kernel deadlines keep the pinned offset",
                       logging.WARNING, step_seconds=round(step_ns / 1e9, 3))
        if self.resolver is not None:
            self.resolver.sweep(in_use=self.datapath.learned_in_use())
        try:
            synced = self.datapath.resync(self.current)
        except DatapathError as exc:  # the kernel keeps what it has; try again next period
            logs.event("resync failed", logging.ERROR, reason=str(exc))
            return
        finally:
            return_free_heap()  # a full compare decodes the trie: ~30 MB, short-lived
        quarantined, released = self.datapath.set_quarantine(
            entry.agent for entry in self.current.bundle.quarantine)
        if quarantined or released:  # someone else changed the flags: put them right
            logs.event("quarantine drift repaired", logging.WARNING,
                       quarantined=sorted(quarantined), released=sorted(released))
        drift = synced.drift
        if drift.total:
            logs.event("datapath drift repaired", logging.WARNING, **drift.counts(),
                       samples=list(drift.samples), version=self.current.version)
            if self.flows is not None:
                self.flows.datapath_drift(drift, self.current.version)
        elif synced.applied.written or synced.applied.deleted:
            logs.event("resync changed the kernel", written=synced.applied.written,
                       deleted=synced.applied.deleted)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        return_large_buffers()
        started = time.monotonic()
        self.datapath = Datapath.open(self.instance)
        programs = self.datapath.programs
        logs.event("datapath ready", instance=self.instance.name,
                   cgroup=str(self.instance.cgroup_root), pins=str(self.instance.pin_dir),
                   generation=self.datapath.generation,
                   programs=programs.stamp if programs else None,
                   compiled=programs.compiled if programs else None,
                   open_ms=round((time.monotonic() - started) * 1000, 1))
        if self.config.dns is not None:
            from ztnet.daemon.resolver import Resolver

            self.resolver = Resolver(self.datapath.learned(), self.datapath.boot_deadline_ns,
                                     self.config.dns, on_query=self._on_dns_query)
            self.resolver.start()
            logs.event("dns resolver started",
                       upstreams=[f"{h}:{p}" for h, p in self.config.dns.upstreams])
        if self.config.flows:
            upload = None
            if self.config.controller is not None and self.credentials is not None:
                from ztnet.daemon.uploader import UploadSettings

                upload = UploadSettings(self.config.controller, self.credentials,
                                        self.config.spool_max_bytes, self.config.backoff_cap)
            self.flows = FlowPipeline(self.datapath, self.state.path, host=self.config.host,
                                      trust_domain=self.config.trust_domain or "",
                                      metrics_listen=self.config.metrics_listen, upload=upload,
                                      otlp_endpoint=self.config.otlp_endpoint,
                                      hostnames=self.resolver.hostnames if self.resolver
                                      else None)
        # the recorded bundle and its deltas first, re-verified, before any other input
        self.current = None
        with collector_paused():
            self._restore()
        self.reload()

    def _start_client(self) -> ControllerClient | None:
        if self.config.controller is None or self.credentials is None:
            return None
        from ztnet.daemon.client import ControllerClient

        client = ControllerClient(self.credentials, self.config.controller, self.version_held,
                                  backoff_cap=self.config.backoff_cap)
        client.start()
        return client

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True

    def run(self) -> int:
        # Watched before the first apply: a bundle file replaced while it is read would
        # otherwise wait for the next SIGHUP.
        watch = FileWatch(self.config.bundle) if self.config.bundle else None
        try:
            self.start()
        except BaseException:
            if watch is not None:
                watch.close()
            raise
        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        selector = selectors.DefaultSelector()
        selector.register(wake_r, selectors.EVENT_READ)
        if watch is not None:
            selector.register(watch, selectors.EVENT_READ)
        # Ready once the persisted bundle is enforced again: not waiting for the controller,
        # which may be down (the kernel keeps enforcing, expiry included, meanwhile).
        notify(f"READY=1\nSTATUS=enforcing version "
               f"{self.applied.version if self.applied else 'none'}")
        logs.event("daemon ready", host=self.config.host,
                   version=self.applied.version if self.applied else None,
                   controller=self.config.controller)
        client = self.client = self._start_client()
        requests: RequestSocket | None = None
        if client is not None:
            selector.register(client, selectors.EVENT_READ)
            if self.config.request_socket is not None:
                from ztnet.daemon.requests import RequestSocket

                requests = RequestSocket(self.config.request_socket, client.call,
                                         instance=self.instance)
                requests.start()
        next_resync = time.monotonic() + self.config.resync_seconds
        try:
            while not self._stop:
                timeout = max(0.0, next_resync - time.monotonic())
                for key, _ in selector.select(timeout):
                    if key.fileobj is watch and watch is not None and watch.changed():
                        self._reload = True
                    elif key.fileobj is client and client is not None:
                        self.on_pushes(client)
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
                    self.resync()  # SIGHUP also checks the kernel now, not at the next period
                    if client is not None:
                        client.reconnect()  # SIGHUP in controller mode: resubscribe now
                if time.monotonic() >= next_resync:
                    self.resync()
                    next_resync = time.monotonic() + self.config.resync_seconds
        finally:
            notify("STOPPING=1")
            if requests is not None:
                requests.stop()
            if client is not None:
                client.stop()
            if watch is not None:
                watch.close()
            if self.flows is not None:
                self.flows.close()
            if self.resolver is not None:
                self.resolver.close()  # kernel entries stay and lapse on their own
            if self.datapath is not None:
                self.datapath.close()  # programs stay attached: enforcement outlives us
            logs.event("daemon stopped; enforcement stays in place")
        return 0
