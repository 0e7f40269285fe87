"""TPM-bound host identity end to end: a real `ztnet controller serve`, real software TPMs
(swtpm, one per test, with EK certificates from a test CA), `ztnet enroll --tpm`, and
renewals signed by the enrollment key."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztnet import pki
from ztnet.cli.controller import revoke_host
from ztnet.cli.operator import hosts as print_hosts
from ztnet.daemon import renewal
from ztnet.daemon.credentials import HostCredentials
from ztnet.daemon.enroll import TpmOptions, enroll
from ztnet.errors import ControllerError, TpmError
from ztnet.identity import tpm as tpm_device
from ztnet.identity.tpm import Tpm, load_key_ref
from ztnet.testing.controller import (
    ROOT,
    ControllerProcess,
    ControllerState,
    create_token,
    init_controller,
)
from ztnet.testing.nodes import enroll as software_enroll
from ztnet.testing.nodes import make_csr
from ztnet.testing.swtpm import EkAuthority, SoftwareTpm
from ztnet.testing.tpmhost import TpmHost
from ztnet.v1 import node_pb2, node_pb2_grpc

HOST_CERT_TTL = 8.0


@pytest.fixture(scope="module")
def tpm_state(tmp_path_factory: pytest.TempPathFactory) -> ControllerState:
    return init_controller(tmp_path_factory.mktemp("tpm-controller") / "state")


@pytest.fixture(scope="module")
def controller(tpm_state: ControllerState,
               ek_authority: EkAuthority) -> Iterator[ControllerProcess]:
    with ControllerProcess(tpm_state, extra_args=[
            "--tpm-ek-ca", str(ek_authority.bundle),
            "--host-cert-ttl", f"{HOST_CERT_TTL:.0f}s"]) as process:
        yield process
    assert process.stop() == 0, process.log()


def fingerprint(controller: ControllerProcess) -> str:
    return pki.fingerprint(x509.load_pem_x509_certificate(controller.state.ca_pem))


def tpm_enroll(controller: ControllerProcess, tpm: SoftwareTpm, host: str,
               state: Path) -> None:
    token = create_token(controller.state, host, require_tpm=True)
    enroll(controller.enroll_address, token, fingerprint(controller), state, host=host,
           tpm=TpmOptions(tpm.tcti))


def renew(controller: ControllerProcess, state: Path) -> bytes:
    credentials = HostCredentials(state)
    with controller.channel(key_pem=credentials.key_pem,
                            cert_pem=credentials.cert_pem) as channel:
        pem = renewal.renew(node_pb2_grpc.NodeServiceStub(channel), credentials, 10)
    credentials.store_certificate(pem)
    return pem


def listed(controller: ControllerProcess, host: str) -> str:
    out = io.StringIO()
    with controller.admin() as admin:
        print_hosts(admin, out=out)
    line = next(row for row in out.getvalue().splitlines() if row.startswith(host + " "))
    return line


def test_enroll_with_the_cli_then_renew(controller: ControllerProcess,
                                        swtpm: Callable[..., SoftwareTpm],
                                        tmp_path: Path) -> None:
    tpm = swtpm()
    token = create_token(controller.state, "tpm-web-1", require_tpm=True)
    state = tmp_path / "host"
    done = subprocess.run(
        [sys.executable, "-m", "ztnet.cli", "enroll", "--controller",
         controller.enroll_address, f"--token={token}", "--ca-fingerprint",
         fingerprint(controller), "--state", str(state), "--host", "tpm-web-1", "--tpm",
         "--tpm-swtpm", tpm.address], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "enrolled tpm-web-1" in done.stdout

    ref = load_key_ref(state)
    assert ref is not None and ref.tcti == tpm.tcti
    # only handles and public parts reach the disk: the one private key is the mTLS key
    stored = json.loads((state / "tpm.json").read_text())
    assert set(stored) == {"tcti", "handle", "public", "ek_hash"}
    assert [p.name for p in state.iterdir() if b"PRIVATE" in p.read_bytes()] == ["host.key"]
    with Tpm(tpm.tcti) as opened:
        ek_public, _ = opened.endorsement()
    assert ref.ek_hash == tpm_device.ek_hash_of(ek_public)
    assert f"tpm {ref.ek_hash}" in listed(controller, "tpm-web-1")

    before = HostCredentials(state).cert
    renewed = x509.load_pem_x509_certificate(renew(controller, state))
    assert renewed.serial_number != before.serial_number
    assert pki.same_public_key(renewed, HostCredentials(state).key)
    # the lifetime is the controller's --host-cert-ttl (plus its clock-skew backdating)
    assert pki.not_after(renewed) <= time.time() + HOST_CERT_TTL + 1


def test_enrollment_reuses_the_key_in_the_tpm(controller: ControllerProcess,
                                              swtpm: Callable[..., SoftwareTpm],
                                              tmp_path: Path) -> None:
    tpm = swtpm()
    tpm_enroll(controller, tpm, "tpm-again", tmp_path / "first")
    tpm_enroll(controller, tpm, "tpm-again", tmp_path / "second")
    first, second = load_key_ref(tmp_path / "first"), load_key_ref(tmp_path / "second")
    assert first is not None and second is not None and first.public == second.public
    renew(controller, tmp_path / "second")


def test_a_state_directory_copied_to_another_tpm_cannot_renew(
        controller: ControllerProcess, swtpm: Callable[..., SoftwareTpm],
        tmp_path: Path) -> None:
    original, thief = swtpm(), swtpm()
    state = tmp_path / "host"
    tpm_enroll(controller, original, "tpm-stolen", state)
    enrolled_cert = HostCredentials(state).cert
    copy = tmp_path / "copy"
    shutil.copytree(state, copy)
    ref = load_key_ref(copy)
    assert ref is not None

    # as the thief: point the copy at the other machine's TPM ...
    (copy / "tpm.json").write_bytes(tpm_device.KeyRef(
        thief.tcti, ref.handle, ref.public, ref.ek_hash).to_json())
    with pytest.raises(TpmError, match="no key at 0x81017a01"):
        renew(controller, copy)
    # ... and give it an enrollment key of its own at the same handle, named in tpm.json
    with Tpm(thief.tcti) as tpm:
        own = tpm.enrollment_key(ref.handle)
    (copy / "tpm.json").write_bytes(tpm_device.KeyRef(
        thief.tcti, ref.handle, own, ref.ek_hash).to_json())
    with pytest.raises(grpc.RpcError) as refused:
        renew(controller, copy)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "not a valid signature by this host's enrollment key" in refused.value.details()
    # without tpm.json the daemon would ask as a software host: refused too
    (copy / "tpm.json").unlink()
    with pytest.raises(grpc.RpcError) as unsigned:
        renew(controller, copy)
    assert unsigned.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "needs a fresh nonce" in unsigned.value.details()

    # the real host still renews (its TPM has the key) ...
    renew(controller, state)
    # ... and the copy's certificate dies on schedule
    deadline = pki.not_after(enrolled_cert)
    assert deadline <= time.time() + HOST_CERT_TTL
    while time.time() <= deadline + 0.5:  # waiting for the clock is the point here
        time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as expired:
        with controller.channel(key_pem=(copy / "host.key").read_bytes(),
                                cert_pem=(copy / "host.pem").read_bytes()) as channel:
            node_pb2_grpc.NodeServiceStub(channel).BeginRenewal(
                node_pb2.BeginRenewalRequest(), timeout=5)
    assert expired.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.UNAUTHENTICATED)


def test_require_tpm_refuses_software_enrollment(controller: ControllerProcess,
                                                  swtpm: Callable[..., SoftwareTpm],
                                                  tmp_path: Path) -> None:
    token = create_token(controller.state, "tpm-only", require_tpm=True)
    with pytest.raises(grpc.RpcError) as refused:
        software_enroll(controller, "tpm-only", token=token)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "requires TPM attestation" in refused.value.details()
    # the refusal used nothing up: the same token enrolls with the TPM
    tpm = swtpm()
    enroll(controller.enroll_address, token, fingerprint(controller), tmp_path / "h",
           host="tpm-only", tpm=TpmOptions(tpm.tcti))
    assert "tpm sha256:" in listed(controller, "tpm-only")


def test_software_enrollment_stays_available_and_labelled(
        controller: ControllerProcess) -> None:
    software_enroll(controller, "soft-1")
    assert " software " in listed(controller, "soft-1") + " "


def test_one_tpm_is_one_host_until_revoked(controller: ControllerProcess,
                                           swtpm: Callable[..., SoftwareTpm],
                                           tmp_path: Path) -> None:
    tpm = swtpm()
    tpm_enroll(controller, tpm, "tpm-first", tmp_path / "a")
    with pytest.raises(ControllerError, match="enrolled as host tpm-first"):
        tpm_enroll(controller, tpm, "tpm-second", tmp_path / "b")
    revoke_host(controller.state.root, "tpm-first", out=io.StringIO())
    assert "revoked" in listed(controller, "tpm-first")
    tpm_enroll(controller, tpm, "tpm-second", tmp_path / "c")


def test_a_renewal_signature_is_for_one_nonce_and_one_key(controller: ControllerProcess,
                                                          swtpm: Callable[..., SoftwareTpm],
                                                          tmp_path: Path) -> None:
    tpm = swtpm()
    state = tmp_path / "host"
    tpm_enroll(controller, tpm, "tpm-renew", state)
    credentials = HostCredentials(state)
    ref = load_key_ref(state)
    assert ref is not None
    spki = credentials.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    other = ec.generate_private_key(ec.SECP256R1())
    with controller.channel(key_pem=credentials.key_pem,
                            cert_pem=credentials.cert_pem) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)

        def renew_with(nonce: bytes, signature: bytes, csr: bytes) -> object:
            return stub.RenewCertificate(node_pb2.RenewCertificateRequest(
                csr_pem=csr, nonce=nonce, tpm_signature=signature), timeout=10)

        nonce = stub.BeginRenewal(node_pb2.BeginRenewalRequest(), timeout=10).nonce
        assert len(nonce) == 32
        signature = tpm_device.sign_renewal(ref, credentials.identity.spiffe_id, nonce, spki)
        # the signature binds the CSR's key: another key's CSR is refused (nonce used up)
        with pytest.raises(grpc.RpcError) as wrong_key:
            renew_with(nonce, signature, make_csr(other, "tpm-renew"))
        assert wrong_key.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "tpm_signature is not a valid signature" in wrong_key.value.details()

        nonce = stub.BeginRenewal(node_pb2.BeginRenewalRequest(), timeout=10).nonce
        signature = tpm_device.sign_renewal(ref, credentials.identity.spiffe_id, nonce, spki)
        renew_with(nonce, signature, credentials.csr())
        # a nonce works once
        with pytest.raises(grpc.RpcError) as replayed:
            renew_with(nonce, signature, credentials.csr())
        assert replayed.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "needs a fresh nonce" in replayed.value.details()


def test_a_software_host_renews_without_a_nonce(controller: ControllerProcess) -> None:
    identity = software_enroll(controller, "soft-renew")
    with controller.channel(key_pem=identity.key_pem, cert_pem=identity.cert_pem) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        assert stub.BeginRenewal(node_pb2.BeginRenewalRequest(), timeout=10).nonce == b""
        key = serialization.load_pem_private_key(identity.key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        stub.RenewCertificate(node_pb2.RenewCertificateRequest(
            csr_pem=make_csr(key, "soft-renew")), timeout=10)


def test_a_controller_without_tpm_trust_refuses_tpm_enrollment(
        swtpm: Callable[..., SoftwareTpm], tmp_path: Path) -> None:
    with ControllerProcess(init_controller(tmp_path / "state")) as plain:
        with TpmHost(plain, "tpm-plain", swtpm().tcti) as host:
            with pytest.raises(grpc.RpcError) as refused:
                host.begin(create_token(plain.state, "tpm-plain"))
        assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "trusts no TPM" in refused.value.details()
        software_enroll(plain, "soft-plain")  # software enrollment still works


def test_without_a_persistent_ek_the_ek_is_made_from_its_template(
        controller: ControllerProcess, swtpm: Callable[..., SoftwareTpm],
        tmp_path: Path) -> None:
    tpm = swtpm()  # swtpm_setup provisions the RSA EK at 0x81010001, as vendors may
    with Tpm(tpm.tcti) as opened:
        provisioned, _ = opened.endorsement()
        persistent = opened.esys.tr_from_tpmpublic(tpm_device.EK_PERSISTENT_HANDLE)
        opened.esys.evict_control(opened.tss.ESYS_TR.OWNER, persistent,
                                  tpm_device.EK_PERSISTENT_HANDLE)
    with Tpm(tpm.tcti) as opened:
        created, _ = opened.endorsement()
    assert created == provisioned  # the same key, from the endorsement seed
    tpm_enroll(controller, tpm, "tpm-no-persistent-ek", tmp_path / "host")
    renew(controller, tmp_path / "host")
