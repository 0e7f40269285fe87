"""Grants → the exact contents the kernel's maps must hold (pure, no bcc).

Two kernel limits shape this:

* An LPM key can only end in a prefix, and it ends in the address. A port
  range is therefore split into aligned power-of-two blocks, one entry per
  block, and the program looks up each block size the agent uses.
* An LPM lookup returns only the longest matching prefix. So that one hit
  answers "does any grant allow this", every entry carries the validity
  windows of all grants whose prefix covers it (systemd's bpf-firewall folds
  parent rules into leaves the same way).

One entry has one window. Overlapping windows merge exactly; when windows
on the same entry are disjoint, the one that is live now (else the next one
to start) is installed, which is always the safe side: the daemon installs
the later window when its turn comes, and nothing is ever allowed early.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from ztnet.datapath.abi import (
    PROTO_CLASS,
    EntryKey,
    EntryValue,
    ZtProto,
    pack_grant_key,
    pack_grant_value,
)
from ztnet.errors import DatapathError
from ztnet.grants.model import Grant, IPNetwork, PortRange

U64_MAX = 2**64 - 1
# How long a kernel entry may outlive the bundle that carried it. Every entry
# ends at min(grant not_after, bundle expires + BUNDLE_GRACE_SECONDS), so whoever
# blocks the controller channel holds back a revocation for at most the
# bundle's remaining freshness plus this, never for a grant's whole ttl. The
# controller renews a bundle at half its lifetime, so in normal operation the
# next bundle is in long before; the grace only absorbs a renewal that is late
# by a few seconds (a controller restart, clock skew between controller and host).
BUNDLE_GRACE_SECONDS = 60.0


def kernel_not_after(grant_not_after: float, bundle_expires: float) -> float:
    """When the kernel stops honouring a grant: the one place this is decided."""
    return min(grant_not_after, bundle_expires + BUNDLE_GRACE_SECONDS)


@dataclass(frozen=True, slots=True)
class BootClock:
    """Converts Unix time to CLOCK_BOOTTIME nanoseconds, the clock the BPF
    programs read (bpf_ktime_get_boot_ns): it never jumps with the wall clock
    and keeps counting through suspend."""

    offset_ns: int  # unix_ns - boot_ns

    @classmethod
    def now(cls) -> BootClock:
        return cls(time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME))

    def to_boot_ns(self, unix_seconds: float) -> int:
        if unix_seconds == float("inf"):
            return U64_MAX
        return max(0, min(U64_MAX, int(unix_seconds * 1e9) - self.offset_ns))


def port_blocks(first: int, last: int) -> list[tuple[int, int]]:
    """Split [first, last] into aligned blocks: (start, prefix bits)."""
    blocks = []
    port = first
    while port <= last:
        size = port & -port if port else 1 << 16
        while size > last - port + 1:
            size >>= 1
        blocks.append((port, 17 - size.bit_length()))
        port += size
    return blocks


class DecodedEntries(Mapping[EntryKey, EntryValue]):
    """A read-only view of packed entries as EntryKey -> EntryValue (for tests,
    logs and tools; the install path works on the packed bytes)."""

    def __init__(self, packed: Mapping[bytes, bytes]) -> None:
        self._packed = packed

    def __getitem__(self, key: EntryKey) -> EntryValue:
        return EntryValue.unpack(self._packed[key.packed()])

    def __iter__(self) -> Iterator[EntryKey]:
        return (EntryKey.unpack(raw)[1] for raw in self._packed)

    def __len__(self) -> int:
        return len(self._packed)


@dataclass(frozen=True, slots=True)
class DesiredState:
    """What one generation of the grant maps must contain (built whole by
    ``compile_desired_state``, never changed afterwards). ``packed``: struct
    zt_grant_key bytes (generation 0) -> struct zt_grant_value bytes.
    ``valid_until``: compiling the same grants again gives the same state until
    then (the next time any window starts or ends)."""

    packed: Mapping[bytes, bytes]
    # agent index -> masks indexed by ZtClass
    levels: Mapping[int, tuple[int, int, int, int]]
    valid_until: float = math.inf

    @property
    def entries(self) -> Mapping[EntryKey, EntryValue]:
        return DecodedEntries(self.packed)


# a validity window: (not_before, not_after, grant_id, prefixlen), Unix seconds
_Window = tuple[float, float, int, int]


def _choose_window(windows: list[_Window], now: float) -> _Window | None:
    """Merge overlapping windows; keep the merged one live at ``now`` (else the
    next to start). Reported grant id: the most specific grant live in it."""
    if len(windows) == 1:  # the common case: one grant for this entry
        return windows[0] if windows[0][1] > now else None
    ordered = sorted(windows)
    merged: list[list[_Window]] = []
    end = float("-inf")
    for window in ordered:
        if merged and window[0] <= end:
            merged[-1].append(window)
            end = max(end, window[1])
        else:
            merged.append([window])
            end = window[1]
    for group in merged:
        start = group[0][0]
        stop = max(w[1] for w in group)
        if stop <= now:
            continue
        live = [w for w in group if w[0] <= now < w[1]] or group
        best = min(live, key=lambda w: (-w[3], w[2]))
        return (start, stop, best[2], best[3])
    return None


_NO_BUDGET = (0, 0, 0)

# (agent index, proto, family, port prefix bits, port): the entries one level lookup finds
GroupKey = tuple[int, int, int, int, int]
# (network address << 8 | prefix length): one entry of a group. Held once per grant, so
# an int (32 bytes for IPv4) rather than a (packed address, length) tuple (93 bytes).
Where = int


def _where(network: IPNetwork) -> Where:
    return int(network.network_address) << 8 | network.prefixlen


def _masked(where: Where, length: int, width: int) -> Where:
    """The entry of prefix ``length`` that covers ``where`` (``width``: address bits)."""
    drop = width - length
    return (where >> 8 + drop << drop) << 8 | length


class _Group:
    """The grants behind one group's entries, by the network they name: a lone grant
    is held as itself, several as a list (most networks have one grant, and a list
    costs more than 100 bytes per network at 100,000 of them)."""

    __slots__ = ("installed", "lengths", "networks", "width")

    def __init__(self, family: int) -> None:
        self.networks: dict[Where, Grant | list[Grant]] = {}
        self.lengths: dict[int, int] = {}  # prefix length -> networks of that length
        self.installed = 0  # entries of this group in the compiled state
        self.width = 32 if family == 4 else 128

    def at(self, where: Where) -> Sequence[Grant]:
        """The grants that name ``where`` exactly."""
        own = self.networks.get(where)
        if own is None:
            return ()
        return own if isinstance(own, list) else (own,)

    def add(self, where: Where, grant: Grant) -> None:
        own = self.networks.get(where)
        if own is None:
            self.networks[where] = grant
            length = where & 0xFF
            self.lengths[length] = self.lengths.get(length, 0) + 1
        elif isinstance(own, list):
            own.append(grant)
        else:
            self.networks[where] = [own, grant]

    def remove(self, where: Where, grant_id: int) -> None:
        kept = [grant for grant in self.at(where) if grant.grant_id != grant_id]
        if len(kept) > 1:
            self.networks[where] = kept
        elif kept:
            self.networks[where] = kept[0]
        else:
            del self.networks[where]
            length = where & 0xFF
            self.lengths[length] -= 1
            if not self.lengths[length]:
                del self.lengths[length]

    def covered(self, where: Where) -> list[Where]:
        """``where`` (whether or not a grant still names it) and the networks of this
        group inside it: the entries whose windows a grant on ``where`` is part of."""
        length = where & 0xFF
        if not any(longer > length for longer in self.lengths):
            return [where]
        return [where] + [other for other in self.networks
                          if other & 0xFF > length
                          and _masked(other, length, self.width) == where]


class GrantIndex:
    """The compiled state of one grant set and the grants behind each of its entries,
    kept so that a change of a few grants recomputes only the entries they touch
    (``change``) and gives the same state as compiling the changed set whole."""

    def __init__(self, agent_index: Mapping[str, int], *, clock: BootClock,
                 bundle_expires: float) -> None:
        self.agent_index = dict(agent_index)
        self.clock = clock
        self.bundle_expires = bundle_expires
        self.cutoff = bundle_expires + BUNDLE_GRACE_SECONDS  # kernel_not_after, inlined
        self.groups: dict[GroupKey, _Group] = {}
        # The byte budgets of the grants that have one, as the kernel entry carries them:
        # an entry gets the budgets of the grant it reports (the most specific one live).
        self.budgets: dict[int, tuple[int, int, int]] = {}
        self.packed: dict[bytes, bytes] = {}
        self.levels: dict[int, tuple[int, int, int, int]] = {}
        self.valid_until = math.inf
        self._blocks_of: dict[PortRange | None, list[tuple[int, int]]] = {None: [(0, 0)]}

    def _places(self, grant: Grant, now: float) -> list[tuple[GroupKey, Where]]:
        """Where ``grant`` goes; nothing if it starts after its bundle stops counting."""
        try:
            agent = self.agent_index[grant.agent]
        except KeyError:
            raise DatapathError(f"datapath: agent {grant.agent!r} has no index") from None
        not_after = grant.not_after if grant.not_after < self.cutoff else self.cutoff
        if not_after <= grant.not_before:
            return []  # never installed
        if not_after > now:
            boundary = grant.not_before if grant.not_before > now else not_after
            if boundary < self.valid_until:
                self.valid_until = boundary
        blocks = self._blocks_of.get(grant.ports)
        if blocks is None:
            assert grant.ports is not None
            blocks = self._blocks_of[grant.ports] = port_blocks(grant.ports.first,
                                                                grant.ports.last)
        network = grant.network
        where = _where(network)
        proto, family = int(grant.proto), 4 if network.version == 4 else 6
        return [((agent, proto, family, bits, port), where) for port, bits in blocks]

    def _add(self, grant: Grant, now: float) -> list[tuple[GroupKey, Where]]:
        places = self._places(grant, now)
        if places and grant.budget is not None:
            self.budgets[grant.grant_id] = (grant.budget.max_bytes_out,
                                            grant.budget.max_bytes_out_window,
                                            grant.budget.window * 1_000_000_000)
        groups = self.groups
        for key, where in places:
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group(key[2])
            group.add(where, grant)
        return places

    def build(self, grants: Iterable[Grant], now: float) -> None:
        """Compile ``grants`` whole (into an empty index)."""
        for grant in grants:
            self._add(grant, now)
        for key, group in self.groups.items():
            for where in group.networks:
                self._settle(key, group, where, now)
        self.levels = self._levels_of(self.agent_index.values())

    def change(self, added: Iterable[Grant], revoked: Iterable[Grant], now: float,
               ) -> tuple[dict[bytes, bytes], list[bytes], dict[int, tuple[int, int, int, int]]]:
        """Revoke and add grants; returns what the kernel must change: entries to write,
        entries to delete, and the new level masks of the agents concerned."""
        touched: dict[GroupKey, set[Where]] = defaultdict(set)
        for grant in revoked:
            self.budgets.pop(grant.grant_id, None)
            for key, where in self._places(grant, now):
                group = self.groups.get(key)
                if group is not None and where in group.networks:
                    group.remove(where, grant.grant_id)
                    touched[key].add(where)
        for grant in added:
            for key, where in self._add(grant, now):
                touched[key].add(where)
        writes: dict[bytes, bytes] = {}
        deletes: list[bytes] = []
        for key, wheres in touched.items():
            group = self.groups.get(key)
            if group is None:
                continue
            affected: set[Where] = set()
            for where in wheres:
                affected.update(group.covered(where))
            for where in affected:
                packed_key, value, previous = self._settle(key, group, where, now)
                if value is None:
                    if previous is not None:
                        deletes.append(packed_key)
                elif value != previous:
                    writes[packed_key] = value
            if not group.networks:
                del self.groups[key]
        agents = {key[0] for key in touched}
        levels = self._levels_of(agents)
        for agent in agents:
            if agent in levels:
                self.levels[agent] = levels[agent]
            else:
                self.levels.pop(agent, None)
        return writes, deletes, {agent: levels.get(agent, (0, 0, 0, 0)) for agent in agents}

    def _settle(self, key: GroupKey, group: _Group, where: Where,
                now: float) -> tuple[bytes, bytes | None, bytes | None]:
        """Recompute one entry from the grants that cover it; record it in ``packed``.
        Returns its packed key, its value and the value it had (None: not there)."""
        agent, proto, family, bits, port = key
        length = where & 0xFF
        packed_key = pack_grant_key(agent, proto, family, bits, port,
                                    (where >> 8).to_bytes(group.width // 8, "big"), length)
        cutoff = self.cutoff
        own = group.at(where)
        if not own:
            covering: Iterable[Grant] = ()  # entries sit only where some grant names them
        elif len(group.lengths) == 1:
            covering = own  # nothing in this group covers anything else
        else:
            covering = []
            for shorter in sorted(group.lengths):
                if shorter > length:
                    break
                at = _masked(where, shorter, group.width) if shorter < length else where
                covering.extend(group.at(at))
        windows = [(grant.not_before, grant.not_after if grant.not_after < cutoff else cutoff,
                    grant.grant_id, grant.network.prefixlen) for grant in covering]
        chosen = _choose_window(windows, now) if windows else None
        previous = self.packed.get(packed_key)
        if chosen is None:
            if previous is not None:
                del self.packed[packed_key]
                group.installed -= 1
            return packed_key, None, previous
        start, stop = chosen[0], chosen[1]  # BootClock.to_boot_ns, inlined for this loop
        offset = self.clock.offset_ns
        start_ns = U64_MAX if start == math.inf else max(0, int(start * 1e9) - offset)
        stop_ns = U64_MAX if stop == math.inf else max(0, int(stop * 1e9) - offset)
        value = pack_grant_value(min(start_ns, U64_MAX), min(stop_ns, U64_MAX), chosen[2],
                                 *self.budgets.get(chosen[2], _NO_BUDGET))
        if previous is None:
            group.installed += 1
        self.packed[packed_key] = value
        return packed_key, value, previous

    def _levels_of(self, agents: Iterable[int]) -> dict[int, tuple[int, int, int, int]]:
        """The level masks of ``agents``: a port-prefix size is looked up for an agent
        when some entry of that size is installed for it."""
        wanted = set(agents)
        masks: dict[int, list[int]] = {}
        for (agent, proto, _family, bits, _port), group in self.groups.items():
            if agent in wanted and group.installed:
                mask = masks.setdefault(agent, [0, 0, 0, 0])
                mask[PROTO_CLASS[ZtProto(proto)]] |= 1 << bits
        return {agent: (m[0], m[1], m[2], m[3]) for agent, m in masks.items()}

    def state(self) -> DesiredState:
        return DesiredState(self.packed, dict(self.levels), self.valid_until)


def compile_desired_state(
    grants: Iterable[Grant],
    agent_index: Mapping[str, int],
    *,
    now: float,
    clock: BootClock,
    bundle_expires: float,
) -> DesiredState:
    """The entries for ``grants``, each window ending by ``kernel_not_after``
    (``bundle_expires`` is the expiry of the bundle that carried them; inf for
    grants that came in none, as in tests)."""
    return compile_index(grants, agent_index, now=now, clock=clock,
                         bundle_expires=bundle_expires).state()


def compile_index(grants: Iterable[Grant], agent_index: Mapping[str, int], *, now: float,
                  clock: BootClock, bundle_expires: float) -> GrantIndex:
    """compile_desired_state, keeping the index a later change works on. Networks are
    handled as (packed address, prefix length) pairs: ipaddress objects are slow to hash
    and to mask."""
    index = GrantIndex(agent_index, clock=clock, bundle_expires=bundle_expires)
    index.build(grants, now)
    return index
