"""A grant set changed by a delta (``GrantIndex.change``) compiles to exactly what
compiling the changed set whole gives: entries, level masks, and the writes that
take the kernel from one to the other."""

from __future__ import annotations

import ipaddress
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from ztnet.datapath.compile import BootClock, compile_index
from ztnet.grants.model import ByteBudget, Grant, PortRange, Proto

NOW = 1_800_000_000.0
CLOCK = BootClock(offset_ns=int(1_700_000_000 * 1e9))
AGENTS = {"a": 1, "b": 2}

# Few distinct values, so that prefixes nest, port blocks overlap and windows collide.
networks = st.sampled_from(["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32",
                            "10.1.2.4/32", "192.168.0.0/16", "2001:db8::/32",
                            "2001:db8::1/128"])
ports = st.sampled_from([None, PortRange(443, 443), PortRange(80, 90), PortRange(1, 65535),
                         PortRange(440, 450)])
windows = st.sampled_from([(NOW - 10, NOW + 100), (NOW + 50, NOW + 200), (NOW - 100, NOW + 10),
                           (NOW + 300, NOW + 400)])


@st.composite
def grant_sets(draw: st.DrawFn) -> list[Grant]:
    count = draw(st.integers(1, 14))
    result = []
    for grant_id in range(1, count + 1):
        not_before, not_after = draw(windows)
        proto = draw(st.sampled_from([Proto.TCP, Proto.UDP, Proto.ANY]))
        result.append(Grant(grant_id, draw(st.sampled_from(sorted(AGENTS))), proto,
                            ipaddress.ip_network(draw(networks)), draw(ports),
                            not_before, not_after,
                            ByteBudget(1000, 100, 10) if draw(st.booleans()) else None))
    return result


@settings(max_examples=300, deadline=None)
@given(grant_sets(), st.data())
def test_a_change_gives_what_a_whole_compile_gives(grants: list[Grant],
                                                   data: st.DataObject) -> None:
    old = grants[: data.draw(st.integers(1, len(grants)), label="held")]
    added = [grant for grant in grants if grant not in old]
    revoked = data.draw(st.lists(st.sampled_from(old), unique=True, max_size=len(old)),
                        label="revoked")
    new = [grant for grant in old if grant not in revoked] + added
    expires = data.draw(st.sampled_from([math.inf, NOW + 150]), label="bundle expires")

    index = compile_index(old, AGENTS, now=NOW, clock=CLOCK, bundle_expires=expires)
    kernel = dict(index.packed)
    before = dict(kernel)
    levels = dict(index.levels)
    writes, deletes, changed_levels = index.change(added, revoked, NOW)
    whole = compile_index(new, AGENTS, now=NOW, clock=CLOCK, bundle_expires=expires)

    assert index.packed == whole.packed
    assert index.levels == whole.levels
    # the kernel, changed by exactly the writes and deletes returned, holds the new state
    kernel.update(writes)
    for key in deletes:
        del kernel[key]
    assert kernel == whole.packed
    levels.update(changed_levels)
    assert {agent: mask for agent, mask in levels.items() if any(mask)} == whole.levels
    # nothing is written that did not change, nothing deleted that was not there
    assert all(before.get(key) != value for key, value in writes.items())
    assert all(key in before for key in deletes)
    assert whole.valid_until >= index.valid_until  # never later than the truth: safe


def test_revoking_the_only_grant_removes_its_entry_and_level() -> None:
    grant = Grant(7, "a", Proto.TCP, ipaddress.ip_network("10.0.0.1/32"), PortRange(443, 443),
                  NOW - 1, NOW + 100)
    index = compile_index([grant], AGENTS, now=NOW, clock=CLOCK, bundle_expires=math.inf)
    (key,) = index.packed
    writes, deletes, levels = index.change([], [grant], NOW)
    assert (writes, deletes, levels) == ({}, [key], {1: (0, 0, 0, 0)})
    assert index.packed == {} and index.levels == {} and index.groups == {}
