"""Decoding the kernel's verdict and flow-end events (zt_events_v1; deny events
have their own ring, zt_denials_v1).

The ring buffers are read by the process that attached the programs (the
daemon), through their pins: libbpf's ring_buffer polls them (no bcc in the
daemon) and hands each raw record to ``EventReader``, which turns it into a
``KernelEvent`` with Unix times. Everything user-facing
(agent names, grant metadata, process paths) is added by ztnet.observe.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ztnet.datapath import abi
from ztnet.datapath.bpfsys import PinnedMap, RingBuffers
from ztnet.datapath.compile import BootClock


@dataclass(frozen=True, slots=True)
class KernelEvent:
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


def decode(raw: abi.ZtEvent, clock: BootClock) -> KernelEvent:
    def unix(boot_ns: int) -> float:
        return (boot_ns + clock.offset_ns) / 1e9 if boot_ns else 0.0

    flow = raw.flow
    family = flow.family or abi.ZtFamily.V4
    return KernelEvent(
        kind=abi.ZtEventKind(raw.kind),
        verdict=abi.ZtVerdict(raw.verdict),
        reason=abi.ZtReason(raw.reason),
        time=unix(raw.time_ns),
        cookie=raw.cookie,
        cgroup_id=flow.cgroup_id,
        grant_id=flow.grant_id,
        agent_index=flow.agent,
        pid=flow.pid,
        tgid=flow.tgid,
        uid=flow.uid,
        comm=flow.comm.decode(errors="replace"),
        proto=flow.proto,
        family=family,
        source=abi.address_from(bytes(flow.saddr), family) if any(flow.saddr) else "",
        source_port=abi.port_from_be(flow.sport_be),
        destination=abi.address_from(bytes(flow.daddr), family),
        destination_port=abi.port_from_be(flow.dport_be),
        suppressed=raw.suppressed,
        packets_out=flow.packets_out,
        bytes_out=flow.bytes_out,
        packets_in=flow.packets_in,
        bytes_in=flow.bytes_in,
        first_seen=unix(flow.first_ns),
        last_seen=unix(flow.last_ns),
    )


class EventReader:
    """Calls ``on_event`` for every kernel event, from ``poll()``."""

    def __init__(self, rings: Sequence[PinnedMap], clock: BootClock,
                 on_event: Callable[[KernelEvent], None]) -> None:
        self._clock = clock
        self._on_event = on_event
        self.malformed = 0
        self._rings = RingBuffers(rings, self._on_raw)  # one poll reads every ring

    def _on_raw(self, _ctx: Any, data: Any, size: int) -> int:
        if size < ctypes.sizeof(abi.ZtEvent):
            self.malformed += 1
            return 0
        raw = ctypes.cast(data, ctypes.POINTER(abi.ZtEvent)).contents
        try:
            event = decode(raw, self._clock)
        except ValueError:  # an enum value this build does not know
            self.malformed += 1
            return 0
        self._on_event(event)
        return 0

    def poll(self, timeout_ms: int) -> None:
        self._rings.poll(timeout_ms)

    def close(self) -> None:
        self._rings.close()
