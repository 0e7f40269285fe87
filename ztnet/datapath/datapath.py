"""The datapath API: load or adopt, swap grant sets atomically, add and
remove grants, read counters, tear down.

A grant set lives twice in the kernel (generations 0 and 1 of the grant trie
and the level table). ``replace()`` rewrites the generation no program is
reading, then flips ``zt_config.generation`` with one map update: agents see
the old set or the new one, never a mixture, and there is no moment in which
a connection both sets allow is refused. The word is a counter whose low bit
names the live set: every flip adds 1, and every other change a verdict
depends on (an agent quarantined, released or removed) adds 2, so that the
verdicts stamped on sockets (struct zt_stamp) all go stale at once. Rewriting
is a diff against what that generation already holds (Cilium's dump-and-diff),
never flush-and-refill.
"""

from __future__ import annotations

import ctypes
import fcntl
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ztnet.datapath import abi, eventloss, events, loader, sockets
from ztnet.datapath.bpfsys import PinnedMap
from ztnet.datapath.compile import (
    BootClock,
    DecodedEntries,
    DesiredState,
    GrantIndex,
    compile_index,
)
from ztnet.datapath.drift import Drift, Fingerprint, find_drift
from ztnet.datapath.grantmaps import GrantMaps, Snapshot
from ztnet.datapath.learned import LearnedKey, LearnedTable
from ztnet.datapath.probe import probe
from ztnet.errors import MapUpdateError, NotAttached
from ztnet.grants.bundle import VerifiedBundle
from ztnet.grants.model import Grant, normalize_address
from ztnet.identity import cgroups, uids
from ztnet.instance import Instance


@dataclass(frozen=True, slots=True)
class ApplyResult:
    generation: int
    entries: int
    written: int
    deleted: int
    seconds: float


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What a resync found (``drift``: the kernel against what this process
    installed there) and what re-installing then did."""

    drift: Drift
    applied: ApplyResult


@dataclass(frozen=True, slots=True)
class AgentStats:
    allowed: int
    denied: int
    egress_packets: int
    egress_bytes: int
    egress_dropped: int
    ingress_packets: int
    ingress_bytes: int
    events_suppressed: int


@contextmanager
def instance_lock(instance: Instance) -> Iterator[None]:
    """One writer per instance at a time, across processes."""
    instance.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(instance.lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class PinnedMaps(Mapping[str, PinnedMap]):
    """The instance's pinned maps by name, each opened when first asked for (so the
    datapath works with whatever maps bpf/ declares; bcc or build.py pinned them)."""

    def __init__(self, pin_dir: Path) -> None:
        self._dir = pin_dir
        self._open: dict[str, PinnedMap] = {}

    def __getitem__(self, name: str) -> PinnedMap:
        pinned = self._open.get(name)
        if pinned is None:
            if not (self._dir / name).exists():
                raise KeyError(name)
            pinned = self._open[name] = PinnedMap(self._dir / name)
        return pinned

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(p.name for p in self._dir.iterdir() if p.is_file()))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def close(self) -> None:
        for pinned in self._open.values():
            pinned.close()
        self._open.clear()


class Datapath:
    def __init__(self, instance: Instance, programs: loader.LoadedPrograms | None) -> None:
        self.instance = instance
        self.programs = programs
        self.maps = PinnedMaps(instance.pin_dir)
        self.maps["zt_grants_v1"].check_layout(abi.ZtGrantKey, abi.ZtGrantValue)
        self.maps["zt_agents_v1"].check_layout(ctypes.c_uint64, abi.ZtAgent)
        self.maps["zt_config_v1"].check_layout(ctypes.c_int, abi.ZtConfig)
        self.grant_maps = GrantMaps(self.maps["zt_grants_v1"], self.maps["zt_levels_v1"])
        # The grant set this process last made active, and what it wrote into the
        # generations it knows (the active one; both after a repair), and the fingerprint
        # of the one a whole install left. The resync checks these against the kernel (a
        # batch dump, and while its digest is the one last checked, nothing is compared
        # again); a generation not in _written is read from the kernel before it is written.
        self._grants: tuple[Grant, ...] = ()
        self._audit: frozenset[str] = frozenset()  # agents this process put in audit mode
        self._written: dict[int, DesiredState] = {}  # by generation
        self._left: Fingerprint | None = None
        self._active: int | None = None
        self._checked_digest: bytes | None = None  # trie dump that matched _written
        self._compiled_for: tuple[object, ...] | None = None  # inputs of _written[_active]
        # The active generation's grants behind each entry (its packed contents are
        # _written[_active].packed), so that a delta recomputes only what it touches.
        self._index: GrantIndex | None = None
        self._learned: LearnedTable | None = None

    # --- lifecycle -----------------------------------------------------------------

    @classmethod
    def open(cls, instance: Instance | None = None, *, fresh: bool = False) -> Datapath:
        """Load the programs, or adopt the ones a previous process left: the
        pinned maps are reused as they are, so enforcement never pauses. The
        programs pinned for this build are reused as well (no compiler runs);
        ``fresh`` compiles and attaches new ones all the same."""
        instance = instance or Instance.resolve()
        probe()
        with instance_lock(instance):
            instance.agents_dir.mkdir(parents=True, exist_ok=True)
            programs = loader.load_programs(instance, fresh=fresh)
            try:
                datapath = cls(instance, programs)
                datapath._init_config()
                loader.attach_replacing(programs)
                loader.remove_stale_programs(programs)
            except BaseException:
                programs.close()
                raise
        return datapath

    @classmethod
    def inspect(cls, instance: Instance | None = None) -> Datapath:
        """Open the pinned maps of a running datapath without loading anything
        (for `ztnet agents`, `status` and other read-mostly tools)."""
        instance = instance or Instance.resolve()
        if not loader.is_enforcing(instance):
            raise NotAttached(f"datapath: instance {instance.name!r} is not loaded "
                              f"(nothing attached at {instance.cgroup_root})")
        return cls(instance, None)

    def close(self) -> None:
        self.maps.close()
        if self.programs is not None:
            self.programs.close()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _config(self) -> abi.ZtConfig:
        config = abi.ZtConfig()
        self.maps["zt_config_v1"].lookup(ctypes.c_int(0), config)
        return config

    def _init_config(self) -> None:
        config = self._config()
        if config.agent_level != self.instance.agent_level:
            config.agent_level = self.instance.agent_level
            self.maps["zt_config_v1"].update(ctypes.c_int(0), config)

    def _boot_clock(self) -> BootClock:
        """The Unix→boot-time offset, pinned at the first install after the maps
        were created and kept in zt_config (a pinned map: it lives exactly as long
        as boot time does, across daemon restarts, until teardown or reboot).
        Every install and every process converts with it, so a wall-clock step,
        either way (NTP, an operator, an attacker spoofing NTP), never moves a
        kernel deadline: a grant lapses after the time it had left when it was
        installed, as CLOCK_BOOTTIME counts it. ``clock_step_ns`` tells how far
        the wall clock has moved away since."""
        config = self._config()
        stored = int(config.reserved[abi.CFG_CLOCK_OFFSET])
        if stored:
            return BootClock(stored)
        measured = BootClock.now()
        config.reserved[abi.CFG_CLOCK_OFFSET] = measured.offset_ns
        self.maps["zt_config_v1"].update(ctypes.c_int(0), config)
        return measured

    def clock_step_ns(self) -> int:
        """Wall-clock steps since the offset was pinned (positive: stepped forward)."""
        return BootClock.now().offset_ns - self._boot_clock().offset_ns

    @property
    def generation(self) -> int:
        return int(self._config().generation) & 1

    def _advance(self, config: abi.ZtConfig, step: int) -> None:
        """Move the config word by ``step`` (1: flip to the other grant set, 2:
        same set, stamps stale) in one map update."""
        config.generation = (int(config.generation) + step) & 0xFFFFFFFF
        self.maps["zt_config_v1"].update(ctypes.c_int(0), config)

    def invalidate_stamps(self) -> None:
        """Make every socket's stamped verdict stale: the next packet of every
        flow is judged against the maps as they are now."""
        self._advance(self._config(), 2)

    def set_wakeup_every(self, records: int) -> None:
        """The allowed-side ring's wake-up policy: wake the reader with every
        ``records``-th record per CPU (0: with every record); the reader must then
        poll on a timer for the records in between."""
        config = self._config()
        config.reserved[abi.CFG_WAKEUP_RECORDS] = max(0, int(records))
        self.maps["zt_config_v1"].update(ctypes.c_int(0), config)

    # --- agents --------------------------------------------------------------------

    def _registered(self) -> dict[int, abi.ZtAgent]:
        agents = self.maps["zt_agents_v1"]
        result = {}
        for key in list(agents.keys(ctypes.c_uint64)):
            value = abi.ZtAgent()
            if agents.lookup(key, value):
                result[key.value] = value
        return result

    def _indices_in_use(self) -> set[int]:
        levels = self.grant_maps.read_levels()
        return set(levels[0]) | set(levels[1])

    def ensure_agents(self, names: Iterable[str]) -> dict[str, int]:
        """Create the agents' cgroups and give each an index in zt_agents.
        Entries of cgroups that no longer exist are dropped; their indices are
        not reused while either generation still refers to them."""
        for name in names:
            cgroups.ensure_agent_cgroup(self.instance, name)
        by_id = {cgroups.cgroup_id(path): name
                 for name, path in cgroups.agent_cgroups(self.instance).items()}
        registered = self._registered()
        agents = self.maps["zt_agents_v1"]
        stale_ids = set(registered) - set(by_id)
        for stale in stale_ids:
            agents.delete(ctypes.c_uint64(stale))
            del registered[stale]
        if stale_ids:
            self.invalidate_stamps()
        used = {agent.index for agent in registered.values()} | self._indices_in_use()
        result = {by_id[cgid]: int(agent.index) for cgid, agent in registered.items()}
        free = (index for index in range(1, abi.MAX_AGENTS) if index not in used)
        for cgid, name in sorted(by_id.items(), key=lambda item: item[1]):
            if name in result:
                continue
            index = next(free, None)
            if index is None:
                raise MapUpdateError("datapath: no free agent index", "zt_agents_v1")
            agents.update(ctypes.c_uint64(cgid), abi.ZtAgent(index, 0))
            result[name] = index
        return result

    def _set_audit(self, audit: frozenset[str], *, enable: bool) -> None:
        """Give ZT_AGENT_AUDIT to the agents in ``audit`` (``enable``) or take it from
        every other agent (not ``enable``); the other flags (quarantine) stay."""
        agents = self.maps["zt_agents_v1"]
        by_id = {cgroups.cgroup_id(path): name
                 for name, path in cgroups.agent_cgroups(self.instance).items()}
        for cgid, value in self._registered().items():
            wanted = by_id.get(cgid) in audit
            if wanted != bool(value.flags & abi.AGENT_AUDIT) and wanted == enable:
                value.flags ^= abi.AGENT_AUDIT
                agents.update(ctypes.c_uint64(cgid), value)

    def audited(self) -> frozenset[str]:
        """The agents in audit mode, read from the kernel."""
        names = self.agent_names()
        return frozenset(names[int(agent.index)] for agent in self._registered().values()
                         if agent.flags & abi.AGENT_AUDIT and int(agent.index) in names)

    def set_quarantined(self, agent: str, quarantined: bool) -> None:
        """A quarantined agent is denied everything, whatever its grants: every
        connect/sendmsg fails with EPERM (reason QUARANTINED) and the egress backstop
        drops its packets, established flows included. The agent's cgroup is created
        if missing, so an agent started later is quarantined from its first socket."""
        path = cgroups.ensure_agent_cgroup(self.instance, agent)
        self.ensure_agents([agent])
        key = ctypes.c_uint64(cgroups.cgroup_id(path))
        value = abi.ZtAgent()
        self.maps["zt_agents_v1"].lookup(key, value)
        if quarantined:
            value.flags |= abi.AGENT_QUARANTINED
        else:
            value.flags &= ~abi.AGENT_QUARANTINED
        self.maps["zt_agents_v1"].update(key, value)
        self.invalidate_stamps()

    def quarantined(self) -> set[str]:
        """Agents whose quarantine flag is set, read from the kernel."""
        by_id = {cgroups.cgroup_id(path): name
                 for name, path in cgroups.agent_cgroups(self.instance).items()}
        return {by_id[cgid] for cgid, agent in self._registered().items()
                if cgid in by_id and agent.flags & abi.AGENT_QUARANTINED}

    def set_quarantine(self, agents: Iterable[str]) -> tuple[set[str], set[str]]:
        """Make exactly ``agents`` quarantined (level-triggered: flags others set or
        cleared are put right). Returns (newly quarantined, released)."""
        wanted = set(agents)
        with instance_lock(self.instance):
            have = self.quarantined()
            for agent in sorted(wanted - have):
                self.set_quarantined(agent, True)
            for agent in sorted(have - wanted):
                self.set_quarantined(agent, False)
        return wanted - have, have - wanted

    # --- grants --------------------------------------------------------------------

    def install(self, bundle: VerifiedBundle, *, now: float | None = None) -> ApplyResult:
        """Make a verified bundle's grants the whole grant set, atomically. No
        kernel entry outlives the bundle's expiry by more than the grace
        (compile.kernel_not_after)."""
        return self._replace(bundle.grants, bundle.bundle.expires, now,
                             frozenset(bundle.bundle.audit_agents))

    def resync(self, bundle: VerifiedBundle, *, now: float | None = None) -> SyncResult:
        """Compare the generations this process knows, read from the kernel, with what
        it wrote there (and the active generation with the one it made active);
        then re-install ``bundle`` (later windows, recreated cgroups), rewriting
        both generations if anything drifted. When the trie dump has the digest
        that was last found clean, the agents are the same and no window started
        or ended, nothing is compiled, compared or written."""
        with instance_lock(self.instance):
            started = time.monotonic()
            now = time.time() if now is None else now
            raw = self.grant_maps.dump_raw()
            digest = self.grant_maps.digest(raw)
            drift = Drift()
            snapshot = None
            if digest != self._checked_digest or not self._written:
                snapshot = self.grant_maps.snapshot(raw)
                drift = self._find_drift(snapshot)
            levels = self.grant_maps.read_levels()
            for generation, written in sorted(self._written.items()):
                if levels.get(generation, {}) != dict(written.levels):
                    drift += find_drift({}, levels.get(generation, {}), {}, written.levels,
                                        f"gen {generation} ")
            if self._left is not None:  # its entries only when the dump changed
                drift += self._left.drift(
                    None if snapshot is None else snapshot.contents.get(self._left.generation, {}),
                    levels.get(self._left.generation, {}))
            if self._active is not None and self.generation != self._active:
                drift += Drift(generation=1, samples=(f"generation flipped to {self.generation}",))
            audit = frozenset(bundle.bundle.audit_agents)
            if not drift.total and self._unchanged(bundle.grants, bundle.bundle.expires, audit,
                                                   now):
                self._checked_digest = digest
                assert self._active is not None
                applied = ApplyResult(self._active, len(self._written[self._active].packed), 0,
                                      0, time.monotonic() - started)
                return SyncResult(drift, applied)
            applied = self._replace_locked(bundle.grants, bundle.bundle.expires, now,
                                           audit, repair=drift.total > 0,
                                           snapshot=snapshot or self.grant_maps.snapshot(raw))
        return SyncResult(drift, applied)

    def _find_drift(self, snapshot: Snapshot) -> Drift:
        drift = Drift()
        for generation, written in sorted(self._written.items()):
            kernel = snapshot.contents.get(generation, {})
            if kernel != written.packed:  # compared in C; decoded only to describe
                drift += find_drift(DecodedEntries(kernel), {}, written.entries, {},
                                    f"gen {generation} ")
        for generation, stray in snapshot.contents.items():
            if generation not in (0, 1) and stray:
                drift += find_drift(DecodedEntries(stray), {}, {}, {}, f"gen {generation} ")
        return drift

    def _unchanged(self, grants: tuple[Grant, ...], bundle_expires: float,
                   audit: frozenset[str], now: float) -> bool:
        """Would compiling ``grants`` now give exactly what the active generation holds?"""
        if self._active is None or self._compiled_for is None:
            return False
        active = self._written.get(self._active)
        if active is None or now >= active.valid_until:
            return False
        by_id = {cgroups.cgroup_id(path): name
                 for name, path in cgroups.agent_cgroups(self.instance).items()}
        registered = self._registered()
        if registered.keys() != by_id.keys():  # a cgroup gone, recreated or not registered
            return False
        if frozenset(by_id[cgid] for cgid, agent in registered.items()
                     if agent.flags & abi.AGENT_AUDIT) != audit:  # audit flags put right
            return False
        indices = tuple(sorted((by_id[cgid], int(agent.index))
                               for cgid, agent in registered.items()))
        return self._compiled_for == (grants, bundle_expires, audit, self._boot_clock(),
                                      indices)

    def install_unverified(self, grants: Iterable[Grant], *, now: float | None = None,
                           audit: Iterable[str] = ()) -> ApplyResult:
        """Install grants that came in no bundle, uncapped: for tests, benchmarks
        and the local lab only (tests/unit/test_verified_only.py keeps it so).
        The daemon installs nothing but verified bundles (``install``).
        ``audit``: the agents to put in audit mode (every other one enforces)."""
        return self._replace(tuple(grants), math.inf, now, frozenset(audit))

    def _replace(self, grants: tuple[Grant, ...], bundle_expires: float,
                 now: float | None, audit: frozenset[str]) -> ApplyResult:
        with instance_lock(self.instance):
            return self._replace_locked(grants, bundle_expires, now, audit, repair=False)

    def _replace_locked(self, grants: tuple[Grant, ...], bundle_expires: float,
                        now: float | None, audit: frozenset[str], *, repair: bool,
                        snapshot: Snapshot | None = None) -> ApplyResult:
        """Write the inactive generation, then flip to it. With ``repair`` the
        generation just left is rewritten too, so drift survives in neither.
        The diff is against what this process wrote there; the kernel is read
        (``snapshot``, else a dump here) only when it has written nothing yet.
        Audit mode is given before the flip and taken after it, so that, like the
        grants, the change is briefly over-permissive, never an outage."""
        started = time.monotonic()
        now = time.time() if now is None else now
        indices = self.ensure_agents({grant.agent for grant in grants} | audit)
        clock = self._boot_clock()
        index = compile_index(grants, indices, now=now, clock=clock,
                              bundle_expires=bundle_expires)
        desired = index.state()
        if len(desired.packed) > abi.MAX_ENTRIES // 2:
            raise MapUpdateError(
                f"datapath: grant set needs {len(desired.packed)} entries, "
                f"more than the {abi.MAX_ENTRIES // 2} a generation holds",
                "zt_grants_v1",
            )
        config = self._config()
        target = 1 - (int(config.generation) & 1)
        if snapshot is None and (repair or target not in self._written):
            snapshot = self.grant_maps.snapshot(generation=None if repair else target)
        self._index = None  # until the generation it describes is written and live
        written, deleted = self._write(target, desired, snapshot)
        self._set_audit(audit, enable=True)
        self._advance(config, 1)  # audited verdicts are never stamped: the flip suffices
        self._set_audit(audit, enable=False)
        self._grants, self._active, self._audit = grants, target, audit
        if repair:
            self._write(1 - target, desired, snapshot)
            self._left = None
        else:
            # What the generation just left holds is read from the kernel when it is
            # written next: kept, it was a second copy of every entry (at 100,000 grants
            # 22 MiB, for the whole life of the process). Its fingerprint is kept for the
            # resync.
            left = self._written.pop(1 - target, None)
            self._left = None if left is None else Fingerprint.of(1 - target, left.packed,
                                                                  left.levels)
        self._checked_digest = None  # the next resync compares in full, once
        self._compiled_for = (grants, bundle_expires, audit, clock,
                              tuple(sorted(indices.items())))
        self._index = index
        return ApplyResult(target, len(desired.packed), written, deleted,
                           time.monotonic() - started)

    def apply_delta(self, added: tuple[Grant, ...], revoked: tuple[Grant, ...], *,
                    bundle_expires: float, now: float | None = None) -> ApplyResult:
        """Add and revoke a few grants of the installed set (a verified delta's), writing
        only the entries they change, into the active generation, in place: every entry
        update is atomic, new entries and levels go in before what goes away is removed,
        so each entry is always the old or the new one and nothing outside the old and
        new sets together is ever allowed; then every socket's stamp goes stale, so an
        established flow a revoked grant carried is judged again at its next packet.
        ``ApplyResult.seconds`` ends when the kernel enforces the new set. The inactive
        generation is no longer known to this process (the next whole install reads it
        from the kernel). Without an index of the active set (another process installed
        it, the clock offset or an agent's index moved, or ``bundle_expires`` is not
        the installed one) the changed set is installed whole instead."""
        started = time.monotonic()
        with instance_lock(self.instance):
            now = time.time() if now is None else now
            index = self._index
            # An agent new to the set gets its cgroup and index first (a known one's
            # cgroup, if recreated meanwhile, is the resync's to register again).
            new_agents = {g.agent for g in added} - index.agent_index.keys() if index else set()
            indices = self.ensure_agents(new_agents) if new_agents else None
            config = self._config()  # one read for the live generation and the clock
            if index is None or self._active is None or self._active not in self._written \
                    or index.bundle_expires != bundle_expires \
                    or index.clock.offset_ns != int(config.reserved[abi.CFG_CLOCK_OFFSET]) \
                    or int(config.generation) & 1 != self._active \
                    or (indices is not None and any(indices.get(name) != number for name,
                                                    number in index.agent_index.items())):
                return self._replace_locked(_changed(self._grants, added, revoked),
                                            bundle_expires, now, self._audit, repair=False)
            if indices is not None:
                index.agent_index = indices
            active = self._active
            try:
                writes, deletes, levels = index.change(added, revoked, now)
                if len(index.packed) > abi.MAX_ENTRIES // 2:
                    raise MapUpdateError(
                        f"datapath: grant set needs {len(index.packed)} entries, "
                        f"more than the {abi.MAX_ENTRIES // 2} a generation holds",
                        "zt_grants_v1")
                self.grant_maps.write_changes(active, writes, deletes,
                                              dict(self._written[active].levels), levels)
            except Exception:
                # The kernel and this process's record of it may differ now: the next
                # resync dumps, compares and rewrites the set it is given, whole.
                self._index = None
                self._written.clear()
                self._left = None
                self._compiled_for = None
                raise
            self.invalidate_stamps()
            enforced = time.monotonic() - started
            if self._written.pop(1 - active, None) is not None:
                self._left = None  # it may share the dict just changed: unknown now
            self._written[active] = index.state()
            grants = self._grants = _changed(self._grants, added, revoked)
            self._checked_digest = None
            assert self._compiled_for is not None
            self._compiled_for = (grants, bundle_expires, *self._compiled_for[2:4],
                                  tuple(sorted(index.agent_index.items())))
            return ApplyResult(active, len(index.packed), len(writes), len(deletes), enforced)

    def _write(self, generation: int, desired: DesiredState,
               snapshot: Snapshot | None) -> tuple[int, int]:
        if snapshot is not None:
            current: Mapping[bytes, bytes] = snapshot.contents.get(generation, {})
            have_levels = snapshot.levels.get(generation, {})
        else:
            current, have_levels = self._written[generation].packed, dict(
                self._written[generation].levels)
        self._written.pop(generation, None)  # unknown while half written
        if self._left is not None and self._left.generation == generation:
            self._left = None
        result = self.grant_maps.write(generation, current, have_levels, desired.packed,
                                       desired.levels)
        self._written[generation] = desired
        return result

    def grants(self) -> tuple[Grant, ...]:
        """The grant set this process installed (other processes: see live_grant_ids)."""
        return self._grants

    def kernel_entries(self, generation: int | None = None) -> dict[abi.EntryKey, abi.EntryValue]:
        """One generation (default: the active one) of the grant trie, read from the kernel."""
        contents = self.grant_maps.snapshot().contents
        return dict(DecodedEntries(contents.get(
            self.generation if generation is None else generation, {})).items())

    def live_grant_ids(self) -> dict[str, set[int]]:
        """Grant ids of the active entries live now, by agent: what the kernel
        enforces, read from it (any process can ask)."""
        boot_now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        names = self.agent_names()
        active = self.generation
        result: dict[str, set[int]] = {}
        for agent, generation, value in self.grant_maps.entries():
            not_before, not_after, grant_id = value[:3]  # struct zt_grant_value's first fields
            if generation == active and not_before <= boot_now < not_after and agent in names:
                result.setdefault(names[agent], set()).add(grant_id)
        return result

    def event_reader(self, on_event: Callable[[events.KernelEvent], None] | None = None, *,
                     on_batch: Callable[[list[events.KernelEvent]], None] | None = None,
                     ) -> events.EventReader:
        """Read verdict and flow-end events (only the loading process can): each one to
        ``on_event``, or each batch to ``on_batch``."""
        if self.programs is None:
            raise NotAttached("datapath: events are read by the process that loaded the "
                              "programs (the daemon)")
        return events.EventReader([self.maps["zt_events_v1"], self.maps["zt_denials_v1"]],
                                  self._boot_clock(), on_event, on_batch=on_batch)

    def agent_drops(self) -> dict[str, dict[str, int]]:
        """Packets the egress backstop dropped, by agent and reason."""
        drops = self.maps["zt_agent_drops_v1"]
        result: dict[str, dict[str, int]] = {}
        for index, name in self.agent_names().items():
            for reason in abi.ZtReason:
                slot = index * abi.DROP_SLOTS + int(reason)
                count = sum(v.value for v in drops.percpu_values(slot, ctypes.c_uint64))
                if count:
                    result.setdefault(name, {})[reason.name] = count
        return result

    def pending_suppressed(self) -> dict[int, int]:
        """Deny events the rate limit dropped that no event has reported yet,
        by agent index."""
        budget = self.maps["zt_deny_budget_v1"]
        pending = {}
        for index in set(self._registered_indices()):
            value = abi.ZtDenyBudget()
            if budget.lookup(ctypes.c_int(index), value) and value.suppressed:
                pending[index] = int(value.suppressed)
        return pending

    def event_accounting(self) -> dict[str, eventloss.EventAccounting]:
        """What became of each agent's events that user space did not get."""
        names = self.agent_names()
        return {names[index]: value
                for index, value in eventloss.read(self.maps, names).items()}

    def _registered_indices(self) -> list[int]:
        return [int(agent.index) for agent in self._registered().values()]

    def agent_names(self) -> dict[int, str]:
        """Agent index -> name, for the agents whose cgroups exist."""
        by_id = {cgroups.cgroup_id(path): name
                 for name, path in cgroups.agent_cgroups(self.instance).items()}
        return {int(agent.index): by_id[cgid] for cgid, agent in self._registered().items()
                if cgid in by_id}

    def cut_unauthorized(self, *, now: float | None = None) -> list[sockets.FlowSocket]:
        """Destroy agent sockets whose flows the installed grants no longer allow, nor a
        learned address of a hostname grant still in force (an agent in audit mode keeps
        them, unless it is quarantined: quarantine wins, over learned addresses too)."""
        learned = self.learned()
        index = {name: agent for agent, name in self.agent_names().items()}
        resolvers = learned.resolver_ports()
        quarantined = self.quarantined()

        def learned_allows(flow: sockets.FlowSocket) -> bool:
            agent = index.get(flow.agent)
            if agent is None or flow.agent in quarantined:
                return False
            address, port = flow.remote
            if address.is_loopback and resolvers.get(agent) == port:
                return True  # a DNS exchange over TCP with the agent's own resolver
            return learned.allows(agent, flow.proto, address, port, established=True) is not None

        return sockets.cut_unauthorized(self.instance, self.grants(),
                                        time.time() if now is None else now,
                                        audited=frozenset(self._audit - quarantined),
                                        also_allowed=learned_allows)

    # --- hostname grants -----------------------------------------------------------

    def learned_in_use(self) -> Callable[[LearnedKey], bool]:
        """A predicate for LearnedTable.sweep: is a socket of the key's agent connected to
        the key's address now? (read once, here, from the agents' sockets)"""
        index = {name: agent for agent, name in self.agent_names().items()}
        connected = {(index[flow.agent], normalize_address(flow.remote[0]))
                     for flow in sockets.agent_flows(self.instance) if flow.agent in index}
        return lambda key: (key.agent, normalize_address(key.address)) in connected

    def learned(self) -> LearnedTable:
        """Learned addresses and resolver ports (ztnet.datapath.learned)."""
        if self._learned is None:
            self._learned = LearnedTable(self.maps)
        return self._learned

    def boot_deadline_ns(self, unix_seconds: float) -> int:
        """A Unix time as the kernel's CLOCK_BOOTTIME deadline, on the pinned offset that
        every grant window uses."""
        return self._boot_clock().to_boot_ns(unix_seconds)

    def live_grant_counts(self) -> dict[str, int]:
        return {agent: len(ids) for agent, ids in self.live_grant_ids().items()}

    # --- counters ------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        counters = self.maps["zt_counters_v1"]
        return {counter.name.lower(): sum(v.value for v in counters.percpu_values(
            int(counter), ctypes.c_uint64)) for counter in abi.ZtCounter}

    def agent_stats(self) -> dict[str, AgentStats]:
        registered = self._registered()
        names = {cgroups.cgroup_id(path): name
                 for name, path in cgroups.agent_cgroups(self.instance).items()}
        result = {}
        for cgid, agent in registered.items():
            if cgid not in names:
                continue
            per_cpu = self.maps["zt_agent_stats_v1"].percpu_values(int(agent.index),
                                                                   abi.ZtAgentStats)
            result[names[cgid]] = AgentStats(*(sum(getattr(v, name) for v in per_cpu)
                                               for name in AgentStats.__slots__))
        return result


def teardown(instance: Instance) -> None:
    """Remove everything the instance put in the kernel. Agents are killed
    first: taking enforcement away must never leave an agent unconfined."""
    probe()
    with instance_lock(instance):
        cgroups.kill_all(instance.cgroup_root)
        loader.detach_all(instance)
        loader.remove_pins(instance)
        cgroups.remove_tree(instance.cgroup_root)
    uids.release_instance(instance)  # its agents are gone: their dynamic uids are free
    # grants.json: written by earlier versions; never read, never a source of truth
    for leftover in (instance.run_dir / "grants.json", instance.lock_path):
        leftover.unlink(missing_ok=True)
    try:
        instance.run_dir.rmdir()
    except OSError:
        pass


def _changed(grants: tuple[Grant, ...], added: tuple[Grant, ...],
             revoked: tuple[Grant, ...]) -> tuple[Grant, ...]:
    """``grants`` without ``revoked``, then ``added``: the order a delta's result keeps
    (ztnet.grants.delta.VerifiedDelta.apply_to), so that the two compare by identity."""
    gone = frozenset(grant.grant_id for grant in revoked)
    return tuple(grant for grant in grants if grant.grant_id not in gone) + added
