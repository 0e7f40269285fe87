"""`ztnet enroll`: turn a one-time token into this host's credentials.

    1. pin:    read the controller's TLS chain, find the CA with the operator's fingerprint
               and check it signed the controller's certificate (``pinning``); nothing sent
    2. key:    generate the host key here (ECDSA P-256); only a CSR leaves the host
    3. enroll: Enroll(token, host, CSR) over TLS verified against that CA
    4. check:  the returned CA is the pinned one, the certificate is for our key and names
               spiffe://<trust-domain>/host/<name>, the grant-signing key is Ed25519
    5. store:  state directory (0700), identity.json last (see ``credentials``)

With ``--tpm`` (``TpmOptions``), step 3 is two calls: BeginAttestation shows the TPM's
EK and a fresh AK and gets a credential challenge; the TPM activates it, certifies its
enrollment key with the AK and signs the CSR's key with the enrollment key, and Enroll
carries all of it (``ztnet.identity.tpm``). tpm.json (handle and public parts only) is
stored with the credentials; renewals then need the TPM (``renewal``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ztnet import pki
from ztnet.daemon.channel import controller_channel, describe
from ztnet.daemon.credentials import (
    Identity,
    build_csr,
    check_host_certificate,
    is_enrolled,
    load_certificate,
    store_enrollment,
)
from ztnet.daemon.pinning import pin_controller_ca
from ztnet.errors import ConfigError, ControllerError
from ztnet.grants.payload import normalize_host
from ztnet.identity import tpm as tpm_device
from ztnet.identity import tpmproof
from ztnet.v1 import node_pb2, node_pb2_grpc

_REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS}


@dataclass(frozen=True, slots=True)
class TpmOptions:
    """``ztnet enroll --tpm [--tpm-device PATH | --tpm-swtpm HOST:PORT]``."""

    tcti: str
    handle: int = tpmproof.DEFAULT_HANDLE

    @classmethod
    def from_flags(cls, tpm: bool, device: str | None, swtpm: str | None) -> TpmOptions | None:
        if not tpm:
            if device is not None or swtpm is not None:
                raise ConfigError("enroll: --tpm-device and --tpm-swtpm need --tpm")
            return None
        return cls(tpm_device.tcti_for(device, swtpm))


def enroll(controller: str, token: str, ca_fingerprint: str, state: Path,
           host: str | None = None, timeout: float = 15.0,
           tpm: TpmOptions | None = None) -> Identity:
    try:
        expected = pki.normalize_fingerprint(ca_fingerprint)
    except ValueError as exc:
        raise ConfigError(f"enroll: --ca-fingerprint {exc}") from None
    try:
        name = normalize_host(host or socket.gethostname())
    except ValueError as exc:
        raise ConfigError(f"enroll: bad --host: {exc}") from None
    if not token:
        raise ConfigError("enroll: --token is empty")
    _prepare(state)

    pinned = pin_controller_ca(controller, expected, timeout=timeout)
    key = pki.new_tls_key()
    request = node_pb2.EnrollRequest(token=token, host=name, csr_pem=build_csr(key, name))
    channel = controller_channel(controller, pinned.ca_pem, pinned.server_name)
    key_ref = None
    try:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        if tpm is not None:
            spki = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            key_ref = attest(stub, tpm, request, spki, timeout)
        response = stub.Enroll(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise _enroll_error(controller, exc) from None
    finally:
        channel.close()
    expected_attestation = "software" if tpm is None else "tpm"
    if (response.attestation or "software") != expected_attestation:
        raise ControllerError(f"enroll: the controller recorded this host as "
                              f"{response.attestation or 'software'!r}, expected "
                              f"{expected_attestation!r}")

    ca = load_certificate(response.ca_pem, "the CA returned by Enroll")
    if pki.fingerprint(ca) != expected:
        raise ControllerError("enroll: Enroll returned a CA other than the pinned one")
    spiffe_id = pki.spiffe_id(response.trust_domain, "host", name).uri
    if response.spiffe_id != spiffe_id:
        raise ControllerError(f"enroll: the controller named this host {response.spiffe_id!r}, "
                              f"expected {spiffe_id!r}")
    cert = load_certificate(response.certificate_pem, "the host certificate")
    check_host_certificate(cert, pinned.ca, key, spiffe_id)
    _check_signing_key(response.signing_public_key_pem)
    identity = Identity(host=name, trust_domain=response.trust_domain, spiffe_id=spiffe_id,
                        enrolled_via=controller, server_name=pinned.server_name)
    if key_ref is not None:
        tpm_device.store_key_ref(state, key_ref)
    store_enrollment(state, identity, key, response.certificate_pem, pinned.ca_pem,
                     response.signing_public_key_pem)
    return identity


def attest(stub: Any, options: TpmOptions, request: node_pb2.EnrollRequest, csr_spki: bytes,
           timeout: float) -> tpm_device.KeyRef:
    """Run the TPM side of the exchange: BeginAttestation, then fill ``request.tpm``."""
    with tpm_device.Tpm(options.tcti) as tpm:
        ek_public, ek_certificate = tpm.endorsement()
        key_public = tpm.enrollment_key(options.handle)
        ak, ak_public = tpm.create_ak()
        challenge = stub.BeginAttestation(node_pb2.BeginAttestationRequest(
            token=request.token, host=request.host, version=tpmproof.PROTOCOL_VERSION,
            ek_public=ek_public, ek_certificate=ek_certificate, ak_public=ak_public),
            timeout=timeout)
        if challenge.version != tpmproof.PROTOCOL_VERSION:
            raise ControllerError(f"enroll: the controller speaks TPM attestation version "
                                  f"{challenge.version}, this host "
                                  f"{tpmproof.PROTOCOL_VERSION}")
        secret = tpm.activate(ak, challenge.credential_blob, challenge.encrypted_secret)
        certify_info, certify_signature = tpm.certify(ak, options.handle, secret)
        tpm.flush(ak)
        ref = tpm_device.KeyRef(options.tcti, options.handle, key_public,
                                tpm_device.ek_hash_of(ek_public))
        csr_signature = tpm.sign(ref, tpmproof.csr_binding(request.host, secret, csr_spki))
    request.tpm.CopyFrom(node_pb2.TpmAttestation(
        challenge_id=challenge.challenge_id, activated_secret=secret,
        certify_info=certify_info, certify_signature=certify_signature,
        enrollment_key_public=key_public, csr_signature=csr_signature))
    return ref


def _prepare(state: Path) -> None:
    try:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        state.chmod(0o700)
    except OSError as exc:
        raise ConfigError(f"enroll: cannot use state directory {state}: {exc.strerror}") from None
    if is_enrolled(state):
        raise ConfigError(f"enroll: {state} already holds an enrollment (identity.json); "
                          "use another directory or remove it to enroll again")


def _enroll_error(controller: str, exc: grpc.RpcError) -> ControllerError:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    if code in _REFUSED:
        details = exc.details() if isinstance(exc, grpc.Call) else ""
        if (details or "").startswith("attestation:") or "TPM attestation" in (details or ""):
            return ControllerError(f"enroll: the controller refused this host's TPM "
                                   f"attestation ({describe(exc)})")
        return ControllerError(f"enroll: the controller refused the token ({describe(exc)})")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ControllerError(f"enroll: cannot reach the controller at {controller} "
                               f"({describe(exc)})")
    return ControllerError(f"enroll: Enroll failed ({describe(exc)})")


def _check_signing_key(pem: bytes) -> None:
    """The daemon will trust this key for every grant: it must be an Ed25519 public key."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ControllerError(f"enroll: the grant-signing key is not a PEM public key: "
                              f"{exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ControllerError("enroll: the grant-signing key is not an Ed25519 public key")
