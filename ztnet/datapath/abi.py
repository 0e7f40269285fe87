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
import struct
from dataclasses import dataclass

# ZT_ABI_VERSION: defined once, in ztnet.instance, because the bpffs pin path carries it and
# the instance layer sits below the datapath; tests/unit/test_abi.py checks it against the header.
from ztnet.instance import ABI_VERSION as ABI_VERSION

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


# ZT_PROTO_PORT_UNKNOWN: a TCP/UDP packet whose port could not be read is judged
# as this protocol, which no grant names (only any-protocol, any-port grants match).
PROTO_PORT_UNKNOWN = 0xFF

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
    EVENTS_LOST = 9
    EVENTS_SUPPRESSED = 10
    FLOWS_UNTRACKED = 11
    EGRESS_JUDGED = 12
    SENDMSG_STAMPED = 13
    BUDGET_CUT = 14
    BUDGET_DROP = 15


COUNTER_COUNT = 16
DROP_SLOTS = 8
# ZT_DROP_SLOT_AUDIT: packets the egress backstop let through only because the agent is in
# audit mode (what enforce mode would have dropped)
DROP_SLOT_AUDIT = 7


class ZtEventKind(enum.IntEnum):
    """enum zt_event_kind"""

    CONNECT = 1
    SENDMSG = 2
    FLOW_END = 3


class ZtVerdict(enum.IntEnum):
    """enum zt_verdict"""

    ALLOWED = 1
    DENIED = 2
    AUDIT = 3  # no grant, let through: the agent is in audit mode


class ZtReason(enum.IntEnum):
    """enum zt_reason (docs/flows.md lists them for users)"""

    GRANTED = 0
    NO_GRANT = 1
    NOT_AGENT = 2
    QUARANTINED = 3
    UNPARSED = 4
    BUDGET = 5
    DNS_REDIRECT = 6


AGENT_QUARANTINED = 1
AGENT_AUDIT = 2  # ZT_AGENT_AUDIT
FLOW_AUDIT = 1  # ZT_FLOW_AUDIT (struct zt_flow.flags)
EVF_CUT = 1  # ZT_EVF_CUT: the record of a flow a byte budget cut
# zt_config.reserved indices
CFG_CLOCK_OFFSET = 0
CFG_WAKEUP_RECORDS = 1


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
        ("max_bytes_conn", ctypes.c_uint64),
        ("max_bytes_window", ctypes.c_uint64),
        ("window_ns", ctypes.c_uint64),
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
        ("ingress_packets", ctypes.c_uint64),
        ("ingress_bytes", ctypes.c_uint64),
        ("events_suppressed", ctypes.c_uint64),
    ]


class ZtFlow(ctypes.Structure):
    """struct zt_flow: the flow part of struct zt_sock and of every event"""

    _fields_ = [
        ("grant_id", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("packets_out", ctypes.c_uint64),
        ("bytes_out", ctypes.c_uint64),
        ("packets_in", ctypes.c_uint64),
        ("bytes_in", ctypes.c_uint64),
        ("first_ns", ctypes.c_uint64),
        ("last_ns", ctypes.c_uint64),
        ("agent", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("dport_be", ctypes.c_uint16),
        ("sport_be", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * 16),
    ]


class ZtEvent(ctypes.Structure):
    """struct zt_event: one zt_events_v1 record, the socket's fields in ``flow``"""

    _fields_ = [
        ("time_ns", ctypes.c_uint64),
        ("cookie", ctypes.c_uint64),
        ("suppressed", ctypes.c_uint32),
        ("kind", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("flow", ZtFlow),
    ]


class ZtStamp(ctypes.Structure):
    """struct zt_stamp"""

    _fields_ = [
        ("until_ns", ctypes.c_uint64),
        ("grant_id", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("max_bytes_conn", ctypes.c_uint64),
        ("max_bytes_window", ctypes.c_uint64),
        ("window_ns", ctypes.c_uint64),
        ("generation", ctypes.c_uint32),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("dport_be", ctypes.c_uint16),
        ("daddr", ctypes.c_uint8 * 16),
    ]


class ZtSock(ctypes.Structure):
    """struct zt_sock: a zt_socks_v1 value (socket-local storage)"""

    _fields_ = [
        ("egress", ZtStamp),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("flow", ZtFlow),
        ("send", ZtStamp),
        ("spacer", ctypes.c_uint64 * 8),
        ("packets_in", ctypes.c_uint64),
        ("bytes_in", ctypes.c_uint64),
        ("last_in_ns", ctypes.c_uint64),
        ("pad2", ctypes.c_uint64),
    ]


class ZtWindow(ctypes.Structure):
    """struct zt_window: a zt_budgets_v1 value (key: grant id)"""

    _fields_ = [("start_ns", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class ZtDenyBudget(ctypes.Structure):
    """struct zt_deny_budget"""

    _fields_ = [
        ("window_start_ns", ctypes.c_uint64),
        ("sent", ctypes.c_uint32),
        ("suppressed", ctypes.c_uint32),
    ]


class ZtAgentEvents(ctypes.Structure):
    """struct zt_agent_events"""

    _fields_ = [
        ("deny_lost", ctypes.c_uint64),
        ("allow_lost", ctypes.c_uint64),
        ("allow_suppressed", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64),
    ]


def port_from_be(value: int) -> int:
    """A __be16 read as a little-endian host integer, back to the port."""
    return int.from_bytes(int(value).to_bytes(2, "little"), "big")


def address_from(raw: bytes, family: int) -> str:
    if family == ZtFamily.V4:
        return str(ipaddress.IPv4Address(bytes(raw[:4])))
    return str(ipaddress.IPv6Address(bytes(raw[:16])))


MAX_LEARNED = 65536  # ZT_MAX_LEARNED
DNS_PORT = 53  # ZT_DNS_PORT


class ZtLearnedKey(ctypes.Structure):
    """struct zt_learned_key (bpf/dns_abi.h)"""

    _fields_ = [
        ("agent", ctypes.c_uint32),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("port_be", ctypes.c_uint16),
        ("addr", ctypes.c_uint8 * 16),
    ]


class ZtLearnedValue(ctypes.Structure):
    """struct zt_learned_value (bpf/dns_abi.h)"""

    _fields_ = [
        ("not_after_ns", ctypes.c_uint64),
        ("grant_not_after_ns", ctypes.c_uint64),
        ("grant_id", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64),
    ]


RESOLVER_NO_NAMES = 1  # ZT_RESOLVER_NO_NAMES


class ZtResolver(ctypes.Structure):
    """struct zt_resolver (bpf/dns_abi.h)"""

    _fields_ = [("port_be", ctypes.c_uint16), ("pad", ctypes.c_uint16),
                ("flags", ctypes.c_uint32)]


class ZtDnsPeer(ctypes.Structure):
    """struct zt_dns_peer (bpf/dns_abi.h)"""

    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port_be", ctypes.c_uint16),
        ("redirect_port_be", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


def port_to_be(port: int) -> int:
    """A port as the __be16 a little-endian host stores (the inverse of port_from_be)."""
    return int.from_bytes(port.to_bytes(2, "big"), "little")


STRUCTS: dict[str, type[ctypes.Structure]] = {
    "zt_grant_key": ZtGrantKey,
    "zt_grant_value": ZtGrantValue,
    "zt_levels": ZtLevels,
    "zt_agent": ZtAgent,
    "zt_config": ZtConfig,
    "zt_agent_stats": ZtAgentStats,
    "zt_event": ZtEvent,
    "zt_flow": ZtFlow,
    "zt_stamp": ZtStamp,
    "zt_sock": ZtSock,
    "zt_window": ZtWindow,
    "zt_deny_budget": ZtDenyBudget,
    "zt_agent_events": ZtAgentEvents,
    "zt_learned_key": ZtLearnedKey,
    "zt_learned_value": ZtLearnedValue,
    "zt_resolver": ZtResolver,
    "zt_dns_peer": ZtDnsPeer,
}


# Grant-trie keys and values packed as the kernel holds them, for the bulk paths
# (compile, batch writes, dumps): one struct call per entry instead of a ctypes object.
# tests/unit/test_abi.py checks these against ZtGrantKey/ZtGrantValue byte for byte.
_GRANT_KEY = struct.Struct("<IIBBBB2s2x16s")  # the port in network order
_GRANT_VALUE = struct.Struct("<QQQQQQ")
GRANT_KEY_SIZE = _GRANT_KEY.size
GRANT_VALUE_SIZE = _GRANT_VALUE.size
GENERATION_OFFSET = ZtGrantKey.generation.offset
unpack_grant_value = _GRANT_VALUE.unpack
iter_grant_values = _GRANT_VALUE.iter_unpack


def pack_grant_value(not_before_ns: int, not_after_ns: int, grant_id: int,
                     max_bytes_conn: int = 0, max_bytes_window: int = 0,
                     window_ns: int = 0) -> bytes:
    """struct zt_grant_value: the window, the grant, its byte budgets (0: none)."""
    return _GRANT_VALUE.pack(not_before_ns, not_after_ns, grant_id, max_bytes_conn,
                             max_bytes_window, window_ns)


def pack_grant_key(agent: int, proto: int, family: int, port_bits: int, port: int,
                   addr: bytes, addr_bits: int, generation: int = 0) -> bytes:
    """struct zt_grant_key as bytes (``addr``: 4 or 16 bytes, zero-padded)."""
    return _GRANT_KEY.pack(KEY_FIXED_BITS + addr_bits, agent, proto, family, port_bits,
                           generation, port.to_bytes(2, "big"), addr)


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

    def packed(self, generation: int = 0) -> bytes:
        return pack_grant_key(self.agent, self.proto, self.family, self.port_bits, self.port,
                              self.addr, self.addr_bits, generation)

    @classmethod
    def unpack(cls, raw: bytes) -> tuple[int, EntryKey]:
        """(generation, EntryKey) of a packed key."""
        prefixlen, agent, proto, family, bits, generation, port, addr = _GRANT_KEY.unpack(raw)
        addr_len = 4 if family == ZtFamily.V4 else 16
        return generation, cls(agent, proto, family, bits, int.from_bytes(port, "big"),
                               addr[:addr_len], prefixlen - KEY_FIXED_BITS)

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
    max_bytes_conn: int = 0
    max_bytes_window: int = 0
    window_ns: int = 0

    def to_c(self) -> ZtGrantValue:
        return ZtGrantValue(self.not_before_ns, self.not_after_ns, self.grant_id,
                            self.max_bytes_conn, self.max_bytes_window, self.window_ns)

    @classmethod
    def from_c(cls, value: ZtGrantValue) -> EntryValue:
        return cls(value.not_before_ns, value.not_after_ns, value.grant_id,
                   value.max_bytes_conn, value.max_bytes_window, value.window_ns)

    def packed(self) -> bytes:
        return pack_grant_value(self.not_before_ns, self.not_after_ns, self.grant_id,
                                self.max_bytes_conn, self.max_bytes_window, self.window_ns)

    @classmethod
    def unpack(cls, raw: bytes) -> EntryValue:
        return cls(*unpack_grant_value(raw))
