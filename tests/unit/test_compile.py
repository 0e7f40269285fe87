"""The grant compiler, checked against the reference evaluator by simulating
the kernel's lookup (longest-prefix match per port block) in Python."""

from __future__ import annotations

import ipaddress
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from ztnet.datapath.abi import PROTO_CLASS, EntryKey, ZtProto
from ztnet.datapath.compile import (
    BUNDLE_GRACE_SECONDS,
    BootClock,
    DesiredState,
    compile_desired_state,
    kernel_not_after,
    port_blocks,
)
from ztnet.grants.evaluate import allowed_by
from ztnet.grants.model import Grant, IPAddress, PortRange, Proto

NOW = 1_800_000_000.0
CLOCK = BootClock(offset_ns=int(1_700_000_000 * 1e9))


def simulate_kernel(state: DesiredState, agent: int, proto: int, address: IPAddress,
                    port: int | None, when: float) -> int | None:
    """What bpf/verdict.h computes, in Python: for each used port level, the
    longest matching prefix, then its window."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    family = address.version
    now_ns = CLOCK.to_boot_ns(when)
    folded = ZtProto.ICMP if proto in (1, 58) else proto
    classes = [folded] if folded in (6, 17, 1) else []
    masks = state.levels.get(agent, (0, 0, 0, 0))
    for key_proto in [*classes, ZtProto.ANY]:
        mask = masks[PROTO_CLASS[ZtProto(key_proto)]]
        for bits in range(16, -1, -1):
            if not mask & (1 << bits):
                continue
            port_value = (port or 0) & ((0xFFFF << (16 - bits)) & 0xFFFF if bits else 0)
            best = None
            for key, value in state.entries.items():
                if (key.agent, key.proto, key.family, key.port_bits, key.port) != (
                        agent, key_proto, family, bits, port_value):
                    continue
                if address in key.network and (best is None or key.addr_bits > best[0].addr_bits):
                    best = (key, value)
            if best and best[1].not_before_ns <= now_ns < best[1].not_after_ns:
                return best[1].grant_id
    return None


def test_port_blocks_cover_exactly_the_range() -> None:
    for first, last in [(1, 65535), (8000, 8100), (443, 443), (1023, 1025), (65535, 65535)]:
        covered: set[int] = set()
        for start, bits in port_blocks(first, last):
            size = 1 << (16 - bits)
            assert start % size == 0
            covered.update(range(start, start + size))
        assert covered == set(range(first, last + 1))


def test_more_specific_prefix_inherits_covering_grant_window() -> None:
    wide = Grant(1, "a", Proto.TCP, ipaddress.ip_network("10.0.0.0/8"), PortRange(80, 80),
                 NOW - 10, NOW + 100)
    narrow_expired = Grant(2, "a", Proto.TCP, ipaddress.ip_network("10.1.0.0/16"),
                           PortRange(80, 80), NOW - 100, NOW - 50)
    state = compile_desired_state([wide, narrow_expired], {"a": 1}, now=NOW, clock=CLOCK,
                           bundle_expires=math.inf)
    narrow_key = EntryKey(1, 6, 4, 16, 80, bytes([10, 1, 0, 0]), 16)
    assert state.entries[narrow_key].grant_id == 1
    assert simulate_kernel(state, 1, 6, ipaddress.ip_address("10.1.2.3"), 80, NOW) == 1


def test_expired_only_entries_are_not_installed() -> None:
    old = Grant(3, "a", Proto.UDP, ipaddress.ip_network("fd00::/64"), None, NOW - 20, NOW - 10)
    state = compile_desired_state([old], {"a": 1}, now=NOW, clock=CLOCK, bundle_expires=math.inf)
    assert state.entries == {}


def test_icmp_grant_uses_level_zero_only() -> None:
    grant = Grant(4, "a", Proto.ICMP, ipaddress.ip_network("10.0.0.1/32"), None, NOW, NOW + 5)
    state = compile_desired_state([grant], {"a": 3}, now=NOW, clock=CLOCK, bundle_expires=math.inf)
    assert state.levels[3] == (0, 1, 0, 0)


agents = st.sampled_from(["a", "b"])
networks = st.one_of(
    st.builds(lambda o, p: ipaddress.ip_network((o << 24, p), strict=False),
              st.integers(10, 11), st.integers(6, 32)),
    st.builds(lambda o, p: ipaddress.ip_network(((0xFD00 << 112) | (o << 96), p), strict=False),
              st.integers(0, 1), st.integers(8, 128)),
)
port_ranges = st.one_of(st.none(), st.builds(
    lambda a, n: PortRange(a, min(65535, a + n)), st.integers(1, 70), st.integers(0, 40)))
windows = st.sampled_from([(-100, 100), (-100, -1), (50, 100), (-5, 5), (-50, 1000)])


@st.composite
def grants(draw: st.DrawFn) -> Grant:
    proto = draw(st.sampled_from(list(Proto)))
    ports = None if proto is Proto.ICMP else draw(port_ranges)
    start, end = draw(windows)
    return Grant(draw(st.integers(1, 2**64 - 1)), draw(agents), proto, draw(networks), ports,
                 NOW + start, NOW + end)


@st.composite
def probes(draw: st.DrawFn) -> tuple[str, int, IPAddress, int | None]:
    proto = draw(st.sampled_from([6, 17, 1, 58, 47]))
    if draw(st.booleans()):
        address: IPAddress = ipaddress.IPv4Address((draw(st.integers(10, 11)) << 24)
                                                   | draw(st.integers(0, 2**24 - 1)))
        if proto == 58:
            proto = 1
    else:
        address = ipaddress.IPv6Address((0xFD00 << 112) | (draw(st.integers(0, 1)) << 96)
                                        | draw(st.integers(0, 2**96 - 1)))
    port = draw(st.integers(1, 120)) if proto in (6, 17) else None
    return draw(agents), proto, address, port


@settings(max_examples=400, deadline=None)
@given(st.lists(grants(), max_size=8), st.lists(probes(), min_size=1, max_size=10))
def test_compiled_state_agrees_with_reference_evaluator(
    grant_list: list[Grant], probe_list: list[tuple[str, int, IPAddress, int | None]]
) -> None:
    index = {"a": 1, "b": 2}
    state = compile_desired_state(grant_list, index, now=NOW, clock=CLOCK, bundle_expires=math.inf)
    for agent, proto, address, port in probe_list:
        expected = allowed_by(grant_list, agent, proto, address, port, NOW) is not None
        got = simulate_kernel(state, index[agent], proto, address, port, NOW) is not None
        assert got == expected, (agent, proto, address, port)


def test_no_entry_outlives_its_bundle_by_more_than_the_grace() -> None:
    month = Grant(1, "a", Proto.TCP, ipaddress.ip_network("10.0.0.0/8"), PortRange(443, 443),
                  NOW - 1, NOW + 30 * 86400)
    short = Grant(2, "a", Proto.TCP, ipaddress.ip_network("10.1.0.0/16"), PortRange(443, 443),
                  NOW - 1, NOW + 10)
    late = Grant(3, "a", Proto.UDP, ipaddress.ip_network("10.2.0.0/16"), None,
                 NOW + 400, NOW + 900)
    expires = NOW + 300
    state = compile_desired_state([month, short, late], {"a": 1}, now=NOW, clock=CLOCK,
                           bundle_expires=expires)
    cap = CLOCK.to_boot_ns(kernel_not_after(math.inf, expires))
    assert cap == CLOCK.to_boot_ns(expires + BUNDLE_GRACE_SECONDS)
    windows = {value.grant_id: value.not_after_ns for value in state.entries.values()}
    # the /16 entry folds in the /8's window: it too ends at the cap, not in 30 days
    assert windows == {1: cap, 2: cap}
    assert 3 not in windows  # starts after its bundle stops counting: never installed
    assert simulate_kernel(state, 1, 6, ipaddress.ip_address("10.9.9.9"), 443,
                           expires + BUNDLE_GRACE_SECONDS + 1) is None
