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
from collections.abc import Iterable, Iterator, Mapping
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
from ztnet.grants.model import Grant, PortRange

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
    grants that came in none, as in tests). Networks are handled as (packed
    address, prefix length) pairs: this loop runs once per grant, and
    ipaddress objects are slow to hash and to mask."""
    # group key: (agent, proto, family, port_bits, port) -> (address, length) -> windows
    groups: dict[tuple[int, int, int, int, int], dict[tuple[bytes, int], list[_Window]]] = (
        defaultdict(lambda: defaultdict(list))
    )
    blocks_of: dict[PortRange | None, list[tuple[int, int]]] = {None: [(0, 0)]}
    cutoff = bundle_expires + BUNDLE_GRACE_SECONDS  # kernel_not_after, inlined
    valid_until = math.inf
    # The byte budgets of the grants that have one, as the kernel entry carries them: an
    # entry gets the budgets of the grant it reports (the most specific one live).
    budgets: dict[int, tuple[int, int, int]] = {}
    for grant in grants:
        try:
            agent = agent_index[grant.agent]
        except KeyError:
            raise DatapathError(f"datapath: agent {grant.agent!r} has no index") from None
        if grant.budget is not None:
            budgets[grant.grant_id] = (grant.budget.max_bytes_out,
                                       grant.budget.max_bytes_out_window,
                                       grant.budget.window * 1_000_000_000)
        network = grant.network
        blocks = blocks_of.get(grant.ports)
        if blocks is None:
            assert grant.ports is not None
            blocks = blocks_of[grant.ports] = port_blocks(grant.ports.first, grant.ports.last)
        not_before = grant.not_before
        not_after = grant.not_after if grant.not_after < cutoff else cutoff
        if not_after <= not_before:
            continue  # starts after its bundle stops counting: never installed
        if not_after > now:
            boundary = not_before if not_before > now else not_after
            if boundary < valid_until:
                valid_until = boundary
        prefixlen = network.prefixlen
        window = (not_before, not_after, grant.grant_id, prefixlen)
        where = (network.network_address.packed, prefixlen)
        proto = int(grant.proto)
        family = 4 if network.version == 4 else 6
        for port, bits in blocks:
            groups[(agent, proto, family, bits, port)][where].append(window)

    entries: dict[bytes, bytes] = {}
    levels: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    offset = clock.offset_ns
    pack_key, pack_value = pack_grant_key, pack_grant_value
    for (agent, proto, family, bits, port), networks in groups.items():
        prefix_lengths = sorted({length for _, length in networks})
        used = False
        for (address, length), own in networks.items():
            if len(prefix_lengths) == 1:
                candidates = own  # nothing in this group covers anything else
            else:
                candidates = []
                for shorter in prefix_lengths:
                    if shorter > length:
                        break
                    covering = (_mask(address, shorter), shorter) if shorter < length \
                        else (address, length)
                    candidates.extend(networks.get(covering, ()))
            chosen = _choose_window(candidates, now)
            if chosen is None:
                continue
            start, stop = chosen[0], chosen[1]  # BootClock.to_boot_ns, inlined for this loop
            start_ns = U64_MAX if start == math.inf else max(0, int(start * 1e9) - offset)
            stop_ns = U64_MAX if stop == math.inf else max(0, int(stop * 1e9) - offset)
            entries[pack_key(agent, proto, family, bits, port, address, length)] = pack_value(
                min(start_ns, U64_MAX), min(stop_ns, U64_MAX), chosen[2],
                *budgets.get(chosen[2], _NO_BUDGET))
            used = True
        if used:
            levels[agent][PROTO_CLASS[ZtProto(proto)]] |= 1 << bits
    return DesiredState(entries, {agent: (m[0], m[1], m[2], m[3]) for agent, m in levels.items()},
                        valid_until)


def _mask(address: bytes, length: int) -> bytes:
    """``address`` with all but its first ``length`` bits cleared."""
    width = 8 * len(address)
    value = int.from_bytes(address, "big") >> (width - length) << (width - length)
    return value.to_bytes(len(address), "big")
