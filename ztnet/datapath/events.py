"""Decoding the kernel's verdict and flow-end events (zt_events_v1; deny events
have their own ring, zt_denials_v1).

The ring buffers are read by the process that attached the programs (the
daemon), through their pins and memory maps (``bpfsys.MappedRing``; no bcc in
the daemon): ``EventReader`` copies each run of records at once and turns it
into ``KernelEvent`` tuples with Unix times (``Decoder``, one
``struct.iter_unpack`` per run). Everything user-facing (agent names, grant
metadata, process paths) is added by ztnet.observe.
"""

from __future__ import annotations

import ctypes
import select
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from ztnet.datapath import abi
from ztnet.datapath.bpfsys import RINGBUF_HEADER, MappedRing, PinnedMap
from ztnet.datapath.compile import BootClock

# events decoded and handed on at once, at most
READ_BATCH = 1024
# batches read from one ring per EventReader.poll, at most
_BATCHES_PER_POLL = 16


class KernelEvent(NamedTuple):
    """One decoded event (a tuple: built at the ring buffer's rate, so it must be cheap)."""

    kind: abi.ZtEventKind
    verdict: abi.ZtVerdict
    reason: abi.ZtReason
    time: float
    cookie: int
    cgroup_id: int
    grant_id: int
    agent_index: int
    pid: int
    tgid: int
    uid: int
    comm: str
    proto: int
    family: int
    source: str
    source_port: int
    destination: str
    destination_port: int
    suppressed: int
    packets_out: int
    bytes_out: int
    packets_in: int
    bytes_in: int
    first_seen: float
    last_seen: float
    cut: bool = False  # ZT_EVF_CUT: the record of a flow a byte budget cut


def struct_layout(ctype: type[ctypes.Structure]) -> tuple[struct.Struct, tuple[str, ...]]:
    """A little-endian ``struct`` format with the same offsets as ``ctype`` (nested
    structures flattened, byte arrays as ``Ns``, padding as ``x``), and the flat field
    names (``flow.pid``). Derived from abi.py, so it follows the ABI mirror."""
    codes = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I",
             ctypes.c_uint64: "Q", ctypes.c_int32: "i", ctypes.c_int64: "q"}
    fmt: list[str] = []
    names: list[str] = []

    def walk(struct_type: Any, base: int, prefix: str, at: int) -> int:
        for name, ftype in struct_type._fields_:
            offset = base + getattr(struct_type, name).offset
            if offset > at:
                fmt.append(f"{offset - at}x")
            size = ctypes.sizeof(ftype)
            if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
                at = walk(ftype, offset, f"{prefix}{name}.", offset)
                continue
            if isinstance(ftype, type) and issubclass(ftype, ctypes.Array):
                fmt.append(f"{size}s")
            else:
                fmt.append(codes[ftype])
            names.append(prefix + name)
            at = offset + size
        return at

    end = walk(ctype, 0, "", 0)
    if end < ctypes.sizeof(ctype):
        fmt.append(f"{ctypes.sizeof(ctype) - end}x")
    layout = struct.Struct("<" + "".join(fmt))
    if layout.size != ctypes.sizeof(ctype):
        raise AssertionError(f"struct layout of {ctype.__name__}: {layout.size} bytes, "
                             f"ctypes says {ctypes.sizeof(ctype)}")
    return layout, tuple(names)


EVENT_LAYOUT, EVENT_FIELDS = struct_layout(abi.ZtEvent)
_SIZE = EVENT_LAYOUT.size
# a record as the ring holds it: the ring's header (its length; the page offset skipped),
# the event, padding to 8 bytes
RING_LAYOUT = struct.Struct(
    f"<I{RINGBUF_HEADER - 4}x{EVENT_LAYOUT.format[1:]}"
    f"{(-(_SIZE + RINGBUF_HEADER)) % 8}x")
_AF = {abi.ZtFamily.V4: (socket.AF_INET, 4), abi.ZtFamily.V6: (socket.AF_INET6, 16)}


# Bound of the decoder's caches of addresses and process names (they repeat: each is
# formatted once); past it a cache starts over.
_CACHED = 8192


class Decoder:
    """Raw ``EVENT_LAYOUT`` tuples -> KernelEvents with Unix times. Field positions are
    looked up once by name, so a reordered ABI still decodes right."""

    def __init__(self, clock: BootClock, *, leading: int = 0) -> None:
        """``leading``: values each raw tuple has before the event's (a ring header's)."""
        self.offset_ns = clock.offset_ns
        index = {name: i + leading for i, name in enumerate(EVENT_FIELDS)}
        self._order = tuple(index[name] for name in (
            "kind", "verdict", "reason", "time_ns", "cookie", "flow.cgroup_id", "flow.grant_id",
            "flow.agent", "flow.pid", "flow.tgid", "flow.uid", "flow.comm", "flow.proto",
            "flow.family", "flow.saddr", "flow.sport_be", "flow.daddr", "flow.dport_be",
            "suppressed", "flow.packets_out", "flow.bytes_out", "flow.packets_in",
            "flow.bytes_in", "flow.first_ns", "flow.last_ns", "flags"))
        self._kinds = {int(k): k for k in abi.ZtEventKind}
        self._verdicts = {int(v): v for v in abi.ZtVerdict}
        self._reasons = {int(r): r for r in abi.ZtReason}
        # raw address bytes -> text, by family (inet_ntop matches ipaddress's str)
        self._addresses: dict[int, dict[bytes, str]] = {4: {}, 6: {}}
        self._comms: dict[bytes, str] = {}

    def _address(self, raw: bytes, family: int) -> str:
        cache = self._addresses[family]
        if len(cache) >= _CACHED:
            cache.clear()
        af, size = _AF[abi.ZtFamily(family)]
        text = cache[raw] = socket.inet_ntop(af, raw[:size])
        return text

    def _comm(self, raw: bytes) -> str:
        if len(self._comms) >= _CACHED:
            self._comms.clear()
        text = self._comms[raw] = raw.split(b"\0", 1)[0].decode(errors="replace")
        return text

    def decode(self, raws: Iterable[tuple[Any, ...]]) -> tuple[list[KernelEvent], int]:
        """The events, and how many raw records could not be decoded (an enum value or a
        family this build does not know)."""
        offset = self.offset_ns
        kinds, verdicts, reasons = self._kinds, self._verdicts, self._reasons
        (i_kind, i_verdict, i_reason, i_time, i_cookie, i_cgroup, i_grant, i_agent, i_pid,
         i_tgid, i_uid, i_comm, i_proto, i_family, i_saddr, i_sport, i_daddr, i_dport,
         i_suppressed, i_pout, i_bout, i_pin, i_bin, i_first, i_last, i_flags) = self._order
        zero = bytes(16)
        # tuple.__new__, not KernelEvent(...): a named tuple's __new__ is Python code
        new, event = tuple.__new__, KernelEvent
        addresses, address = self._addresses, self._address
        comms, comm_of = self._comms, self._comm
        cut = abi.EVF_CUT
        out: list[KernelEvent] = []
        bad = 0
        for r in raws:
            try:
                family = r[i_family] or 4
                saddr, sport, dport, daddr = r[i_saddr], r[i_sport], r[i_dport], r[i_daddr]
                first, last, comm = r[i_first], r[i_last], r[i_comm]
                known = addresses[family]
                out.append(new(event, (
                    kinds[r[i_kind]], verdicts[r[i_verdict]], reasons[r[i_reason]],
                    (r[i_time] + offset) / 1e9 if r[i_time] else 0.0, r[i_cookie],
                    r[i_cgroup], r[i_grant], r[i_agent], r[i_pid], r[i_tgid], r[i_uid],
                    comms.get(comm) or comm_of(comm), r[i_proto], family,
                    (known.get(saddr) or address(saddr, family)) if saddr != zero else "",
                    ((sport & 0xFF) << 8) | (sport >> 8),
                    known.get(daddr) or address(daddr, family),
                    ((dport & 0xFF) << 8) | (dport >> 8), r[i_suppressed], r[i_pout],
                    r[i_bout], r[i_pin], r[i_bin],
                    (first + offset) / 1e9 if first else 0.0,
                    (last + offset) / 1e9 if last else 0.0, bool(r[i_flags] & cut))))
            except (KeyError, ValueError):  # an enum value or family this build does not know
                bad += 1
        return out, bad


def decode(raw: abi.ZtEvent, clock: BootClock) -> KernelEvent:
    """One ctypes event (the libbpf callback path)."""
    events, bad = Decoder(clock).decode([EVENT_LAYOUT.unpack(bytes(raw))])
    if bad:
        raise ValueError("an event this build cannot decode")
    return events[0]


class EventReader:
    """Reads both rings from ``poll()``: ``on_batch`` gets each batch of events (up to
    READ_BATCH) as a list, else ``on_event`` each event.

    Each ring is read from its memory maps (``bpfsys.MappedRing``): a run of committed
    records is one copy, unpacked by one ``struct.iter_unpack`` and decoded (``Decoder``),
    with no Python callback per record. Through libbpf's ``ring_buffer__consume`` each
    record cost a ctypes callback and a copy of its own. ``poll`` waits with the GIL
    released (``poll(2)`` on the ring maps, which report data as long as any is
    unconsumed)."""

    def __init__(self, rings: Sequence[PinnedMap], clock: BootClock,
                 on_event: Callable[[KernelEvent], None] | None = None, *,
                 on_batch: Callable[[list[KernelEvent]], None] | None = None) -> None:
        if (on_event is None) == (on_batch is None):
            raise TypeError("EventReader: give on_event or on_batch")
        self._decoder = Decoder(clock, leading=1)
        self._on_event = on_event
        self._deliver = on_batch or self._each
        self._malformed = 0
        self._rings: list[MappedRing] = []
        try:
            for pinned in rings:
                self._rings.append(MappedRing(pinned, _SIZE))
        except Exception:
            self.close()
            raise
        self._waiter = select.poll()
        for mapped in self._rings:
            self._waiter.register(mapped.fd, select.POLLIN)

    @property
    def malformed(self) -> int:
        """Records that could not be decoded: of another size, or with an enum value or
        family this build does not know."""
        return self._malformed + sum(ring.malformed for ring in self._rings)

    def _each(self, events: list[KernelEvent]) -> None:
        assert self._on_event is not None
        for event in events:
            self._on_event(event)

    def poll(self, timeout_ms: int) -> int:
        """Deliver what the rings hold, waiting up to ``timeout_ms`` for the first record;
        how many records were read. At most a few batches a ring per call, so a ring that
        never runs dry still lets the caller look up now and then."""
        try:
            self._waiter.poll(timeout_ms)  # the GIL released meanwhile
        except InterruptedError:
            pass
        # records the kernel queued without a wake-up (the daemon's wake-up policy,
        # Datapath.set_wakeup_every) woke no one: read them after the timeout too
        count = 0
        unpack, decode = RING_LAYOUT.iter_unpack, self._decoder.decode
        for ring in self._rings:
            for _ in range(_BATCHES_PER_POLL):
                chunk = ring.take(READ_BATCH)
                if not chunk:
                    break
                events, bad = decode(unpack(chunk))
                count += len(chunk) // RING_LAYOUT.size
                self._malformed += bad
                if events:
                    self._deliver(events)
        return count

    def close(self) -> None:
        for ring in self._rings:
            ring.close()
        self._rings = []
