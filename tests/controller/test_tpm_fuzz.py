"""Tampered attestation blobs never crash the controller: each field of a real proof (made
by a software TPM) is mutated by hypothesis and every result is a clean refusal, both in
the verification logic (an RpcFailure with a client-error code, no other exception) and
over gRPC against a running controller (a status other than INTERNAL, and the controller
still serves the untampered exchange afterwards)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztnet.controller.attestation import Attestation, EkTrust
from ztnet.errors import RpcFailure
from ztnet.identity.tpm import ek_hash_of
from ztnet.testing.controller import ControllerProcess, create_token, init_controller
from ztnet.testing.swtpm import EkAuthority, SoftwareTpm
from ztnet.testing.tpmhost import TpmHost, spki
from ztnet.v1 import node_pb2

REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}
PROOF_FIELDS = ("activated_secret", "certify_info", "certify_signature",
                "enrollment_key_public", "csr_signature")
BEGIN_FIELDS = ("ek_public", "ek_certificate", "ak_public")


@st.composite
def tampered(draw: st.DrawFn, original: bytes) -> bytes:
    """A mutation of ``original``: a flipped bit, a cut, an insertion, or random bytes."""
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "replace", "random"]))
    data = bytearray(original)
    if kind == "flip" and data:
        index = draw(st.integers(0, len(data) - 1))
        data[index] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "extend":
        data += draw(st.binary(min_size=1, max_size=64))
    elif kind == "replace" and data:
        index = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        data[index:index + len(chunk)] = chunk
    else:
        data = bytearray(draw(st.binary(max_size=2048)))
    if bytes(data) == original:
        data += b"\0"
    return bytes(data)


@pytest.fixture(scope="module")
def module_swtpm(tmp_path_factory: pytest.TempPathFactory,
                 ek_authority: EkAuthority) -> Iterator[SoftwareTpm]:
    with SoftwareTpm.manufacture(tmp_path_factory.mktemp("fuzz") / "tpm", ek_authority) as tpm:
        yield tpm


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory,
               ek_authority: EkAuthority) -> Iterator[ControllerProcess]:
    state = init_controller(tmp_path_factory.mktemp("tpm-fuzz") / "state")
    with ControllerProcess(state, extra_args=["--tpm-ek-ca", str(ek_authority.bundle)]) \
            as process:
        yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def host(module_swtpm: SoftwareTpm, controller: ControllerProcess) -> Iterator[TpmHost]:
    with TpmHost(controller, "fuzz-1", module_swtpm.tcti) as tpm_host:
        yield tpm_host


@pytest.fixture(scope="module")
def attestation(ek_authority: EkAuthority) -> Attestation:
    return Attestation(EkTrust.load([ek_authority.bundle], None), time.time)


def _challenge(attestation: Attestation, host: TpmHost) -> node_pb2.BeginAttestationResponse:
    return attestation.begin(host.host, "digest", host.begin_request("token"))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), name=st.sampled_from(PROOF_FIELDS))
def test_tampered_proofs_are_refused_in_process(attestation: Attestation, host: TpmHost,
                                                data: st.DataObject, name: str) -> None:
    proof = host.answer(_challenge(attestation, host))
    setattr(proof, name, data.draw(tampered(getattr(proof, name))))
    with pytest.raises(RpcFailure) as refused:
        attestation.verify(host.host, "digest", proof, spki(host.key))
    assert refused.value.code in REFUSALS, str(refused.value)
    assert str(refused.value)


def test_the_untampered_proof_passes_in_process(attestation: Attestation,
                                                host: TpmHost) -> None:
    proof = host.answer(_challenge(attestation, host))
    attested = attestation.verify(host.host, "digest", proof, spki(host.key))
    assert attested.ek_hash == host.ek_hash


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), name=st.sampled_from(BEGIN_FIELDS))
def test_tampered_evidence_is_refused_in_process(attestation: Attestation, host: TpmHost,
                                                 data: st.DataObject, name: str) -> None:
    request = host.begin_request("token")
    changed = data.draw(tampered(getattr(request, name)))
    setattr(request, name, changed)
    try:
        attestation.begin(host.host, "digest", request)
    except RpcFailure as refused:
        assert refused.code in REFUSALS, str(refused)
        return
    # What may still get a challenge: an AK that parses as a restricted P-256 signing key
    # (another point, say: no TPM holds it beside this EK, so activation fails later), or
    # an EK public area whose key is still the certified one (only that TPM can open the
    # credential, whatever else the area says). Never another EK key, never another
    # certificate.
    assert name in ("ak_public", "ek_public"), name
    if name == "ek_public":
        assert ek_hash_of(changed) == host.ek_hash


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), name=st.sampled_from(PROOF_FIELDS))
def test_tampered_proofs_get_a_status_over_grpc(controller: ControllerProcess, host: TpmHost,
                                                data: st.DataObject, name: str) -> None:
    token = create_token(controller.state, host.host, require_tpm=True)
    proof = host.answer(host.begin(token))
    setattr(proof, name, data.draw(tampered(getattr(proof, name))))
    with pytest.raises(grpc.RpcError) as refused:
        host.enroll(token, proof)
    assert refused.value.code() in REFUSALS, refused.value.details()


def test_the_controller_still_enrolls_after_the_fuzzing(controller: ControllerProcess,
                                                        host: TpmHost) -> None:
    token = create_token(controller.state, host.host, require_tpm=True)
    assert host.enroll(token, host.answer(host.begin(token))).attestation == "tpm"
    assert "Traceback" not in controller.log()


def test_one_token_holds_at_most_four_pending_challenges(attestation: Attestation,
                                                         host: TpmHost) -> None:
    challenges = [_challenge(attestation, host) for _ in range(6)]
    # the two oldest made room: refused as used up; the newest still answers
    with pytest.raises(RpcFailure, match="unknown, expired or already used challenge"):
        attestation.verify(host.host, "digest", host.answer(challenges[1]), spki(host.key))
    attestation.verify(host.host, "digest", host.answer(challenges[5]), spki(host.key))
    other = attestation.begin(host.host, "other token", host.begin_request("token"))
    attestation.verify(host.host, "other token", host.answer(other), spki(host.key))
