"""Signed deltas against the real daemon and kernel: one grant added or revoked on a
running host, entry by entry, with every rejection changing nothing, established flows
of a revoked grant cut, and the chain restored whole after a restart."""

from __future__ import annotations

import json
import time

from tests.kernel import test_daemon
from ztnet.datapath.datapath import teardown
from ztnet.fsutil import replace_atomic
from ztnet.grants.bundle import verify_bundle
from ztnet.grants.keys import generate_keypair, load_private_key
from ztnet.testing.agents import LineProcess, agent_argv, traffic_argv
from ztnet.testing.daemon import BundleFileHost as Setup
from ztnet.testing.daemon import DaemonProcess, bundle_applied, make_bundle, make_delta, tcp_grant

A, B, C, NEVER = test_daemon.A, test_daemon.B, test_daemon.C, test_daemon.NEVER
setup = test_daemon.setup  # the same fixture: a bundle-file daemon, servers on A, B, C, NEVER
AGENT = "bot"
NEW_ID = 0x5EED_0000_0000_0001


def _bundle_outcome(e: dict[str, object]) -> bool:
    return str(e.get("event")).startswith(("bundle ", "delta "))


def grant_of_port(setup: Setup, envelope: bytes, port: int) -> int:
    held = verify_bundle(envelope, trusted=[setup.key.public_key()], host=None,
                         min_version=0, now=time.time())
    (grant_id,) = [g.grant_id for g in held.grants if g.ports and g.ports.first == port]
    return grant_id


def send(setup: Setup, daemon: DaemonProcess, envelope: bytes) -> dict[str, object]:
    mark = daemon.mark()
    replace_atomic(setup.bundle, envelope)
    return daemon.wait_event(_bundle_outcome, start=mark)


def test_a_delta_revokes_and_adds_one_grant_and_cuts_the_revoked_flow(setup: Setup) -> None:
    base = make_bundle(setup.key, 1, f"{setup.pair.b.ipv4}/32", [str(A), str(B)])
    replace_atomic(setup.bundle, base)
    with setup.daemon() as daemon:
        daemon.wait_event(bundle_applied(1))
        assert (setup.attempt(A), setup.attempt(B), setup.attempt(C)) == ("OK", "OK", "EPERM")
        holder = LineProcess.start(agent_argv(setup.instance, AGENT, traffic_argv(
            "hold", setup.pair.b.ipv4, str(B), "--interval", "0.05", "--limit", "200"),
            netns=setup.pair.a.netns, user="nobody"))
        try:
            assert holder.read()["event"] == "connected"
            delta, _ = make_delta(setup.key, base, 2, revoke=[grant_of_port(setup, base, B)],
                                  add=[tcp_grant(NEW_ID, f"{setup.pair.b.ipv4}/32", C)])
            event = send(setup, daemon, delta)
            assert event["event"] == "delta applied", event
            assert (event["added"], event["revoked"], event["grants"]) == (1, 1, 2)
            assert float(str(event["enforce_ms"])) > 0
            broken = holder.read()  # the established flow of the revoked grant is cut
        finally:
            holder.kill()
        assert broken["event"] == "broken", broken
        assert (setup.attempt(A), setup.attempt(B), setup.attempt(C)) == ("OK", "EPERM", "OK")
        recorded = json.loads((setup.state / "applied.json").read_text())
        assert (recorded["version"], recorded["bundle_version"]) == (2, 1)
        assert recorded["payload_sha256"].startswith(str(event["payload_sha256"]))
        assert len(list((setup.state / "applied-deltas").glob("*.json"))) == 1
        # the same delta again (a SIGHUP, a rewritten file) changes nothing
        assert send(setup, daemon, delta)["event"] == "bundle unchanged"


def test_every_rejected_delta_leaves_the_enforced_set_as_it_was(setup: Setup) -> None:
    to = f"{setup.pair.b.ipv4}/32"
    base = make_bundle(setup.key, 5, to, [str(A)])
    other = make_bundle(setup.key, 5, to, [str(A), str(NEVER)])  # same version, other bytes
    a_id = grant_of_port(setup, base, A)
    wide = [tcp_grant(NEW_ID, to, NEVER)]
    good, good_delta = make_delta(setup.key, base, 6, add=[tcp_grant(NEW_ID + 1, to, C)])
    later, _ = make_delta(setup.key, good_delta, 7, add=wide)
    cases = {
        "based on another bundle of the same version": make_delta(setup.key, other, 6,
                                                                  add=wide)[0],
        "based on a version not held": make_delta(setup.key, base, 9, add=wide,
                                                  base_version=4)[0],
        "out of order (stands on a delta not applied)": later,
        "for another host": make_delta(setup.key, base, 6, add=wide, host="otherhost")[0],
        "revokes a grant not held": make_delta(setup.key, base, 6, add=wide,
                                               revoke=[NEW_ID + 99])[0],
        "adds a grant id already held": make_delta(
            setup.key, base, 6, add=[tcp_grant(a_id, to, NEVER)])[0],
        "adds an expired grant": make_delta(
            setup.key, base, 6, add=[tcp_grant(NEW_ID, to, NEVER, now=time.time() - 7200,
                                               ttl=60)])[0],
        "signed by an unknown key": make_delta(setup.key, base, 6, add=wide, sign_with=(
            load_private_key(generate_keypair(setup.state.parent / "other-keys")[0])))[0],
    }
    replace_atomic(setup.bundle, base)
    with setup.daemon() as daemon:
        daemon.wait_event(bundle_applied(5))
        for case, envelope in cases.items():
            event = send(setup, daemon, envelope)
            assert event["event"] == "bundle rejected", (case, event)
            assert str(event["reason"]).startswith(("delta:", "bundle: signed by untrusted")), \
                (case, event)
            assert (setup.attempt(A), setup.attempt(NEVER)) == ("OK", "EPERM"), case
            assert json.loads((setup.state / "applied.json").read_text())["version"] == 5
        assert not (setup.state / "applied-deltas").exists()
        assert send(setup, daemon, good)["event"] == "delta applied"
        assert setup.attempt(C) == "OK"


def test_restart_restores_the_bundle_and_its_deltas_whole(setup: Setup) -> None:
    to = f"{setup.pair.b.ipv4}/32"
    base = make_bundle(setup.key, 1, to, [str(A), str(B)])
    first, first_delta = make_delta(setup.key, base, 2, revoke=[grant_of_port(setup, base, B)])
    second, _ = make_delta(setup.key, first_delta, 3, add=[tcp_grant(NEW_ID, to, C)])
    replace_atomic(setup.bundle, base)
    with setup.daemon() as daemon:
        daemon.wait_event(bundle_applied(1))
        assert send(setup, daemon, first)["event"] == "delta applied"
        assert send(setup, daemon, second)["event"] == "delta applied"
        assert daemon.stop() == 0
    teardown(setup.instance)  # wipe the kernel side: only the state dir remembers
    setup.bundle.unlink()
    with setup.daemon() as daemon:
        event = daemon.wait_event(bundle_applied(3))
        assert "applied-deltas" in str(event["source"])
        assert (setup.attempt(A), setup.attempt(B), setup.attempt(C)) == ("OK", "EPERM", "OK")
        # a whole bundle replaces the chain
        replace_atomic(setup.bundle, make_bundle(setup.key, 4, to, [str(B)]))
        daemon.wait_event(bundle_applied(4))
        assert not list((setup.state / "applied-deltas").glob("*.json"))
        assert (setup.attempt(A), setup.attempt(B)) == ("EPERM", "OK")


def test_a_broken_chain_is_not_restored_in_part(setup: Setup) -> None:
    """A bundle without its later delta would bring back what the delta revoked."""
    to = f"{setup.pair.b.ipv4}/32"
    base = make_bundle(setup.key, 1, to, [str(A), str(B)])
    revoke_b, _ = make_delta(setup.key, base, 2, revoke=[grant_of_port(setup, base, B)])
    replace_atomic(setup.bundle, base)
    with setup.daemon() as daemon:
        daemon.wait_event(bundle_applied(1))
        assert send(setup, daemon, revoke_b)["event"] == "delta applied"
        assert daemon.stop() == 0
    recorded = setup.state / "applied-deltas" / "000001.json"
    tampered = json.loads(recorded.read_text())
    tampered["signatures"][0]["sig"] = "A" * 86 + "=="
    recorded.write_text(json.dumps(tampered))
    setup.bundle.unlink()
    with setup.daemon() as daemon:
        event = daemon.wait_event(_bundle_outcome)
        assert event["event"] == "bundle rejected" and "not restored" in str(event["reason"])
        # the kernel keeps what the last daemon enforced: B stays revoked
        assert (setup.attempt(A), setup.attempt(B)) == ("OK", "EPERM")
