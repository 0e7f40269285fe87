"""Our alignchecker: the ctypes mirrors in ztnet/datapath/abi.py must match
bpf/ztnet.h field by field, as the host compiler lays it out."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ztnet.datapath import abi
from ztnet.datapath.compile import BootClock
from ztnet.datapath.events import decode
from ztnet.datapath.loader import bpf_source_dir

CC = shutil.which("cc") or shutil.which("gcc")


def _probe_source() -> str:
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "ztnet.h"',
             "int main(void) {", '  printf("{");']
    first = True
    for c_name, struct in abi.STRUCTS.items():
        fields = [name for name, *_ in struct._fields_]
        sep = "" if first else ","
        first = False
        size = f"sizeof(struct {c_name})"
        lines.append(f'  printf("{sep}\\"{c_name}\\": {{\\"size\\": %zu", {size});')
        for field in fields:
            lines.append(f'  printf(", \\"{field}\\": %zu", offsetof(struct {c_name}, {field}));')
        lines.append('  printf("}");')
    constants = {"ZT_ABI_VERSION": "abi_version", "ZT_PORT_LEVELS": "port_levels",
                 "ZT_KEY_FIXED_BITS": "key_fixed_bits", "ZT_CNT_COUNT": "counter_count",
                 "ZT_AGENT_QUARANTINED": "quarantined", "ZT_DROP_SLOTS": "drop_slots",
                 "ZT_AGENT_AUDIT": "audit", "ZT_FLOW_AUDIT": "flow_audit",
                 "ZT_DROP_SLOT_AUDIT": "drop_slot_audit",
                 "ZT_PROTO_PORT_UNKNOWN": "proto_port_unknown", "ZT_EVF_CUT": "evf_cut",
                 "ZT_CFG_CLOCK_OFFSET": "cfg_clock_offset",
                 "ZT_CFG_WAKEUP_RECORDS": "cfg_wakeup_records", "ZT_MAX_LEARNED": "max_learned",
                 "ZT_DNS_PORT": "dns_port"}
    for macro, key in constants.items():
        lines.append(f'  printf(", \\"{key}\\": %d", (int)({macro}));')
    for counter in abi.ZtCounter:
        lines.append(f'  printf(", \\"ZT_CNT_{counter.name}\\": %d", (int)ZT_CNT_{counter.name});')
    for cls in abi.ZtClass:
        lines.append(f'  printf(", \\"ZT_CLASS_{cls.name}\\": %d", (int)ZT_CLASS_{cls.name});')
    for kind in abi.ZtEventKind:
        lines.append(f'  printf(", \\"ZT_EV_{kind.name}\\": %d", (int)ZT_EV_{kind.name});')
    for verdict in abi.ZtVerdict:
        lines.append(f'  printf(", \\"ZT_VERDICT_{verdict.name}\\": %d", '
                     f'(int)ZT_VERDICT_{verdict.name});')
    for reason in abi.ZtReason:
        lines.append(f'  printf(", \\"ZT_REASON_{reason.name}\\": %d", '
                     f'(int)ZT_REASON_{reason.name});')
    for proto in abi.ZtProto:
        lines.append(f'  printf(", \\"ZT_PROTO_{proto.name}\\": %d", (int)ZT_PROTO_{proto.name});')
    lines += ['  printf("}\\n");', "  return 0;", "}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    if CC is None:
        pytest.fail("no C compiler: the ABI check needs cc (installed by make setup)")
    work = tmp_path_factory.mktemp("abi")
    source = work / "probe.c"
    source.write_text(_probe_source())
    binary = work / "probe"
    subprocess.run([CC, "-std=c11", "-Wall", "-Werror", "-DZT_HOST_PROBE",
                    f"-I{bpf_source_dir()}", str(source), "-o", str(binary)], check=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    result: dict[str, object] = json.loads(out)
    return result


def test_struct_sizes_and_offsets_match_header(layout: dict[str, dict[str, int]]) -> None:
    for c_name, struct in abi.STRUCTS.items():
        c = layout[c_name]
        assert ctypes.sizeof(struct) == c["size"], c_name
        for name, *_ in struct._fields_:
            assert getattr(struct, name).offset == c[name], f"{c_name}.{name}"


def test_constants_and_enums_match_header(layout: dict[str, int]) -> None:
    assert layout["abi_version"] == abi.ABI_VERSION
    assert layout["port_levels"] == abi.PORT_LEVELS
    assert layout["key_fixed_bits"] == abi.KEY_FIXED_BITS
    assert layout["counter_count"] == abi.COUNTER_COUNT
    assert layout["quarantined"] == abi.AGENT_QUARANTINED
    assert layout["audit"] == abi.AGENT_AUDIT != abi.AGENT_QUARANTINED
    assert layout["flow_audit"] == abi.FLOW_AUDIT
    assert layout["drop_slot_audit"] == abi.DROP_SLOT_AUDIT
    assert max(abi.ZtReason) < abi.DROP_SLOT_AUDIT < abi.DROP_SLOTS
    assert layout["drop_slots"] == abi.DROP_SLOTS > max(abi.ZtReason)
    assert layout["proto_port_unknown"] == abi.PROTO_PORT_UNKNOWN
    assert layout["evf_cut"] == abi.EVF_CUT
    assert (layout["cfg_clock_offset"], layout["cfg_wakeup_records"]) == (
        abi.CFG_CLOCK_OFFSET, abi.CFG_WAKEUP_RECORDS)
    assert layout["max_learned"] == abi.MAX_LEARNED
    assert layout["dns_port"] == abi.DNS_PORT
    assert abi.PROTO_PORT_UNKNOWN not in set(abi.ZtProto), "the sentinel must name no grant"
    for counter in abi.ZtCounter:
        assert layout[f"ZT_CNT_{counter.name}"] == counter
    for cls in abi.ZtClass:
        assert layout[f"ZT_CLASS_{cls.name}"] == cls
    for proto in abi.ZtProto:
        assert layout[f"ZT_PROTO_{proto.name}"] == proto
    for kind in abi.ZtEventKind:
        assert layout[f"ZT_EV_{kind.name}"] == kind
    for verdict in abi.ZtVerdict:
        assert layout[f"ZT_VERDICT_{verdict.name}"] == verdict
    for reason in abi.ZtReason:
        assert layout[f"ZT_REASON_{reason.name}"] == reason


def test_event_carries_the_flow_struct_whole() -> None:
    """sock_release copies a socket's flow (struct zt_sock.flow) into its event
    in one assignment: the event's `flow` member is that struct, not a look-alike."""
    fields = dict((name, kind) for name, kind, *_ in abi.ZtEvent._fields_)
    assert fields["flow"] is abi.ZtFlow
    assert dict((name, kind) for name, kind, *_ in abi.ZtSock._fields_)["flow"] is abi.ZtFlow
    assert abi.ZtEvent.flow.size == ctypes.sizeof(abi.ZtFlow)


def test_pinned_values_keep_their_abi_v2_layout(layout: dict[str, dict[str, int]]) -> None:
    """The pinned maps live under .../v<ZT_ABI_VERSION>/ and are adopted by the
    next daemon: their value layouts may not change without a version bump."""
    assert abi.ABI_VERSION == 2
    flow = layout["zt_flow"]
    assert (flow["size"], flow["agent"], flow["proto"], flow["sport_be"], flow["saddr"],
            flow["comm"]) == (136, 64, 80, 84, 88, 120)
    sock = layout["zt_sock"]
    assert (sock["size"], sock["egress"], sock["flags"], sock["flow"], sock["send"],
            sock["packets_in"]) == (384, 0, 72, 80, 216, 352)
    value = layout["zt_grant_value"]
    assert (value["size"], value["max_bytes_conn"], value["window_ns"]) == (48, 24, 40)


def test_fixed_key_bits_cover_everything_before_the_address() -> None:
    assert abi.KEY_FIXED_BITS == 8 * (abi.ZtGrantKey.addr.offset - abi.ZtGrantKey.agent.offset)


def test_entry_key_round_trips_through_c_layout() -> None:
    key = abi.EntryKey(agent=7, proto=6, family=4, port_bits=16, port=443,
                       addr=bytes([10, 0, 2, 0]), addr_bits=24)
    c_key = key.to_c(generation=1)
    raw = bytes(c_key)
    assert raw[12:14] == (443).to_bytes(2, "big")  # port_be is network order
    assert raw[16:20] == bytes([10, 0, 2, 0])
    assert c_key.prefixlen == abi.KEY_FIXED_BITS + 24
    assert abi.EntryKey.from_c(c_key) == (1, key)


def test_packed_entries_are_the_c_layout_byte_for_byte() -> None:
    for key in (abi.EntryKey(7, 6, 4, 16, 443, bytes([10, 0, 2, 0]), 24),
                abi.EntryKey(4095, 17, 6, 3, 0xE000, bytes(range(16)), 128)):
        for generation in (0, 1):
            assert key.packed(generation) == bytes(key.to_c(generation))
            assert abi.EntryKey.unpack(key.packed(generation)) == (generation, key)
    value = abi.EntryValue(1, 2**64 - 1, 0xABCDEF)
    assert value.packed() == bytes(value.to_c())
    assert abi.EntryValue.unpack(value.packed()) == value
    assert (abi.GRANT_KEY_SIZE, abi.GRANT_VALUE_SIZE) == (
        ctypes.sizeof(abi.ZtGrantKey), ctypes.sizeof(abi.ZtGrantValue))


def test_sources_exist_for_installed_layout() -> None:
    assert Path(bpf_source_dir(), "ztnet.h").exists()


def test_a_record_of_the_previous_event_layout_does_not_decode() -> None:
    """docs/architecture.md: records an older build's programs left in the
    pinned ring buffer are rejected (and counted) rather than misread.
    `struct zt_event` before it embedded `struct zt_flow`, as it was in v1:"""

    class OldEvent(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in (
            "time_ns", "cookie", "cgroup_id", "grant_id", "packets_out", "bytes_out",
            "packets_in", "bytes_in", "first_ns", "last_ns")] + [
            (name, ctypes.c_uint32) for name in ("pid", "tgid", "uid", "agent", "suppressed")] + [
            (name, ctypes.c_uint8) for name in ("kind", "verdict", "reason", "proto", "family",
                                                "pad")] + [
            ("sport_be", ctypes.c_uint16), ("dport_be", ctypes.c_uint16),
            ("pad2", ctypes.c_uint16), ("saddr", ctypes.c_uint8 * 16),
            ("daddr", ctypes.c_uint8 * 16), ("comm", ctypes.c_char * 16)]

    assert ctypes.sizeof(OldEvent) == ctypes.sizeof(abi.ZtEvent)
    for kind in abi.ZtEventKind:
        old = OldEvent(time_ns=10**12, cookie=4097, cgroup_id=0xFFFF_FFFF, grant_id=7,
                       kind=kind, verdict=abi.ZtVerdict.ALLOWED, family=abi.ZtFamily.V4,
                       proto=abi.ZtProto.TCP, comm=b"curl")
        raw = abi.ZtEvent.from_buffer_copy(bytes(old))
        with pytest.raises(ValueError):
            decode(raw, BootClock(offset_ns=0))
