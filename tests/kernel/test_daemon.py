"""The real `ztnet daemon` against the real kernel: only signed, current,
for-this-host bundles change what agents can reach."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ztnet.datapath.datapath import teardown
from ztnet.fsutil import replace_atomic
from ztnet.grants.bundle import BUNDLE_PAYLOAD_TYPE
from ztnet.grants.envelope import sign_envelope
from ztnet.grants.keys import generate_keypair, load_private_key
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair
from ztnet.lab.servers import ServerProcess
from ztnet.testing.agents import LineProcess, agent_argv, traffic_argv
from ztnet.testing.daemon import BundleFileHost as Setup
from ztnet.testing.daemon import bundle_applied, make_bundle

A, B, C, NEVER = 8080, 7070, 6060, 9090
AGENT = "bot"


@pytest.fixture
def setup(instance: Instance, tmp_path: Path) -> Iterator[Setup]:
    key_path, pub = generate_keypair(tmp_path / "keys")
    with NetnsPair() as pair, ServerProcess(pair.b.netns, bind=[pair.b.ipv4],
                                            tcp=[A, B, C, NEVER]):
        yield Setup(instance, pair, load_private_key(key_path), pub, tmp_path / "bundle.json",
                    tmp_path / "state")


def test_a_compiled_bundle_enforces_what_the_policy_says(setup: Setup) -> None:
    setup.publish(1, [A])
    with setup.daemon() as daemon:
        daemon.wait_event(bundle_applied(1))
        assert (setup.attempt(A), setup.attempt(NEVER)) == ("OK", "EPERM")
    assert (setup.state / "applied.json").exists()
    assert oct((setup.state).stat().st_mode & 0o777) == "0o700"


def test_every_rejection_leaves_the_previous_grant_set_in_force(
        setup: Setup, tmp_path: Path) -> None:
    other_key = Ed25519PrivateKey.generate()
    now = time.time()
    to = f"{setup.pair.b.ipv4}/32"
    good = make_bundle(setup.key, 10, to, [str(A)])
    wide = make_bundle(setup.key, 11, to, [str(A), str(NEVER)])
    envelope = json.loads(wide)
    tampered_sig = dict(envelope, signatures=[dict(envelope["signatures"][0],
                        sig=("A" if envelope["signatures"][0]["sig"][0] != "A" else "B")
                        + envelope["signatures"][0]["sig"][1:])])
    cases = {
        "bad signature": json.dumps(tampered_sig).encode(),
        "unknown key": make_bundle(other_key, 11, to, [str(A), str(NEVER)]),
        "unknown payload type": sign_envelope(b"{}", "application/x-other", setup.key),
        "another host": make_bundle(setup.key, 11, to, [str(A), str(NEVER)], host="otherhost"),
        "rollback": make_bundle(setup.key, 9, to, [str(A), str(NEVER)]),
        "expired bundle": make_bundle(setup.key, 11, to, [str(A), str(NEVER)],
                                      now=now - 7200, bundle_ttl=60),
        "malformed payload": sign_envelope(b'{"not": "a bundle"}', BUNDLE_PAYLOAD_TYPE,
                                           setup.key),
        "grant window over": make_bundle(setup.key, 11, to, [str(A), str(NEVER)], ttl="1m",
                                         now=now - 600, bundle_ttl=3600),
        "not even JSON": b"\x00garbage",
    }
    replace_atomic(setup.bundle, good)
    with setup.daemon() as daemon:
        daemon.wait_event(bundle_applied(10))
        for case, data in cases.items():
            mark = daemon.mark()
            replace_atomic(setup.bundle, data)
            event = daemon.wait_event(lambda e: str(e.get("event")).startswith("bundle "),
                                      start=mark)
            assert event["event"] == "bundle rejected", (case, event)
            assert (setup.attempt(A), setup.attempt(NEVER)) == ("OK", "EPERM"), case
            assert json.loads((setup.state / "applied.json").read_text())["version"] == 10
        mark = daemon.mark()
        replace_atomic(setup.bundle, good)  # the same version again: a no-op
        event = daemon.wait_event(lambda e: str(e.get("event")).startswith("bundle "), start=mark)
        assert event["event"] == "bundle unchanged"


def test_sighup_switches_grant_sets_atomically_under_tight_loops(setup: Setup) -> None:
    setup.publish(1, [A, B])
    with setup.daemon() as daemon:
        daemon.wait_event(bundle_applied(1))
        loops = {port: LineProcess.start(agent_argv(
            setup.instance, AGENT, traffic_argv("loop", setup.pair.b.ipv4, str(port)),
            netns=setup.pair.a.netns, user="nobody")) for port in (A, NEVER)}
        try:
            for loop in loops.values():
                assert loop.read()["event"] == "started"
            for version, ports in ((2, [A, C]), (3, [A]), (4, [A, B, C]), (5, [A])):
                setup.publish(version, ports)
                daemon.signal(signal.SIGHUP)
                daemon.wait_event(bundle_applied(version))
            assert setup.attempt(B) == "EPERM" and setup.attempt(C) == "EPERM"
            outcomes = {}
            for port, loop in loops.items():
                loop.proc.send_signal(signal.SIGUSR1)
                outcomes[port] = loop.read()["outcomes"]
        finally:
            for loop in loops.values():
                loop.kill()
    assert "EPERM" not in outcomes[A] and sum(outcomes[A].values()) > 100, outcomes
    assert set(outcomes[NEVER]) == {"EPERM"} and outcomes[NEVER]["EPERM"] > 100, outcomes


def test_restart_reapplies_the_persisted_bundle_before_anything_else(setup: Setup) -> None:
    setup.publish(3, [A])
    with setup.daemon() as daemon:
        daemon.wait_event(bundle_applied(3))
        assert daemon.stop() == 0
    teardown(setup.instance)  # wipe the kernel side: only the state dir remembers
    setup.bundle.unlink()  # and no bundle file, as if the controller were gone
    with setup.daemon() as daemon:
        event = daemon.wait_event(bundle_applied(3))
        assert "applied-bundle.json" in str(event["source"])
        assert (setup.attempt(A), setup.attempt(NEVER)) == ("OK", "EPERM")


def test_expiry_of_the_bundles_grants_cuts_flows_without_the_daemon(setup: Setup) -> None:
    with setup.daemon() as daemon:
        # issued once the daemon is up, so a slow start cannot eat the short window
        setup.publish(1, [A], ttl="10s")
        daemon.wait_event(bundle_applied(1))
        holder = LineProcess.start(agent_argv(setup.instance, AGENT, traffic_argv(
            "hold", setup.pair.b.ipv4, str(A), "--interval", "0.05", "--limit", "30"),
            netns=setup.pair.a.netns, user="nobody"))
        try:
            assert holder.read()["event"] == "connected"
            daemon.kill()
            broken = holder.read()
        finally:
            holder.kill()
    assert broken["event"] == "broken" and int(broken["sent"]) > 0
    assert setup.attempt(A) == "EPERM"


def test_the_daemon_refuses_to_start_with_a_one_line_reason(setup: Setup, tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("not a key\n")
    base = [sys.executable, "-m", "ztnet.cli", "daemon", "--instance", setup.instance.name,
            "--bundle", str(setup.bundle), "--state", str(tmp_path / "s")]
    bad = subprocess.run([*base, "--trust", str(bad_key)], capture_output=True, text=True)
    assert bad.returncode != 0
    assert len(bad.stderr.strip().splitlines()) == 1 and "bad.pub" in bad.stderr
    unprivileged = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534",
                                   "--clear-groups", *base, "--trust", str(setup.pub)],
                                  capture_output=True, text=True)
    assert unprivileged.returncode != 0
    assert len(unprivileged.stderr.strip().splitlines()) == 1
    assert "must run as root" in unprivileged.stderr


def test_a_file_mode_daemon_maps_no_grpc(setup: Setup) -> None:
    # gRPC's core is a shared object: if anything on the file-mode path imported grpc, the
    # enforcing daemon's address space would hold it (tests/unit/test_daemon_footprint.py
    # checks the same for the pure-Python dnspython, by import)
    setup.publish(1, [A])
    with setup.daemon() as daemon:
        daemon.wait_event(bundle_applied(1))
        assert setup.attempt(A) == "OK"
        assert daemon.proc is not None
        with open(f"/proc/{daemon.proc.pid}/maps", encoding="utf-8") as maps:
            mapped = {line.split()[-1] for line in maps if "/" in line}
    assert any("ztnet" in path or "python" in path for path in mapped)  # the probe reads maps
    assert [path for path in mapped if "cygrpc" in path] == []
