"""The daemon's control plane: bcc and LLVM stay out of the long-running
process (a short-lived child compiles and pins the programs), and a restart
finds the pinned programs and compiles nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztnet.datapath import loader
from ztnet.grants.keys import generate_keypair, load_private_key
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair
from ztnet.lab.servers import ServerProcess
from ztnet.observe import audit
from ztnet.testing.daemon import BundleFileHost as Setup
from ztnet.testing.daemon import bundle_applied

A, NEVER = 8080, 9090
COMPILER_LIBRARIES = ("libLLVM", "libbcc", "libclang")


@pytest.fixture
def setup(instance: Instance, tmp_path: Path) -> Iterator[Setup]:
    key_path, pub = generate_keypair(tmp_path / "keys")
    with NetnsPair() as pair, ServerProcess(pair.b.netns, bind=[pair.b.ipv4], tcp=[A, NEVER]):
        yield Setup(instance, pair, load_private_key(key_path), pub, tmp_path / "bundle.json",
                    tmp_path / "state")


def mapped_compiler_libraries(pid: int) -> set[str]:
    text = Path(f"/proc/{pid}/maps").read_text()
    return {line.split()[-1] for line in text.splitlines()
            if any(name in line for name in COMPILER_LIBRARIES)}


def datapath_ready(event: dict[str, object]) -> bool:
    return event.get("event") == "datapath ready"


def test_the_daemon_maps_no_compiler_and_enforces(setup: Setup) -> None:
    setup.publish(1, [A])
    with setup.daemon() as daemon:
        ready = daemon.wait_event(datapath_ready)
        daemon.wait_event(bundle_applied(1))
        assert daemon.proc is not None
        assert ready["compiled"] is True  # a fresh instance: the child compiled them
        assert mapped_compiler_libraries(daemon.proc.pid) == set()
        assert (setup.attempt(A), setup.attempt(NEVER)) == ("OK", "EPERM")
        assert mapped_compiler_libraries(daemon.proc.pid) == set()  # nor after events flowed


def test_a_restart_with_the_programs_pinned_compiles_nothing(setup: Setup) -> None:
    setup.publish(1, [A])
    with setup.daemon() as first:
        ready = first.wait_event(datapath_ready)
        first.wait_event(bundle_applied(1))
        stamp = ready["programs"]
        assert first.stop() == 0
    attached = _attached_ids(setup.instance)
    with setup.daemon() as second:
        again = second.wait_event(datapath_ready)
        second.wait_event(bundle_applied(1))
        assert (again["programs"], again["compiled"]) == (stamp, False)
        assert _attached_ids(setup.instance) == attached  # the same programs, not replaced
        assert (setup.attempt(A), setup.attempt(NEVER)) == ("OK", "EPERM")
        setup.publish(2, [NEVER])
        second.wait_event(bundle_applied(2))
        assert (setup.attempt(A), setup.attempt(NEVER)) == ("EPERM", "OK")


def _trail(state: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]


def _ready(event: dict[str, object]) -> bool:
    return event.get("event") == "daemon ready"


def test_a_restart_records_the_restored_state_once_not_each_grant_again(setup: Setup) -> None:
    setup.publish(1, [A, NEVER, 7001, 7002])
    with setup.daemon() as first:
        first.wait_event(bundle_applied(1))
        assert first.stop() == 0
    written = _trail(setup.state)
    applied = next(r for r in written if r["kind"] == audit.BUNDLE_APPLIED)
    assert [r["kind"] for r in written].count(audit.GRANT_ADDED) == 4
    with setup.daemon() as second:
        second.wait_event(_ready)
        assert (setup.attempt(A), setup.attempt(7003)) == ("OK", "EPERM")
        assert second.stop() == 0
    again = [r for r in _trail(setup.state)[len(written):]
             if str(r["kind"]).startswith(("bundle.", "grant."))]
    assert [r["kind"] for r in again] == [audit.BUNDLE_RESTORED]
    fields = again[0]["fields"]
    assert isinstance(fields, dict)
    assert (fields["version"], fields["grants"], fields["recorded"]) == (1, 4, applied["seq"])
    assert audit.verify(setup.state / "audit.jsonl").ok
    # A trail missing some of the grant records its bundle.applied announced (a daemon
    # killed while writing them, its head not yet written) gets every grant again.
    trail = setup.state / "audit.jsonl"
    last_grant = max(i for i, r in enumerate(written) if r["kind"] == audit.GRANT_ADDED)
    lines = trail.read_text().splitlines()[:last_grant]
    trail.write_text("\n".join(lines) + "\n")
    audit.head_path(trail).unlink()
    with setup.daemon() as third:
        third.wait_event(_ready)
        assert third.stop() == 0
    redone = [r["kind"] for r in _trail(setup.state)[last_grant:]
              if str(r["kind"]).startswith(("bundle.", "grant."))]
    assert redone == [audit.BUNDLE_APPLIED] + [audit.GRANT_ADDED] * 4
    assert audit.verify(trail).ok


def test_a_restart_after_a_delta_records_the_restored_state_once(setup: Setup) -> None:
    from ztnet.fsutil import replace_atomic
    from ztnet.testing.daemon import make_delta, tcp_grant

    setup.publish(1, [A])
    delta, _ = make_delta(setup.key, setup.bundle.read_bytes(), 2,
                          add=[tcp_grant(0x5EED_0000_0000_0001, f"{setup.pair.b.ipv4}/32", NEVER)])
    with setup.daemon() as first:
        first.wait_event(bundle_applied(1))
        mark = first.mark()
        replace_atomic(setup.bundle, delta)
        first.wait_event(lambda e: e.get("event") == "delta applied", start=mark)
        assert first.stop() == 0
    written = _trail(setup.state)
    with setup.daemon() as second:
        second.wait_event(_ready)
        assert (setup.attempt(A), setup.attempt(NEVER)) == ("OK", "OK")
        assert second.stop() == 0
    again = [r for r in _trail(setup.state)[len(written):]
             if str(r["kind"]).startswith(("bundle.", "grant."))]
    assert [(r["kind"], r["fields"]["version"]) for r in again] == [  # type: ignore[index]
        (audit.BUNDLE_RESTORED, 2)]
    assert audit.verify(setup.state / "audit.jsonl").ok


def test_pins_of_another_build_are_replaced_and_removed(instance: Instance) -> None:
    from ztnet.datapath.datapath import Datapath

    with Datapath.open(instance) as first:
        assert first.programs is not None
        stamp = first.programs.stamp
    stale = instance.pin_dir / loader.PROGRAMS_DIR / "0000000000000000"
    (instance.pin_dir / loader.PROGRAMS_DIR / stamp).rename(stale)  # as if built by another version
    with Datapath.open(instance) as second:
        assert second.programs is not None and second.programs.compiled
        assert [p.name for p in (instance.pin_dir / loader.PROGRAMS_DIR).iterdir()] == [stamp]
    assert set(loader.attached_counts(instance).values()) == {1}


def _attached_ids(instance: Instance) -> dict[str, list[int]]:
    import os

    from ztnet.datapath.bpfsys import attached_prog_ids

    fd = os.open(instance.cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {spec.function: attached_prog_ids(fd, spec.attach_type)
                for spec in loader.PROGRAMS}
    finally:
        os.close(fd)


def test_a_resync_that_finds_nothing_writes_nothing_and_drift_is_still_found(
        instance: Instance) -> None:
    import ctypes
    import time

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ztnet.datapath import abi
    from ztnet.datapath.bpfsys import PinnedMap
    from ztnet.datapath.datapath import Datapath
    from ztnet.grants.bundle import verify_bundle
    from ztnet.testing.daemon import HOST, make_bundle

    key = Ed25519PrivateKey.generate()
    ports = [str(port) for port in range(7000, 7040)]
    verified = verify_bundle(make_bundle(key, 1, "10.77.0.0/16", ports),
                             trusted=[key.public_key()], host=HOST, min_version=0,
                             now=time.time())
    with Datapath.open(instance) as datapath:
        installed = datapath.install(verified)
        for _ in range(3):  # the first compares in full, the next ones by digest
            synced = datapath.resync(verified)
            assert synced.drift.total == 0
            assert (synced.applied.written, synced.applied.deleted) == (0, 0)
        entries = datapath.kernel_entries()
        assert len(entries) == installed.entries
        victim, value = next(iter(entries.items()))
        rogue = abi.EntryKey(victim.agent, victim.proto, victim.family, victim.port_bits,
                             9999, victim.addr, victim.addr_bits)
        with PinnedMap(instance.pin_dir / "zt_grants_v1") as trie:  # as another writer would
            trie.update(ctypes.c_buffer(rogue.packed(datapath.generation), abi.GRANT_KEY_SIZE),
                        ctypes.c_buffer(value.packed(), abi.GRANT_VALUE_SIZE))
        synced = datapath.resync(verified)
        assert synced.drift.extra == 1 and rogue not in datapath.kernel_entries()
        assert datapath.resync(verified).drift.total == 0


def test_the_generation_left_is_read_back_before_it_is_written_and_its_drift_is_found(
        instance: Instance) -> None:
    # The daemon keeps no copy of the generation it left (at 100,000 grants a second copy
    # of every entry), only its fingerprint: the resync still finds drift there, and the
    # next whole install diffs against what the kernel holds there, so whatever else got
    # in meanwhile is gone before that generation goes live.
    import ctypes
    import time

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ztnet.datapath import abi
    from ztnet.datapath.bpfsys import PinnedMap
    from ztnet.datapath.datapath import Datapath
    from ztnet.grants.bundle import VerifiedBundle, verify_bundle
    from ztnet.testing.daemon import HOST, make_bundle

    key = Ed25519PrivateKey.generate()

    def verified(version: int, ports: range) -> VerifiedBundle:
        return verify_bundle(make_bundle(key, version, "10.78.0.0/16", [str(p) for p in ports]),
                             trusted=[key.public_key()], host=HOST, min_version=0,
                             now=time.time())

    def plant(port: int, generation: int) -> abi.EntryKey:
        victim, value = next(iter(first.items()))
        rogue = abi.EntryKey(victim.agent, victim.proto, victim.family, victim.port_bits,
                             port, victim.addr, victim.addr_bits)
        with PinnedMap(instance.pin_dir / "zt_grants_v1") as trie:  # as another writer would
            trie.update(ctypes.c_buffer(rogue.packed(generation), abi.GRANT_KEY_SIZE),
                        ctypes.c_buffer(value.packed(), abi.GRANT_VALUE_SIZE))
        return rogue

    with Datapath.open(instance) as datapath:
        datapath.install(verified(1, range(7000, 7040)))
        first = datapath.kernel_entries()
        second = verified(2, range(7000, 7010))
        datapath.install(second)
        left = 1 - datapath.generation
        assert datapath.kernel_entries(left) == first  # left as it was
        assert datapath.resync(second).drift.total == 0
        rogue = plant(9999, left)
        third = verified(3, range(7000, 7020))
        installed = datapath.install(third)
        assert datapath.generation == left
        live = datapath.kernel_entries()
        assert rogue not in live and len(live) == installed.entries
        assert {key.port for key in live} == set(range(7000, 7020))
        # the generation the second bundle left is known by its fingerprint only
        left = 1 - datapath.generation
        assert datapath.resync(third).drift.total == 0
        rogue = plant(9998, left)
        synced = datapath.resync(third)
        assert (synced.drift.extra, synced.drift.missing, synced.drift.changed) == (1, 0, 0)
        assert "not itemized" in synced.drift.samples[0]
        assert rogue not in datapath.kernel_entries(left)
        assert datapath.resync(third).drift.total == 0
