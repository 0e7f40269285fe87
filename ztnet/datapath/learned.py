"""The kernel side of hostname grants: learned addresses and resolver ports.

``zt_learned_v1`` holds, per agent, the addresses ztnet's resolver handed it, each with
two CLOCK_BOOTTIME deadlines: new connects until ``not_after_ns`` (the answer's TTL,
floored, capped by the grant), packets of admitted sockets until ``grant_not_after_ns``
(the grant's end in the kernel). Only the daemon's resolver writes here, after it decided
an answer; the agent never can (bpffs is root's), and a reply it forges to itself is never
read by anything. Entries lapse in the kernel on their own; ``sweep`` only frees the room.

The map is shared by every agent of the host, so no agent may fill it: ``add`` holds each
agent to a cap of entries (the resolver's ``max_entries_per_agent``), and ``sweep`` frees an
entry once its answer has lapsed and no socket of that agent is connected to its address,
even while its grant lives on (renewals extend the grant, and without this an agent's
entries would only ever accumulate).

``zt_resolvers_v1`` holds each agent's resolver port (loopback). It is written only after
the resolver's sockets are bound, so the redirect never points at nothing, and it is
pinned, so a restarted daemon binds the same ports again.
"""

from __future__ import annotations

import ctypes
import ipaddress
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ztnet.datapath import abi
from ztnet.datapath.bpfsys import PinnedMap
from ztnet.grants.model import IPAddress, normalize_address


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


@dataclass(frozen=True, slots=True, order=True)
class LearnedKey:
    """struct zt_learned_key: agent index, protocol (0 any), address, port (0 any)."""

    agent: int
    proto: int
    address: IPAddress
    port: int

    def to_c(self) -> abi.ZtLearnedKey:
        key = abi.ZtLearnedKey()
        address = normalize_address(self.address)
        key.agent = self.agent
        key.proto = self.proto
        key.family = abi.ZtFamily.V4 if address.version == 4 else abi.ZtFamily.V6
        key.port_be = abi.port_to_be(self.port)
        packed = address.packed
        ctypes.memmove(key.addr, packed, len(packed))
        return key

    @classmethod
    def from_c(cls, key: abi.ZtLearnedKey) -> LearnedKey:
        length = 4 if key.family == abi.ZtFamily.V4 else 16
        address = ipaddress.ip_address(bytes(key.addr)[:length])
        return cls(int(key.agent), int(key.proto), address, abi.port_from_be(key.port_be))


@dataclass(frozen=True, slots=True)
class LearnedValue:
    """struct zt_learned_value."""

    not_after_ns: int
    grant_not_after_ns: int
    grant_id: int

    def to_c(self) -> abi.ZtLearnedValue:
        return abi.ZtLearnedValue(self.not_after_ns, self.grant_not_after_ns, self.grant_id, 0)

    @classmethod
    def from_c(cls, value: abi.ZtLearnedValue) -> LearnedValue:
        return cls(int(value.not_after_ns), int(value.grant_not_after_ns), int(value.grant_id))


class LearnedTable:
    """zt_learned_v1 and zt_resolvers_v1 of one instance. Thread-safe: the resolver's
    workers add entries concurrently; one lock makes each read-modify-write whole."""

    def __init__(self, maps: Mapping[str, PinnedMap]) -> None:
        self._learned = maps["zt_learned_v1"]
        self._resolvers = maps["zt_resolvers_v1"]
        self._learned.check_layout(abi.ZtLearnedKey, abi.ZtLearnedValue)
        self._resolvers.check_layout(ctypes.c_int, abi.ZtResolver)
        self._lock = threading.Lock()
        # entries per agent index in the kernel: pinned entries of an earlier run count too
        self._held: Counter[int] = Counter(key.agent for key in self._keys())

    # --- resolver ports ------------------------------------------------------------------

    def resolver_ports(self) -> dict[int, int]:
        """Agent index -> resolver port, for the agents that have one."""
        keys, values = self._resolvers.dump()  # one batch read: 4,096 lookups cost 80 ms
        ports = {}
        slots = zip(struct.iter_unpack("=i", keys), struct.iter_unpack("=HHI", values),
                    strict=True)
        for (index,), (port_be, _pad, _flags) in slots:
            if port_be:
                ports[index] = abi.port_from_be(port_be)
        return ports

    def set_resolver_port(self, agent: int, port: int, *, names: bool = True) -> None:
        """0 removes it (the agent's DNS is then denied). ``names``: the agent holds
        hostname grants; without them the hooks skip its learned-address lookups, so
        it must be True before the resolver hands that agent any address."""
        flags = 0 if names else abi.RESOLVER_NO_NAMES
        self._resolvers.update(ctypes.c_int(agent),
                               abi.ZtResolver(abi.port_to_be(port), 0, flags))

    # --- learned addresses ---------------------------------------------------------------

    def add(self, entries: Mapping[LearnedKey, LearnedValue], *,
            per_agent: int | None = None) -> frozenset[LearnedKey]:
        """Install ``entries``; where one is already there, each deadline becomes the later
        of the two (another answer, or another grant, may have promised longer). A new
        entry that would take its agent past ``per_agent`` entries is left out; returns
        those left out. MapUpdateError (a full table) leaves what was written so far:
        those entries are valid, only unused."""
        refused = set()
        with self._lock:
            for key, value in entries.items():
                c_key = key.to_c()
                have = abi.ZtLearnedValue()
                if not self._learned.lookup(c_key, have):
                    if per_agent is not None and self._held[key.agent] >= per_agent:
                        refused.add(key)
                        continue
                    self._learned.update(c_key, value.to_c())
                    self._held[key.agent] += 1
                    continue
                # two grants may cover one address (shared CDN edges): it is allowed while
                # either is, and reported under the longer-lived one
                longer = int(have.grant_id) if int(have.grant_not_after_ns) > \
                    value.grant_not_after_ns else value.grant_id
                value = LearnedValue(max(value.not_after_ns, int(have.not_after_ns)),
                                     max(value.grant_not_after_ns,
                                         int(have.grant_not_after_ns)), longer)
                self._learned.update(c_key, value.to_c())
        return frozenset(refused)

    def held(self, agent: int) -> int:
        """How many entries ``agent`` holds in the kernel."""
        with self._lock:
            return self._held[agent]

    def _keys(self) -> list[LearnedKey]:
        return [LearnedKey.from_c(c_key) for c_key in self._learned.keys(abi.ZtLearnedKey)]

    def entries(self) -> dict[LearnedKey, LearnedValue]:
        result = {}
        for c_key in list(self._learned.keys(abi.ZtLearnedKey)):
            value = abi.ZtLearnedValue()
            if self._learned.lookup(c_key, value):
                result[LearnedKey.from_c(c_key)] = LearnedValue.from_c(value)
        return result

    def allows(self, agent: int, proto: int, address: IPAddress, port: int, *,
               established: bool, now_ns: int | None = None) -> int | None:
        """What the kernel would say (zt_learned_allowed): the grant id, or None."""
        now_ns = boot_ns() if now_ns is None else now_ns
        for key_proto in (proto, 0):
            for key_port in (port, 0):
                value = abi.ZtLearnedValue()
                if self._learned.lookup(LearnedKey(agent, key_proto, address, key_port).to_c(),
                                        value):
                    until = value.grant_not_after_ns if established else value.not_after_ns
                    if now_ns < until:
                        return int(value.grant_id)
        return None

    def prune(self, keep: Callable[[LearnedKey, LearnedValue], LearnedValue | None]) -> int:
        """Rewrite or delete every entry: ``keep`` returns the value to hold (the same, or
        a new one) or None to delete. Returns how many entries were deleted."""
        deleted = 0
        with self._lock:
            for key, value in self.entries().items():
                new = keep(key, value)
                if new is None:
                    if self._learned.delete(key.to_c()):
                        self._held[key.agent] -= 1
                    deleted += 1
                elif new != value:
                    self._learned.update(key.to_c(), new.to_c())
        return deleted

    def sweep(self, now_ns: int | None = None, *,
              in_use: Callable[[LearnedKey], bool] | None = None) -> int:
        """Delete the entries the kernel no longer honours at all (past the grant), and,
        given ``in_use`` (is a socket of the key's agent connected to its address?), those
        whose answer has lapsed and that no socket needs."""
        now_ns = boot_ns() if now_ns is None else now_ns

        def keep(key: LearnedKey, value: LearnedValue) -> LearnedValue | None:
            if value.grant_not_after_ns <= now_ns:
                return None
            if in_use is not None and value.not_after_ns <= now_ns and not in_use(key):
                return None
            return value

        return self.prune(keep)

    def reconcile(self, grant_ends_ns: Mapping[int, int], agents: Iterable[int]) -> int:
        """After a bundle: entries of grants no longer in force, or of agents no longer
        registered, go; the others follow their grant's end in the kernel, both ways (a
        renewal extends established sockets, a shorter window cuts them)."""
        registered = set(agents)

        def keep(key: LearnedKey, value: LearnedValue) -> LearnedValue | None:
            end = grant_ends_ns.get(value.grant_id)
            if end is None or key.agent not in registered:
                return None
            return LearnedValue(min(value.not_after_ns, end), end, value.grant_id)

        return self.prune(keep)
