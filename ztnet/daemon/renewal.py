"""One certificate renewal: RenewCertificate over the host's mutual-TLS channel.

A TPM-bound host (its state directory has tpm.json, ``ztnet.identity.tpm.KeyRef``) first
asks BeginRenewal for a one-use nonce and has its TPM sign (SPIFFE id, nonce, the public
key of the CSR) with the enrollment key; the controller checks that signature against the
key it recorded at enrollment. A copy of the state directory without the TPM gets no new
certificate, and the one it holds expires on schedule.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization

from ztnet.daemon.credentials import HostCredentials
from ztnet.errors import ControllerError
from ztnet.identity import tpm
from ztnet.v1 import node_pb2


def renew(stub: Any, credentials: HostCredentials, timeout: float) -> bytes:
    """The renewed certificate (PEM), not yet checked or stored (``store_certificate``)."""
    csr = credentials.csr()
    request = node_pb2.RenewCertificateRequest(csr_pem=csr)
    ref = tpm.load_key_ref(credentials.state)
    if ref is not None:
        nonce = stub.BeginRenewal(node_pb2.BeginRenewalRequest(), timeout=timeout).nonce
        if not nonce:
            raise ControllerError("daemon: this host is TPM-bound but the controller has it "
                                  "as a software host (no renewal nonce); refusing to renew "
                                  "without the TPM")
        spki = credentials.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        request.nonce = nonce
        request.tpm_signature = tpm.sign_renewal(ref, credentials.identity.spiffe_id, nonce,
                                                 spki)
    response = stub.RenewCertificate(request, timeout=timeout)
    return bytes(response.certificate_pem)
