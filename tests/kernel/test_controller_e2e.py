"""The daemon following a controller over mutual TLS, against the real kernel.

Part 1 drives a real `ztnet daemon --controller` with a scripted controller
(tests/fake_controller.py), to push what a real controller never would: replayed, forged
and foreign bundles must be NACKed with their reason and change nothing.

Part 2 runs the real thing: `ztnet controller serve` (ztnet/testing/controller.py), hosts
enrolled with the `ztnet enroll` command, a real daemon, agents in a network namespace.
The controller's authorization rules are tested in tests/controller/; here only what an
enrolled host's own credentials can do: subscribe for itself, not for another host (a host
certificate calling admin RPCs is refused in tests/interop, from Node.js).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.fake_controller import FakeController
from ztnet.daemon.channel import controller_channel
from ztnet.daemon.credentials import HostCredentials
from ztnet.daemon.enroll import enroll
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair
from ztnet.lab.servers import ServerProcess
from ztnet.pki import fingerprint
from ztnet.testing.agents import LineProcess, agent_argv, run_traffic, traffic_argv
from ztnet.testing.controller import ControllerProcess, create_token, init_controller, policy_toml
from ztnet.testing.daemon import HOST, DaemonProcess, make_bundle
from ztnet.testing.ports import free_port
from ztnet.testing.swtpm import EkAuthority, SoftwareTpm
from ztnet.v1 import node_pb2, node_pb2_grpc

A, B, NEVER = 8080, 7070, 9090
AGENT = "bot"


@dataclass
class Lab:
    instance: Instance
    pair: NetnsPair
    state: Path

    def attempt(self, port: int) -> str:
        return str(run_traffic(self.instance, AGENT, ["tcp", self.pair.b.ipv4, str(port)],
                               netns=self.pair.a.netns, user="nobody")["result"])

    @property
    def to(self) -> str:
        return f"{self.pair.b.ipv4}/32"


@pytest.fixture
def lab(instance: Instance, tmp_path: Path) -> Iterator[Lab]:
    with NetnsPair() as pair, ServerProcess(pair.b.netns, bind=[pair.b.ipv4], tcp=[A, B, NEVER]):
        yield Lab(instance, pair, tmp_path / "state")


def event(name: str, **fields: object) -> Callable[[dict[str, object]], bool]:
    return lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items())


# --- part 1: a scripted controller ------------------------------------------------------


def test_stale_replayed_forged_and_foreign_bundles_are_nacked_and_change_nothing(
        lab: Lab) -> None:
    with FakeController() as fake:
        enroll(fake.enroll_address, fake.token(HOST), fake.ca.fingerprint, lab.state, host=HOST)
        key = fake.signing_key
        with DaemonProcess(lab.instance, None, None, lab.state,
                           controller=fake.address) as daemon:
            stream = fake.service.subscribed()
            assert stream.subscribe is not None
            assert (stream.subscribe.host, stream.subscribe.version_held) == (HOST, 0)
            answer = fake.service.push(stream, make_bundle(key, 10, lab.to, [str(A)]), 10, "n0")
            assert answer.HasField("ack") and answer.ack.version == 10
            assert (lab.attempt(A), lab.attempt(NEVER)) == ("OK", "EPERM")

            wide = [str(A), str(NEVER)]
            cases = {
                "replayed older version": (make_bundle(key, 9, lab.to, wide), "rollback"),
                "forged (unknown key)": (make_bundle(Ed25519PrivateKey.generate(), 11, lab.to,
                                                     wide), "key"),
                "for another host": (make_bundle(key, 11, lab.to, wide, host="otherhost"),
                                     "for host otherhost"),
                "same version, new content": (make_bundle(key, 10, lab.to, wide),
                                              "already applied with different content"),
                "stale (expired bundle)": (make_bundle(key, 11, lab.to, wide, bundle_ttl=0.001),
                                           "expired"),
                "not a bundle": (b"\x00garbage", ""),
            }
            for number, (case, (envelope, reason)) in enumerate(cases.items(), start=1):
                answer = fake.service.push(stream, envelope, 11, f"n{number}")
                assert answer.HasField("nack"), case
                assert reason in answer.nack.reason and answer.nack.nonce == f"n{number}", case
                assert (lab.attempt(A), lab.attempt(NEVER)) == ("OK", "EPERM"), case
            daemon.wait_event(event("controller nack", nonce=f"n{len(cases)}"))

            answer = fake.service.push(stream, make_bundle(key, 11, lab.to, wide), 11, "n-ok")
            assert answer.HasField("ack") and answer.ack.version == 11
            assert lab.attempt(NEVER) == "OK"
            assert daemon.stop() == 0

        streams = len(fake.service.streams)
        with DaemonProcess(lab.instance, None, None, lab.state, controller=fake.address):
            stream = fake.service.subscribed(after=streams)
            assert stream.subscribe is not None and stream.subscribe.version_held == 11


# --- part 2: the real controller --------------------------------------------------------


def ztnet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ztnet.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def enroll_with_cli(controller: ControllerProcess, state: Path, token: str | None = None,
                    ) -> subprocess.CompletedProcess[str]:
    """`controller token create --json` then `ztnet enroll`, as an operator would."""
    ca_fingerprint = fingerprint(x509.load_pem_x509_certificate(controller.state.ca_pem))
    if token is None:
        created = ztnet("controller", "token", "create", "--state", str(controller.state.root),
                        "--host", HOST, "--json")
        assert created.returncode == 0, created.stderr
        token_info = json.loads(created.stdout)
        assert token_info["ca_fingerprint"] == ca_fingerprint
        token = str(token_info["token"])
    # --token=…: a token may start with "-", which argparse would take for an option
    return ztnet("enroll", "--controller", controller.enroll_address, f"--token={token}",
                 "--ca-fingerprint", ca_fingerprint, "--state", str(state), "--host", HOST)


def subscribe_as(host: str, controller: ControllerProcess, state: Path) -> grpc.StatusCode:
    """Open the grant stream with an enrolled host's credentials, naming ``host``."""
    creds = HostCredentials(state)
    channel = controller_channel(controller.address, creds.ca_pem, key_pem=creds.key_pem,
                                 cert_pem=creds.cert_pem)
    request = node_pb2.GrantStreamRequest(subscribe=node_pb2.Subscribe(host=host))
    try:
        for _ in node_pb2_grpc.NodeServiceStub(channel).StreamGrants(iter([request]),
                                                                     timeout=10):
            pass
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()
    return grpc.StatusCode.OK


def unit_capabilities() -> list[str]:
    """CapabilityBoundingSet= of packaging/ztnet-daemon.service, without the CAP_ prefixes."""
    unit = Path(__file__).resolve().parents[2] / "packaging" / "ztnet-daemon.service"
    for line in unit.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return [cap.removeprefix("CAP_") for cap in line.partition("=")[2].split()]
    raise AssertionError(f"{unit} sets no CapabilityBoundingSet=")


def policy(lab: Lab, *ports: int) -> str:
    return policy_toml({AGENT: [(lab.to, str(port)) for port in ports]})


def the_host_acked(response: object) -> bool:
    results = list(response.results)  # type: ignore[attr-defined]
    return [(r.host, r.outcome) for r in results] == [(HOST, "ack")]


def test_a_token_works_once_and_not_after_it_expired(tmp_path: Path) -> None:
    state = init_controller(tmp_path / "ctl")
    node = tmp_path / "node"
    with ControllerProcess(state) as controller:
        token = create_token(state, HOST)
        assert enroll_with_cli(controller, node, token).returncode == 0
        assert subscribe_as("otherhost", controller, node) == grpc.StatusCode.PERMISSION_DENIED
        again = enroll_with_cli(controller, tmp_path / "again", token)
        assert again.returncode != 0 and "refused the token" in again.stderr
        assert "already used" in again.stderr
        expired = enroll_with_cli(controller, tmp_path / "late", create_token(state, HOST, 1e-3))
        assert expired.returncode != 0 and "expired" in expired.stderr
        assert not (tmp_path / "late" / "identity.json").exists()


def test_apply_enforce_change_and_revoke_cuts_the_established_flow(
        lab: Lab, tmp_path: Path) -> None:
    state = init_controller(tmp_path / "ctl")
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(policy(lab, A))
    with ControllerProcess(state, policy=policy_file) as controller:
        assert enroll_with_cli(controller, lab.state).returncode == 0
        # with only the capabilities the systemd unit grants: they must suffice for loading,
        # applying and cutting flows
        with DaemonProcess(lab.instance, None, None, lab.state, capabilities=unit_capabilities(),
                           controller=controller.address) as daemon, controller.admin() as admin:
            daemon.wait_event(event("bundle applied"))
            assert (lab.attempt(A), lab.attempt(B), lab.attempt(NEVER)) == ("OK", "EPERM",
                                                                            "EPERM")
            # ApplyPolicy returns once the host acknowledged: enforced from then on
            assert the_host_acked(admin.apply_policy(policy(lab, A, B)))
            assert (lab.attempt(B), lab.attempt(NEVER)) == ("OK", "EPERM")
            hosts = admin.list_hosts().hosts
            assert [(h.name, h.connected, h.in_sync) for h in hosts] == [(HOST, True, True)]

            holder = LineProcess.start(agent_argv(lab.instance, AGENT, traffic_argv(
                "hold", lab.pair.b.ipv4, str(A), "--limit", "30"),
                netns=lab.pair.a.netns, user="nobody"))
            try:
                assert holder.read()["event"] == "connected"
                assert the_host_acked(admin.revoke(AGENT))
                broken = holder.read()
            finally:
                holder.kill()
            assert (broken["event"], broken["result"]) == ("broken", "ECONNABORTED"), broken
            assert (lab.attempt(A), lab.attempt(B)) == ("EPERM", "EPERM")
            daemon.wait_event(lambda e: e.get("event") == "bundle applied"
                              and int(str(e.get("flows_cut"))) >= 1)


@pytest.mark.fault  # issue 10: controller away longer than the grant ttl
def test_without_the_controller_grants_hold_then_lapse_and_a_restart_resyncs(
        lab: Lab, tmp_path: Path) -> None:
    state = init_controller(tmp_path / "ctl")
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(policy(lab, A))
    port = free_port()
    # 6 s grants (renewed every 3 s): short enough to watch them lapse, long enough to
    # probe twice before they do.
    controller = ControllerProcess(state, policy=policy_file,
                                   extra_args=["--listen", f"127.0.0.1:{port}",
                                               "--grant-ttl", "6s"])
    with controller:
        assert enroll_with_cli(controller, lab.state).returncode == 0
        with DaemonProcess(lab.instance, None, None, lab.state,
                           controller=controller.address) as daemon:
            daemon.wait_event(event("bundle applied"))
            mark = daemon.mark()
            controller.stop(signal.SIGKILL)
            daemon.wait_event(event("controller disconnected"), start=mark)
            # the last verified bundle stays enforced ...
            assert (lab.attempt(A), lab.attempt(NEVER)) == ("OK", "EPERM")
            # ... until its grants lapse in the kernel: fail closed
            deadline = time.monotonic() + 15
            while lab.attempt(A) != "EPERM":
                assert time.monotonic() < deadline, "grants did not lapse"
            assert lab.attempt(NEVER) == "EPERM"

            mark = daemon.mark()
            controller.start()  # same state, same address
            daemon.wait_event(event("bundle applied"), start=mark)
            assert lab.attempt(A) == "OK"
            with controller.admin() as admin:
                assert the_host_acked(admin.apply_policy(policy(lab, A, B)))
            assert lab.attempt(B) == "OK"


def test_the_host_certificate_is_renewed_over_mutual_tls(instance: Instance,
                                                         tmp_path: Path) -> None:
    state = init_controller(tmp_path / "ctl")
    node = tmp_path / "node"
    # short enough to see two renewals, long enough that a loaded machine still starts
    # the daemon before the enrolled certificate expires
    with ControllerProcess(state, extra_args=["--host-cert-ttl", "16s"]) as controller:
        assert enroll_with_cli(controller, node).returncode == 0
        enrolled = x509.load_pem_x509_certificate((node / "host.pem").read_bytes())
        with DaemonProcess(instance, None, None, node, controller=controller.address) as daemon:
            first = daemon.wait_event(event("certificate renewed"))
            # renewing again needs the renewed certificate: the controller accepts it
            daemon.wait_event(lambda e: e.get("event") == "certificate renewed"
                              and e.get("serial") != first["serial"])
            daemon.wait_event(lambda e: e.get("event") == "controller connected"
                              and int(str(e.get("stream"))) >= 2)
        current = x509.load_pem_x509_certificate((node / "host.pem").read_bytes())
        assert current.serial_number != enrolled.serial_number
        assert "host certificate renewed" in controller.log()


def test_a_tpm_bound_host_enforces_renews_with_its_tpm_and_not_without(
        lab: Lab, tmp_path: Path, swtpm: Callable[..., SoftwareTpm],
        ek_authority: EkAuthority) -> None:
    tpm = swtpm()
    state = init_controller(tmp_path / "ctl")
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(policy(lab, A))
    with ControllerProcess(state, policy=policy_file, extra_args=[
            "--tpm-ek-ca", str(ek_authority.bundle), "--host-cert-ttl", "16s"]) as controller:
        created = ztnet("controller", "token", "create", "--state", str(state.root), "--host",
                        HOST, "--require-tpm", "--json")
        assert created.returncode == 0, created.stderr
        token = str(json.loads(created.stdout)["token"])
        software = enroll_with_cli(controller, tmp_path / "soft", token=token)
        assert software.returncode != 0 and "requires TPM attestation" in software.stderr
        enrolled = ztnet("enroll", "--controller", controller.enroll_address, f"--token={token}",
                         "--ca-fingerprint", fingerprint(x509.load_pem_x509_certificate(
                             state.ca_pem)), "--state", str(lab.state), "--host", HOST,
                         "--tpm", "--tpm-swtpm", tpm.address)
        assert enrolled.returncode == 0, enrolled.stderr
        with DaemonProcess(lab.instance, None, None, lab.state,
                           controller=controller.address) as daemon:
            daemon.wait_event(event("bundle applied"))
            assert (lab.attempt(A), lab.attempt(NEVER)) == ("OK", "EPERM")
            first = daemon.wait_event(event("certificate renewed"))
            daemon.wait_event(lambda e: e.get("event") == "certificate renewed"
                              and e.get("serial") != first["serial"])
            tpm.stop()  # the TPM is gone (or the state directory is elsewhere)
            failed = daemon.wait_event(event("certificate renewal failed"))
            assert "tpm:" in str(failed["reason"]), failed
            assert lab.attempt(A) == "OK"  # until the certificate and grants run out
        with controller.admin() as admin:
            (host,) = admin.list_hosts().hosts
        assert host.attestation == "tpm" and host.ek_hash.startswith("sha256:")
