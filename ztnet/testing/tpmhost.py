"""A TPM-bound host driven step by step, for the attestation tests and benchmarks: the same
exchange as ``ztnet enroll --tpm`` (``ztnet.daemon.enroll.attest``), with each part
open to substitution (another TPM's AK, a duplicable key, an old attestation, another
CSR), so each refusal of the controller can be provoked.

    with TpmHost(controller, "web-1", tpm.tcti) as host:
        challenge = host.begin(token)
        proof = host.answer(challenge)
        reply = host.enroll(token, proof)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztnet.identity import tpmproof
from ztnet.identity.tpm import KeyRef, Tpm, ek_hash_of
from ztnet.testing.controller import ControllerProcess
from ztnet.testing.nodes import make_csr
from ztnet.v1 import node_pb2, node_pb2_grpc


def spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class TpmHost:
    controller: ControllerProcess
    host: str
    tcti: str
    handle: int = tpmproof.DEFAULT_HANDLE
    key_attributes: int = tpmproof.ENROLLMENT_KEY_ATTRIBUTES
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    tpm: Tpm = field(init=False)
    ak: Any = field(init=False)
    ak_public: bytes = field(init=False)
    ek_public: bytes = field(init=False)
    ek_certificate: bytes = field(init=False)
    key_public: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.tpm = Tpm(self.tcti)
        try:
            self.ek_public, self.ek_certificate = self.tpm.endorsement()
            self.key_public = self.tpm.enrollment_key(self.handle,
                                                      attributes=self.key_attributes)
            self.ak, self.ak_public = self.tpm.create_ak()
        except BaseException:
            self.tpm.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.tpm.close()

    @property
    def ek_hash(self) -> str:
        return ek_hash_of(self.ek_public)

    @property
    def key_ref(self) -> KeyRef:
        return KeyRef(self.tcti, self.handle, self.key_public, self.ek_hash)

    def csr(self) -> bytes:
        return make_csr(self.key, self.host)

    def begin_request(self, token: str, **override: Any) -> node_pb2.BeginAttestationRequest:
        fields: dict[str, Any] = dict(
            token=token, host=self.host, version=tpmproof.PROTOCOL_VERSION,
            ek_public=self.ek_public, ek_certificate=self.ek_certificate,
            ak_public=self.ak_public)
        fields.update(override)
        return node_pb2.BeginAttestationRequest(**fields)

    def begin(self, token: str, **override: Any) -> node_pb2.BeginAttestationResponse:
        with self.controller.channel(enroll=True) as channel:
            reply: node_pb2.BeginAttestationResponse = node_pb2_grpc.NodeServiceStub(
                channel).BeginAttestation(self.begin_request(token, **override), timeout=10)
        return reply

    def answer(self, challenge: node_pb2.BeginAttestationResponse, *,
               secret: bytes | None = None, csr_key: ec.EllipticCurvePrivateKey | None = None,
               ) -> node_pb2.TpmAttestation:
        """The proof: ``secret`` None activates the credential in this TPM (raises TpmError
        when it cannot); ``csr_key`` is the key whose CSR the enrollment key binds."""
        if secret is None:
            secret = self.tpm.activate(self.ak, challenge.credential_blob,
                                       challenge.encrypted_secret)
        certify_info, certify_signature = self.tpm.certify(self.ak, self.handle, secret)
        binding = tpmproof.csr_binding(self.host, secret, spki(csr_key or self.key))
        return node_pb2.TpmAttestation(
            challenge_id=challenge.challenge_id, activated_secret=secret,
            certify_info=certify_info, certify_signature=certify_signature,
            enrollment_key_public=self.key_public,
            csr_signature=self.tpm.sign(self.key_ref, binding))

    def enroll(self, token: str, proof: node_pb2.TpmAttestation | None,
               csr_pem: bytes | None = None) -> node_pb2.EnrollResponse:
        request = node_pb2.EnrollRequest(token=token, host=self.host,
                                         csr_pem=csr_pem or self.csr())
        if proof is not None:
            request.tpm.CopyFrom(proof)
        with self.controller.channel(enroll=True) as channel:
            reply: node_pb2.EnrollResponse = node_pb2_grpc.NodeServiceStub(channel).Enroll(
                request, timeout=10)
        return reply
