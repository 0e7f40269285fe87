"""Controllers of their own: renewal, graceful stop, restart with the state
kept, the --policy file rule, refusing to start on bad input."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from ztnet.testing.controller import ControllerProcess, init_controller, policy_toml, write_policy
from ztnet.testing.nodes import FakeNode, enroll

POLICY = {"bot": [("10.0.0.1", "443")]}


def test_bundles_are_renewed_with_a_new_version_before_they_expire(tmp_path: Path) -> None:
    state = init_controller(tmp_path / "state")
    policy = write_policy(tmp_path, POLICY)
    with ControllerProcess(state, policy=policy, extra_args=["--grant-ttl", "2s"]) as controller:
        with FakeNode(controller, enroll(controller, "renewed")) as node:
            first = node.next_push()
            first_bundle = node.verify(first)
            node.ack(first)
            started = time.monotonic()
            renewal = node.next_push(timeout=5)
            waited = time.monotonic() - started
            renewed = node.verify(renewal, min_version=first.version)
    assert renewal.version > first.version
    assert renewed.bundle.expires > first_bundle.bundle.expires
    assert renewed.grants[0].grant_id == first_bundle.grants[0].grant_id
    # renewed at half the 2 s lifetime: well before the first bundle lapsed
    assert waited < 1.9 and time.time() < first_bundle.bundle.expires + 0.5
    assert "reason=renewal" in controller.log()


def test_sigterm_ends_streams_and_exits_cleanly(tmp_path: Path) -> None:
    state = init_controller(tmp_path / "state")
    controller = ControllerProcess(state, policy=write_policy(tmp_path, POLICY))
    with controller:
        node = FakeNode(controller, enroll(controller, "stopping"))
        node.next_push()
        assert controller.stop(signal.SIGTERM) == 0
        error = node.ended()
        node.close()
    assert error is not None and error.code() is grpc.StatusCode.UNAVAILABLE
    assert "controller stopping" in controller.log()
    assert not controller.ready_file.exists()


def test_a_restart_keeps_the_state_and_versions_only_grow(tmp_path: Path) -> None:
    state = init_controller(tmp_path / "state")
    policy_file = write_policy(tmp_path, POLICY)
    with ControllerProcess(state, policy=policy_file) as first:
        identity = enroll(first, "survivor")
        applied = policy_toml({"bot": [("10.0.0.7", "443")]})
        with first.admin() as admin:
            version = admin.apply_policy(applied).version
        with FakeNode(first, identity) as node:
            seen = node.next_push().version
    # The file is older than the policy applied through the API: it is not re-applied.
    os.utime(policy_file, (time.time() - 3600, time.time() - 3600))
    with ControllerProcess(state, policy=policy_file, admin=first.admin_dir) as second:
        with second.admin() as admin:
            stored = admin.get_policy()
            assert (stored.version, stored.policy_toml) == (version, applied)
            hosts = {host.name for host in admin.list_hosts().hosts}
        with FakeNode(second, identity) as node:  # the host certificate is still good
            assert node.next_push().version > seen
        assert "policy file not applied" in second.log()
    assert "survivor" in hosts


def test_a_newer_policy_file_is_applied_at_start(tmp_path: Path) -> None:
    state = init_controller(tmp_path / "state")
    with ControllerProcess(state, policy=write_policy(tmp_path, POLICY)) as first:
        with first.admin() as admin:
            old = admin.get_policy().version
    newer = write_policy(tmp_path, {"bot": [("10.0.0.9", "22")]}, name="newer.toml")
    with ControllerProcess(state, policy=newer, admin=first.admin_dir) as second:
        with second.admin() as admin:
            current = admin.get_policy()
    assert current.version > old and "10.0.0.9" in current.policy_toml


@pytest.mark.parametrize("policy, message", [
    ('trust_domain = "test.example"\n[agents.bot]\nallow = 3\n', "policy:"),
    (policy_toml(POLICY, trust_domain="elsewhere.example"), "trust domain"),
])
def test_a_bad_policy_file_stops_the_start(tmp_path: Path, policy: str, message: str) -> None:
    state = init_controller(tmp_path / "state")
    path = tmp_path / "bad.toml"
    path.write_text(policy)
    with pytest.raises(RuntimeError, match="controller exited with 2") as excinfo:
        ControllerProcess(state, policy=path).start()
    assert message in str(excinfo.value)


def test_an_address_in_use_stops_the_start(tmp_path: Path) -> None:
    state = init_controller(tmp_path / "state")
    with ControllerProcess(state) as running:
        clash = ControllerProcess(state, admin=running.admin_dir)
        clash.argv[clash.argv.index("--listen") + 1] = running.address
        try:
            with pytest.raises(RuntimeError, match="cannot listen on"):
                clash.start()
        finally:
            clash.stop(signal.SIGKILL)
