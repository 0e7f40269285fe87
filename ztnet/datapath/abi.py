"""Python mirror of bpf/ztnet.h, the kernel ABI.

Each ctypes structure names its C struct; tests/unit/test_abi.py compiles the
header on the host and checks sizes and offsets against these, and a kernel
test checks them against the maps bcc created. All byte-order conversions
live here: fields ending in ``_be`` are network order.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
from dataclasses import dataclass

ABI_VERSION = 1
PORT_LEVELS = 17
KEY_FIXED_BITS = 96
MAX_AGENTS = 4096
MAX_ENTRIES = 524288  # across both generations


class ZtProto(enum.IntEnum):
    """enum zt_proto"""

    ANY = 0
    ICMP = 1
    TCP = 6
    UDP = 17


class ZtClass(enum.IntEnum):
    """enum zt_proto_class: index into ZtLevels.mask"""

    ANY = 0
    ICMP = 1
    TCP = 2
    UDP = 3


PROTO_CLASS = {ZtProto.ANY: ZtClass.ANY, ZtProto.ICMP: ZtClass.ICMP,
               ZtProto.TCP: ZtClass.TCP, ZtProto.UDP: ZtClass.UDP}


class ZtFamily(enum.IntEnum):
    """enum zt_family"""

    V4 = 4
    V6 = 6


class ZtCounter(enum.IntEnum):
    """enum zt_counter"""

    CONNECT_ALLOW = 0
    CONNECT_DENY = 1
    SENDMSG_ALLOW = 2
    SENDMSG_DENY = 3
    EGRESS_PASS = 4
    EGRESS_DROP = 5
    NO_AGENT = 6
    QUARANTINED = 7
    UNPARSED = 8


COUNTER_COUNT = 9
AGENT_QUARANTINED = 1


class ZtGrantKey(ctypes.Structure):
    """struct zt_grant_key"""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("agent", ctypes.c_uint32),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("port_bits", ctypes.c_uint8),
        ("generation", ctypes.c_uint8),
        ("port_be", ctypes.c_uint16),
        ("pad2", ctypes.c_uint16),
        ("addr", ctypes.c_uint8 * 16),
    ]


class ZtGrantValue(ctypes.Structure):
    """struct zt_grant_value"""

    _fields_ = [
        ("not_before_ns", ctypes.c_uint64),
        ("not_after_ns", ctypes.c_uint64),
        ("grant_id", ctypes.c_uint64),
    ]


class ZtLevels(ctypes.Structure):
    """struct zt_levels"""

    _fields_ = [("mask", ctypes.c_uint32 * 4)]


class ZtAgent(ctypes.Structure):
    """struct zt_agent"""

    _fields_ = [("index", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class ZtConfig(ctypes.Structure):
    """struct zt_config"""

    _fields_ = [
        ("generation", ctypes.c_uint32),
        ("agent_level", ctypes.c_uint32),
        ("reserved", ctypes.c_uint64 * 3),
    ]


class ZtAgentStats(ctypes.Structure):
    """struct zt_agent_stats"""

    _fields_ = [
        ("allowed", ctypes.c_uint64),
        ("denied", ctypes.c_uint64),
        ("egress_packets", ctypes.c_uint64),
        ("egress_bytes", ctypes.c_uint64),
        ("egress_dropped", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 3),
    ]


STRUCTS: dict[str, type[ctypes.Structure]] = {
    "zt_grant_key": ZtGrantKey,
    "zt_grant_value": ZtGrantValue,
    "zt_levels": ZtLevels,
    "zt_agent": ZtAgent,
    "zt_config": ZtConfig,
    "zt_agent_stats": ZtAgentStats,
}


@dataclass(frozen=True, slots=True, order=True)
class EntryKey:
    """A grant-trie key without its generation: what the compiler produces.
    ``port`` is already masked to ``port_bits``; ``addr`` is the network
    address (4 or 16 bytes) and ``addr_bits`` its prefix length."""

    agent: int
    proto: int
    family: int
    port_bits: int
    port: int
    addr: bytes
    addr_bits: int

    def to_c(self, generation: int) -> ZtGrantKey:
        key = ZtGrantKey()
        key.prefixlen = KEY_FIXED_BITS + self.addr_bits
        key.agent = self.agent
        key.proto = self.proto
        key.family = self.family
        key.port_bits = self.port_bits
        key.generation = generation
        key.port_be = int.from_bytes(self.port.to_bytes(2, "big"), "little")
        ctypes.memmove(key.addr, self.addr, len(self.addr))
        return key

    @classmethod
    def from_c(cls, key: ZtGrantKey) -> tuple[int, EntryKey]:
        """(generation, EntryKey) of a key read back from the kernel."""
        addr_len = 4 if key.family == ZtFamily.V4 else 16
        port = int.from_bytes(int(key.port_be).to_bytes(2, "little"), "big")
        entry = cls(
            agent=key.agent,
            proto=key.proto,
            family=key.family,
            port_bits=key.port_bits,
            port=port,
            addr=bytes(key.addr)[:addr_len],
            addr_bits=key.prefixlen - KEY_FIXED_BITS,
        )
        return key.generation, entry

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        if self.family == ZtFamily.V4:
            return ipaddress.IPv4Network((self.addr, self.addr_bits))
        return ipaddress.IPv6Network((self.addr, self.addr_bits))


@dataclass(frozen=True, slots=True)
class EntryValue:
    """struct zt_grant_value, times in CLOCK_BOOTTIME nanoseconds."""

    not_before_ns: int
    not_after_ns: int
    grant_id: int

    def to_c(self) -> ZtGrantValue:
        return ZtGrantValue(self.not_before_ns, self.not_after_ns, self.grant_id)

    @classmethod
    def from_c(cls, value: ZtGrantValue) -> EntryValue:
        return cls(value.not_before_ns, value.not_after_ns, value.grant_id)
