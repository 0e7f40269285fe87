"""Each way a TPM attestation can be wrong, refused by a real controller with a clear
error, against real software TPMs. Every test first shows the same exchange succeeding
when nothing is tampered with (so a refusal is the check under test, not a broken setup)
or changes exactly one thing from the happy path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ztnet.errors import TpmError
from ztnet.identity import tpmproof
from ztnet.identity.tpm import Tpm, ek_hash_of
from ztnet.testing.controller import (
    ControllerProcess,
    ControllerState,
    create_token,
    init_controller,
)
from ztnet.testing.swtpm import EkAuthority, SoftwareTpm
from ztnet.testing.tpmhost import TpmHost

DUPLICABLE = tpmproof.SENSITIVE_DATA_ORIGIN | tpmproof.USER_WITH_AUTH | tpmproof.SIGN
SPARE_HANDLE = tpmproof.DEFAULT_HANDLE + 1


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory,
               ek_authority: EkAuthority) -> Iterator[ControllerProcess]:
    state = init_controller(tmp_path_factory.mktemp("tpm-refusals") / "state")
    with ControllerProcess(state, extra_args=["--tpm-ek-ca", str(ek_authority.bundle)]) \
            as process:
        yield process
    assert process.stop() == 0, process.log()


def refused(call: Callable[[], object], code: grpc.StatusCode, text: str) -> str:
    with pytest.raises(grpc.RpcError) as excinfo:
        call()
    assert excinfo.value.code() is code, excinfo.value.details()
    assert text in (excinfo.value.details() or ""), excinfo.value.details()
    return str(excinfo.value.details())


def token(controller: ControllerProcess, host: str) -> str:
    return create_token(controller.state, host, require_tpm=True)


def test_the_happy_path_enrolls(controller: ControllerProcess,
                                swtpm: Callable[..., SoftwareTpm]) -> None:
    with TpmHost(controller, "ok-1", swtpm().tcti) as host:
        secret = token(controller, "ok-1")
        reply = host.enroll(secret, host.answer(host.begin(secret)))
    assert reply.attestation == "tpm"


def test_a_duplicable_enrollment_key_is_refused(controller: ControllerProcess,
                                                swtpm: Callable[..., SoftwareTpm]) -> None:
    tpm = swtpm()
    with Tpm(tpm.tcti) as opened:
        honest_public = opened.enrollment_key()
    with TpmHost(controller, "dup-1", tpm.tcti, handle=SPARE_HANDLE,
                 key_attributes=DUPLICABLE) as host:
        secret = token(controller, "dup-1")
        proof = host.answer(host.begin(secret))
        message = refused(lambda: host.enroll(secret, proof), grpc.StatusCode.PERMISSION_DENIED,
                          "enrollment_key_public is not a non-exportable enrollment key")
        assert "fixedTPM|fixedParent" in message

        # claiming a good key's public area does not help: the AK certified the real key
        proof = host.answer(host.begin(secret))
        proof.enrollment_key_public = honest_public
        refused(lambda: host.enroll(secret, proof), grpc.StatusCode.INVALID_ARGUMENT,
                "certify_info: certifies another key than enrollment_key_public")
    # and `ztnet enroll --tpm` never reuses such a key as its enrollment key
    with pytest.raises(TpmError, match="0x81017a02 is not an enrollment key"):
        TpmHost(controller, "dup-1", tpm.tcti, handle=SPARE_HANDLE)


def test_an_ak_from_another_tpm_fails_activation(controller: ControllerProcess,
                                                 swtpm: Callable[..., SoftwareTpm]) -> None:
    ours, other = swtpm(), swtpm()
    with TpmHost(controller, "ak-1", ours.tcti) as host, \
            TpmHost(controller, "ak-1", other.tcti) as foreign:
        secret = token(controller, "ak-1")
        # our EK (and certificate), the other TPM's AK
        challenge = host.begin(secret, ak_public=foreign.ak_public)
        with pytest.raises(TpmError, match="credential activation failed"):
            foreign.answer(challenge)  # the other TPM has the AK, not the EK
        # a host that cannot activate can only guess the secret
        proof = foreign.answer(challenge, secret=b"\0" * 32)
        refused(lambda: host.enroll(secret, proof), grpc.StatusCode.PERMISSION_DENIED,
                "credential activation failed (the secret does not match")


def test_a_replayed_attestation_is_refused(controller: ControllerProcess,
                                           swtpm: Callable[..., SoftwareTpm]) -> None:
    with TpmHost(controller, "replay-1", swtpm().tcti) as host:
        first = token(controller, "replay-1")
        old = host.answer(host.begin(first))
        host.enroll(first, old)
        again = token(controller, "replay-1")
        # the same answer again: its challenge is used up
        refused(lambda: host.enroll(again, old), grpc.StatusCode.PERMISSION_DENIED,
                "unknown, expired or already used challenge")
        # the old certification under a new challenge: its nonce is the old secret
        fresh = host.answer(host.begin(again))
        fresh.certify_info, fresh.certify_signature = old.certify_info, old.certify_signature
        refused(lambda: host.enroll(again, fresh), grpc.StatusCode.PERMISSION_DENIED,
                "certify_info was not made for this challenge")


def test_a_csr_for_another_key_is_refused(controller: ControllerProcess,
                                          swtpm: Callable[..., SoftwareTpm]) -> None:
    with TpmHost(controller, "csr-1", swtpm().tcti) as host:
        secret = token(controller, "csr-1")
        other = ec.generate_private_key(ec.SECP256R1())
        proof = host.answer(host.begin(secret), csr_key=other)
        refused(lambda: host.enroll(secret, proof), grpc.StatusCode.PERMISSION_DENIED,
                "csr_signature is not a valid signature by the enrollment key")


def test_an_ek_from_an_unknown_ca_is_refused(controller: ControllerProcess,
                                             swtpm: Callable[..., SoftwareTpm],
                                             tmp_path: Path) -> None:
    stranger = EkAuthority.create(tmp_path / "other-ca")
    with TpmHost(controller, "ca-1", swtpm(stranger).tcti) as host:
        refused(lambda: host.begin(token(controller, "ca-1")),
                grpc.StatusCode.PERMISSION_DENIED,
                "is not signed by a configured EK CA")


def test_a_tpm_without_ek_certificate_needs_the_allowlist(
        swtpm: Callable[..., SoftwareTpm], tmp_path: Path) -> None:
    listed_tpm, unlisted_tpm = swtpm(None), swtpm(None)
    state: ControllerState = init_controller(tmp_path / "state")
    allowlist = tmp_path / "ek-allowlist"
    with Tpm(listed_tpm.tcti) as opened:
        ek_public, _ = opened.endorsement()
    allowlist.write_text(f"# test TPMs\n{ek_hash_of(ek_public)}  # list-1\n")
    with ControllerProcess(state, extra_args=["--tpm-ek-allowlist", str(allowlist)]) \
            as controller:
        with TpmHost(controller, "list-1", unlisted_tpm.tcti) as host:
            assert host.ek_certificate == b""
            refused(lambda: host.begin(token(controller, "list-1")),
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"EK {host.ek_hash} is not on the allowlist")
        with TpmHost(controller, "list-1", listed_tpm.tcti) as host:
            secret = token(controller, "list-1")
            assert host.enroll(secret, host.answer(host.begin(secret))).attestation == "tpm"
