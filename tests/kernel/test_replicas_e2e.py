"""A real daemon following two controller replicas over one real PostgreSQL, against the
real kernel: the replica it follows is killed mid-stream and it carries on with the other
(missing no revocation made meanwhile); the database stops and the host keeps enforcing
what it holds until that lapses, then resumes when the database is back."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.kernel.test_controller_e2e import AGENT, NEVER, A, B, Lab, event, policy
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair
from ztnet.lab.servers import ServerProcess
from ztnet.pki import fingerprint
from ztnet.testing.controller import (
    ControllerProcess,
    create_token,
    init_controller,
    replica_state,
)
from ztnet.testing.daemon import HOST, DaemonProcess, bundle_applied
from ztnet.testing.postgres import PostgresServer


@pytest.fixture
def replica_lab(instance: Instance, tmp_path: Path) -> Iterator[Lab]:
    with NetnsPair() as pair, ServerProcess(pair.b.netns, bind=[pair.b.ipv4], tcp=[A, B, NEVER]):
        yield Lab(instance, pair, tmp_path / "state")


def enroll_host(controller: ControllerProcess, state: Path) -> None:
    ca = fingerprint(x509.load_pem_x509_certificate(controller.state.ca_pem))
    token = create_token(controller.state, HOST)
    done = subprocess.run([sys.executable, "-m", "ztnet.cli", "enroll", "--controller",
                           controller.enroll_address, f"--token={token}", "--ca-fingerprint",
                           ca, "--state", str(state), "--host", HOST],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def test_a_killed_replicas_host_moves_to_the_other_and_misses_no_revocation(
        replica_lab: Lab, tmp_path: Path, postgres_server: PostgresServer) -> None:
    lab = replica_lab
    state = init_controller(tmp_path / "a", database=postgres_server.create_database())
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(policy(lab, A, B))
    quick = ["--apply-timeout", "1s"]
    with ControllerProcess(state, policy=policy_file, extra_args=quick) as a, \
            ControllerProcess(replica_state(state, tmp_path / "b"), extra_args=quick) as b:
        enroll_host(a, lab.state)
        with DaemonProcess(lab.instance, None, None, lab.state,
                           controller=f"{a.address},{b.address}") as daemon:
            applied = daemon.wait_event(event("bundle applied"))
            daemon.wait_event(event("controller connected", controller=a.address))
            assert (lab.attempt(A), lab.attempt(NEVER)) == ("OK", "EPERM")
            mark = daemon.mark()
            killed = time.monotonic()
            a.stop(signal.SIGKILL)
            # a revocation made while the host is between replicas
            with b.admin() as admin:
                revoked = admin.revoke(AGENT).version
            connected = daemon.wait_event(event("controller connected", controller=b.address),
                                          start=mark)
            # it resumes from the version it holds: B knows that version was A's
            assert int(str(connected["version_held"])) >= int(str(applied["version"]))
            daemon.wait_event(bundle_applied(revoked), start=mark)
            failover = time.monotonic() - killed
            assert (lab.attempt(A), lab.attempt(B)) == ("EPERM", "EPERM"), failover
            with b.admin() as admin:
                restored = admin.revoke(AGENT, restore=True).version
            daemon.wait_event(bundle_applied(restored), start=mark)
            assert lab.attempt(A) == "OK"


@pytest.mark.fault
def test_without_the_database_grants_hold_then_lapse_and_come_back_with_it(
        replica_lab: Lab, tmp_path: Path, postgres_server: PostgresServer) -> None:
    lab = replica_lab
    state = init_controller(tmp_path / "a", database=postgres_server.create_database())
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(policy(lab, A))
    # 6 s grants, renewed every 3 s (as the controller-away test in test_controller_e2e)
    with ControllerProcess(state, policy=policy_file, extra_args=["--grant-ttl", "6s"]) as a:
        enroll_host(a, lab.state)
        with DaemonProcess(lab.instance, None, None, lab.state, controller=a.address) as daemon:
            daemon.wait_event(event("bundle applied"))
            mark = daemon.mark()
            postgres_server.stop()
            try:
                daemon.wait_event(event("controller disconnected"), start=mark)
                deadline = time.monotonic() + 15
                while lab.attempt(A) != "EPERM":  # the held grants lapse in the kernel
                    assert time.monotonic() < deadline, "grants did not lapse"
                assert lab.attempt(NEVER) == "EPERM"  # (nothing new was issued meanwhile)
            finally:
                postgres_server.restart()
            daemon.wait_event(event("bundle applied"), start=mark)
            assert lab.attempt(A) == "OK"
