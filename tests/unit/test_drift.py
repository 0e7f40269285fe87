"""Drift between the kernel's grant maps and what the daemon installed (pure)."""

from __future__ import annotations

from ztnet.datapath.abi import EntryKey, EntryValue
from ztnet.datapath.drift import Drift, Fingerprint, find_drift

A = EntryKey(1, 6, 4, 16, 443, bytes([10, 0, 0, 0]), 8)
B = EntryKey(1, 6, 4, 16, 8080, bytes([10, 0, 0, 1]), 32)
C = EntryKey(2, 17, 6, 0, 0, bytes(16), 0)
V = EntryValue(1, 2, 0x10)


def test_no_drift() -> None:
    drift = find_drift({A: V}, {1: (1, 0, 0, 0)}, {A: V}, {1: (1, 0, 0, 0)})
    assert drift == Drift() and drift.total == 0


def test_each_kind_is_counted_with_an_example() -> None:
    kernel = {A: EntryValue(1, 99, 0x10), C: V}
    installed = {A: V, B: V}
    drift = find_drift(kernel, {1: (1, 0, 0, 0), 2: (4, 0, 0, 0)}, installed,
                       {1: (1, 0, 0, 0)}, "gen 0 ")
    assert drift.counts() == {"extra": 1, "missing": 1, "changed": 1, "levels": 1,
                              "generation": 0}
    assert drift.total == 4
    assert drift.samples[0].startswith("extra gen 0 agent#2 proto 17 ::/0")
    assert any(s.startswith("missing gen 0 agent#1 proto 6 10.0.0.1/32 port 8080/16")
               for s in drift.samples)


def test_drift_adds_up_and_keeps_few_samples() -> None:
    many = {EntryKey(1, 6, 4, 16, port, bytes(4), 0): V for port in range(1, 20)}
    drift = find_drift(many, {}, {}, {}) + Drift(generation=1, samples=("flipped",))
    assert drift.extra == 19 and drift.generation == 1 and drift.total == 20
    assert len(drift.samples) == 5


def test_a_fingerprint_finds_what_changed_whatever_the_order() -> None:
    written = {bytes([i]) * 4: bytes([i]) * 8 for i in range(1, 50)}
    levels = {3: (0, 1, 0, 0)}
    fingerprint = Fingerprint.of(1, written, levels)
    read_back = dict(reversed(list(written.items())))
    assert fingerprint.drift(read_back, levels).total == 0
    changed = {**read_back, b"\x01" * 4: b"\x09" * 8}
    assert fingerprint.drift(changed, levels).counts()["changed"] == 1
    extra = {**read_back, b"\xff" * 4: b"\x01" * 8}
    drift = fingerprint.drift(extra, levels)
    assert (drift.extra, drift.missing, drift.changed) == (1, 0, 0)
    assert drift.samples[0].startswith("gen 1 holds 50 entries, 49 were written")
    missing = dict(list(read_back.items())[1:])
    assert fingerprint.drift(missing, levels).missing == 1
    assert fingerprint.drift(read_back, {3: (0, 3, 0, 0)}).levels == 1
    assert fingerprint.drift(None, levels).total == 0  # entries not compared: levels only
