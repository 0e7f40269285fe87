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

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ztnet.datapath.abi import PROTO_CLASS, EntryKey, EntryValue, ZtFamily, ZtProto
from ztnet.errors import DatapathError
from ztnet.grants.model import Grant, IPNetwork

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


@dataclass(frozen=True, slots=True)
class DesiredState:
    """What one generation of the grant maps must contain (built whole by
    ``compile_desired_state``, never changed afterwards)."""

    entries: Mapping[EntryKey, EntryValue]
    # agent index -> masks indexed by ZtClass
    levels: Mapping[int, tuple[int, int, int, int]]


@dataclass(frozen=True, slots=True)
class _Window:
    not_before: float
    not_after: float
    grant_id: int
    prefixlen: int


def _choose_window(windows: list[_Window], now: float) -> _Window | None:
    """Merge overlapping windows; keep the merged one live at ``now`` (else the
    next to start). Reported grant id: the most specific grant live in it."""
    ordered = sorted(windows, key=lambda w: (w.not_before, w.not_after))
    merged: list[list[_Window]] = []
    end = float("-inf")
    for window in ordered:
        if merged and window.not_before <= end:
            merged[-1].append(window)
            end = max(end, window.not_after)
        else:
            merged.append([window])
            end = window.not_after
    for group in merged:
        start = group[0].not_before
        stop = max(w.not_after for w in group)
        if stop <= now:
            continue
        live = [w for w in group if w.not_before <= now < w.not_after] or group
        best = min(live, key=lambda w: (-w.prefixlen, w.grant_id))
        return _Window(start, stop, best.grant_id, best.prefixlen)
    return None


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
    # group key: (agent, proto, family, port_bits, port) -> network -> windows
    groups: dict[tuple[int, int, int, int, int], dict[IPNetwork, list[_Window]]] = (
        defaultdict(lambda: defaultdict(list))
    )
    for grant in grants:
        try:
            agent = agent_index[grant.agent]
        except KeyError:
            raise DatapathError(f"datapath: agent {grant.agent!r} has no index") from None
        family = int(ZtFamily.V4 if grant.network.version == 4 else ZtFamily.V6)
        blocks = [(0, 0)] if grant.ports is None else port_blocks(
            grant.ports.first, grant.ports.last
        )
        not_after = kernel_not_after(grant.not_after, bundle_expires)
        if not_after <= grant.not_before:
            continue  # starts after its bundle stops counting: never installed
        window = _Window(grant.not_before, not_after, grant.grant_id, grant.network.prefixlen)
        for port, bits in blocks:
            groups[(agent, int(grant.proto), family, bits, port)][grant.network].append(window)

    entries: dict[EntryKey, EntryValue] = {}
    levels: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for (agent, proto, family, bits, port), networks in groups.items():
        prefix_lengths = sorted({n.prefixlen for n in networks})
        for network in networks:
            candidates: list[_Window] = []
            for length in prefix_lengths:
                if length > network.prefixlen:
                    break
                covering = network.supernet(new_prefix=length) if length < network.prefixlen \
                    else network
                candidates.extend(networks.get(covering, ()))
            chosen = _choose_window(candidates, now)
            if chosen is None:
                continue
            key = EntryKey(agent, proto, family, bits, port,
                           network.network_address.packed, network.prefixlen)
            entries[key] = EntryValue(
                clock.to_boot_ns(chosen.not_before),
                clock.to_boot_ns(chosen.not_after),
                chosen.grant_id,
            )
            levels[agent][PROTO_CLASS[ZtProto(proto)]] |= 1 << bits
    return DesiredState(entries, {agent: (m[0], m[1], m[2], m[3]) for agent, m in levels.items()})

