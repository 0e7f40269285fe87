"""The host's TPM (2.0): its endorsement key, the enrollment key that never leaves it,
and the attestation that proves so to the controller.

    EK              the TPM's endorsement key (RSA 2048, TCG default template): the one
                    provisioned at 0x81010001, or created from the template (the same key
                    each time), with the manufacturer's EK certificate from NV index
                    0x01c00002 if there is one
    SRK             the storage root (ECC P-256, TCG template), also created when needed
    enrollment key  ECDSA P-256 under the SRK: fixedTPM | fixedParent | sensitiveDataOrigin
                    | sign, made persistent at a handle (default 0x81017a01); it signs
                    each CSR and each renewal (``tpmproof``)
    AK              a restricted ECDSA P-256 signing key under the SRK, made for one
                    enrollment: credential activation through the EK binds it to this TPM,
                    then it certifies the enrollment key (TPM2_Certify), and is flushed

Only the handle and public parts ever reach the disk (``KeyRef``). The TPM is reached by
a TCTI string: ``device:/dev/tpmrm0`` (the kernel's resource manager) or
``swtpm:host=127.0.0.1,port=2321`` (a software TPM, tests); ``tcti_for`` builds them.

tpm2-pytss comes from the distribution (python3-tpm2-pytss), like bcc: it is imported when
a TPM is opened, so hosts and controllers without TPM enrollment never need it.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztnet.errors import TpmError
from ztnet.fsutil import FileTooLarge, read_bounded, replace_atomic
from ztnet.identity import tpmproof

KEY_REF_FILE = "tpm.json"
# TCG EK Credential Profile: the RSA 2048 EK, its certificate at NV index 0x01c00002
EK_TYPE = "EK-RSA2048"
# TCG Provisioning Guidance: where a provisioned TPM keeps that EK (creating it from the
# template is an RSA key generation, seconds on some hardware TPMs)
EK_PERSISTENT_HANDLE = 0x81010001
_RC_HANDLE_UNKNOWN = 0x18B  # TPM_RC_HANDLE for handle 1: nothing at that persistent handle


def tcti_for(device: str | None = None, swtpm: str | None = None) -> str:
    """The TCTI for ``--tpm-device PATH`` or ``--tpm-swtpm HOST:PORT`` (default: the
    kernel's resource manager, /dev/tpmrm0)."""
    if device is not None and swtpm is not None:
        raise TpmError("tpm: --tpm-device and --tpm-swtpm exclude each other")
    if swtpm is not None:
        host, sep, port = swtpm.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise TpmError(f"tpm: --tpm-swtpm {swtpm!r} is not HOST:PORT (the swtpm "
                           "--server port, e.g. 127.0.0.1:2321)")
        if "," in host or "=" in host:
            raise TpmError(f"tpm: --tpm-swtpm host {host!r} has ',' or '='")
        return f"swtpm:host={host.strip('[]')},port={int(port)}"
    path = device or "/dev/tpmrm0"
    if "," in path or ":" in path:
        raise TpmError(f"tpm: --tpm-device {path!r} has ',' or ':'")
    return f"device:{path}"


@dataclass(frozen=True, slots=True)
class KeyRef:
    """What the state directory keeps of the enrollment key: where it is, and its public
    area (TPMT_PUBLIC), so a different key at that handle is noticed before it signs."""

    tcti: str
    handle: int
    public: bytes
    ek_hash: str

    def to_json(self) -> bytes:
        return (json.dumps({"tcti": self.tcti, "handle": f"0x{self.handle:08x}",
                            "public": base64.b64encode(self.public).decode(),
                            "ek_hash": self.ek_hash}, indent=2) + "\n").encode()


def store_key_ref(state: Path, ref: KeyRef) -> None:
    try:
        replace_atomic(state / KEY_REF_FILE, ref.to_json(), 0o644)
    except OSError as exc:
        raise TpmError(f"tpm: cannot write {state / KEY_REF_FILE}: {exc.strerror}") from None


def load_key_ref(state: Path) -> KeyRef | None:
    """None: this host is not TPM-bound (software enrollment)."""
    path = state / KEY_REF_FILE
    try:
        raw = json.loads(read_bounded(path, 64 * 1024))
        return KeyRef(tcti=str(raw["tcti"]), handle=int(str(raw["handle"]), 16),
                      public=base64.b64decode(str(raw["public"]), validate=True),
                      ek_hash=str(raw["ek_hash"]))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TpmError(f"tpm: cannot read {path}: {exc.strerror}") from None
    except (FileTooLarge, ValueError, KeyError, TypeError) as exc:
        raise TpmError(f"tpm: {path} is corrupt: {exc}") from None


def bindings() -> Any:
    """The tpm2_pytss package (also for ``ztnet.controller.attestation``)."""
    # The TSS logs every TPM error code to stderr; ours come back as exceptions with the
    # same code, so its own log stays quiet unless the operator asks (TSS2_LOG=all+debug).
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    # tpm2-pytss 1.2 builds every structure as an empty shell (its EK templates too, at
    # import) when unittest.mock was imported before it: a hack for its documentation
    # build. Hide the module while it is imported.
    mock = sys.modules.pop("unittest.mock", None)
    try:
        import tpm2_pytss
        import tpm2_pytss.utils  # noqa: F401  (a submodule: not imported by the package)
    except ImportError:
        raise TpmError("tpm: the TPM bindings are not installed (Debian/Ubuntu: "
                       "apt-get install python3-tpm2-pytss; scripts/setup.sh does)") from None
    finally:
        if mock is not None:
            sys.modules["unittest.mock"] = mock
    return tpm2_pytss


@contextmanager
def _tpm_call(what: str) -> Iterator[None]:
    tss = bindings()
    try:
        yield
    except tss.TSS2_Exception as exc:
        raise TpmError(f"tpm: {what} failed: {exc}") from None


class Tpm:
    """One open TPM. A context manager: closing flushes every transient object made here.
    A TPM has few transient slots (swtpm: three), so each key is loaded only while it is
    needed: the SRK only to create and load a child, the EK from ``endorsement`` to
    ``activate`` (creating it is an RSA key generation: the slowest step, done once)."""

    def __init__(self, tcti: str) -> None:
        self.tss = bindings()
        self.tcti = tcti
        with _tpm_call(f"opening {tcti}"):
            self.esys = self.tss.ESAPI(tcti)
        self._transient: list[Any] = []
        self._ek: Any = None

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in reversed(self._transient):
            self.flush(handle)
        self.esys.close()

    def flush(self, handle: Any) -> None:
        if handle in self._transient:
            self._transient.remove(handle)
        try:
            self.esys.flush_context(handle)
        except self.tss.TSS2_Exception:
            pass  # already gone (TPM reset): nothing to free

    # --- the fixed keys: EK and SRK --------------------------------------------------

    def _ek_template(self) -> tuple[bytes, Any]:
        t = self.tss
        with _tpm_call("reading the EK certificate and template"):
            cert, template = t.utils.create_ek_template(EK_TYPE, t.utils.NVReadEK(self.esys))
        return bytes(cert or b""), template

    def _primary(self, template: Any, hierarchy: Any, what: str) -> tuple[Any, bytes]:
        with _tpm_call(f"creating the {what}"):
            handle, public, _, _, _ = self.esys.create_primary(
                self.tss.TPM2B_SENSITIVE_CREATE(), template, hierarchy)
        self._transient.append(handle)
        return handle, bytes(public.publicArea.marshal())

    def endorsement(self) -> tuple[bytes, bytes]:
        """(EK TPMT_PUBLIC, EK certificate DER or b""); the EK stays loaded for
        ``activate``."""
        if self._ek is not None:
            self.flush(self._ek)
        self._ek, public, cert = self._load_ek()
        return public, cert

    def _load_ek(self) -> tuple[Any, bytes, bytes]:
        """(handle, TPMT_PUBLIC, certificate): the persistent EK if the TPM has one made
        from the EK template, else the EK created from the template. (A persistent
        object that is not the certified EK is refused by the controller anyway: its key
        is not the certificate's.)"""
        cert, template = self._ek_template()
        tr = self._persistent(EK_PERSISTENT_HANDLE)
        if tr is not None:
            with _tpm_call(f"reading the EK at 0x{EK_PERSISTENT_HANDLE:08x}"):
                public, _, _ = self.esys.read_public(tr)
            if _same_template(self.tss, public.publicArea, template.publicArea):
                return tr, bytes(public.publicArea.marshal()), cert
        handle, area = self._primary(template, self.tss.ESYS_TR.ENDORSEMENT, "EK")
        return handle, area, cert

    def _storage_root(self) -> Any:
        t = self.tss
        template = t.TPM2B_PUBLIC.parse(
            "ecc256:aes128cfb", nameAlg=t.TPM2_ALG.SHA256,
            objectAttributes=t.TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS)
        return self._primary(template, t.ESYS_TR.OWNER, "storage root key")[0]

    # --- the enrollment key and the AK -----------------------------------------------

    def _create_signing_key(self, attributes: int, what: str) -> tuple[Any, bytes]:
        t = self.tss
        template = t.TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", nameAlg=t.TPM2_ALG.SHA256,
                                        objectAttributes=attributes)
        # a signing key has no symmetric algorithm (the parser adds one for restricted keys)
        template.publicArea.parameters.eccDetail.symmetric.algorithm = t.TPM2_ALG.NULL
        srk = self._storage_root()
        try:
            with _tpm_call(f"creating the {what}"):
                private, public, _, _, _ = self.esys.create(srk, t.TPM2B_SENSITIVE_CREATE(),
                                                            template)
                handle = self.esys.load(srk, private, public)
        finally:
            self.flush(srk)
        self._transient.append(handle)
        return handle, bytes(public.publicArea.marshal())

    def enrollment_key(self, handle: int = tpmproof.DEFAULT_HANDLE, *,
                       attributes: int = tpmproof.ENROLLMENT_KEY_ATTRIBUTES) -> bytes:
        """The enrollment key's TPMT_PUBLIC: the one at ``handle`` if there is one, else a
        new key made persistent there. ``attributes`` exist for the tests (a key made
        duplicable must be refused by the controller)."""
        existing = self._persistent_public(handle)
        if existing is not None:
            found = int(self.tss.TPMT_PUBLIC.unmarshal(existing)[0].objectAttributes)
            if found != attributes:
                raise TpmError(f"tpm: the key at 0x{handle:08x} is not an enrollment key "
                               f"(attributes {tpmproof.describe_attributes(found)}); evict it "
                               "(tpm2_evictcontrol) or choose another handle")
            return existing
        transient, public = self._create_signing_key(attributes, "enrollment key")
        try:
            with _tpm_call(f"making the enrollment key persistent at 0x{handle:08x}"):
                self.esys.evict_control(self.tss.ESYS_TR.OWNER, transient, handle)
        finally:
            self.flush(transient)
        return public

    def _persistent(self, handle: int) -> Any:
        try:
            return self.esys.tr_from_tpmpublic(handle)
        except self.tss.TSS2_Exception as exc:
            if exc.rc & 0xFFF == _RC_HANDLE_UNKNOWN:
                return None
            raise TpmError(f"tpm: reading persistent handle 0x{handle:08x} failed: "
                           f"{exc}") from None

    def _persistent_public(self, handle: int) -> bytes | None:
        tr = self._persistent(handle)
        if tr is None:
            return None
        with _tpm_call(f"reading the key at 0x{handle:08x}"):
            public, _, _ = self.esys.read_public(tr)
        return bytes(public.publicArea.marshal())

    def _key_at(self, ref: KeyRef) -> Any:
        """The enrollment key at ``ref.handle``, only if it is the key ``ref`` names."""
        tr = self._persistent(ref.handle)
        if tr is None:
            raise TpmError(f"tpm: no key at 0x{ref.handle:08x} in {self.tcti} (TPM cleared, "
                           "or not the TPM this host enrolled with)")
        with _tpm_call(f"reading the key at 0x{ref.handle:08x}"):
            public, _, _ = self.esys.read_public(tr)
        if bytes(public.publicArea.marshal()) != ref.public:
            raise TpmError(f"tpm: the key at 0x{ref.handle:08x} in {self.tcti} is not the "
                           "enrollment key this host enrolled with")
        return tr

    def create_ak(self) -> tuple[Any, bytes]:
        """A fresh AK, loaded until ``flush`` or ``close``: (handle, TPMT_PUBLIC)."""
        return self._create_signing_key(tpmproof.AK_ATTRIBUTES, "attestation key")

    # --- the attestation exchange ----------------------------------------------------

    def activate(self, ak: Any, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential: the secret the controller encrypted to our EK for
        our AK's name; the TPM only releases it if both are loaded in it."""
        ek = self._ek if self._ek is not None else self._load_ek()[0]
        try:
            return self._activate(ek, ak, credential_blob, encrypted_secret)
        finally:
            if ek in self._transient:  # never a persistent EK
                self.flush(ek)
            self._ek = None

    def _activate(self, ek: Any, ak: Any, credential_blob: bytes,
                  encrypted_secret: bytes) -> bytes:
        t = self.tss
        with _tpm_call("credential activation"):
            session = self.esys.start_auth_session(
                t.ESYS_TR.NONE, t.ESYS_TR.NONE, t.TPM2_SE.POLICY,
                t.TPMT_SYM_DEF(algorithm=t.TPM2_ALG.NULL), t.TPM2_ALG.SHA256)
            try:
                # the EK's default policy: PolicySecret(TPM_RH_ENDORSEMENT)
                self.esys.policy_secret(t.ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
                secret = self.esys.activate_credential(
                    ak, ek, t.TPM2B_ID_OBJECT(credential=credential_blob),
                    t.TPM2B_ENCRYPTED_SECRET(secret=encrypted_secret),
                    session1=t.ESYS_TR.PASSWORD, session2=session)
            finally:
                self.esys.flush_context(session)
        return bytes(secret)

    def certify(self, ak: Any, handle: int, qualifying: bytes) -> tuple[bytes, bytes]:
        """TPM2_Certify by ``ak`` of the persistent key at ``handle``:
        (TPMS_ATTEST, TPMT_SIGNATURE)."""
        t = self.tss
        key = self._persistent(handle)
        if key is None:
            raise TpmError(f"tpm: no key at 0x{handle:08x} to certify")
        with _tpm_call("certifying the enrollment key"):
            attest, signature = self.esys.certify(
                key, ak, qualifying, t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.NULL))
        return bytes(attest), bytes(signature.marshal())

    def sign(self, ref: KeyRef, digest: bytes) -> bytes:
        """A TPMT_SIGNATURE by the enrollment key over a 32-byte ``digest``."""
        t = self.tss
        key = self._key_at(ref)
        with _tpm_call("signing with the enrollment key"):
            signature = self.esys.sign(
                key, t.TPM2B_DIGEST(digest), t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.NULL),
                t.TPMT_TK_HASHCHECK(tag=t.TPM2_ST.HASHCHECK, hierarchy=t.TPM2_RH.NULL))
        return bytes(signature.marshal())


def _same_template(tss: Any, area: Any, template: Any) -> bool:
    """``area`` is what ``template`` makes: equal in everything but the key (``unique``)."""
    if int(area.type) != int(template.type):
        return False
    copy, _ = tss.TPMT_PUBLIC.unmarshal(bytes(area.marshal()))
    if int(copy.type) == int(tss.TPM2_ALG.RSA):
        copy.unique.rsa = bytes(template.unique.rsa)
    else:
        copy.unique.ecc.x, copy.unique.ecc.y = (bytes(template.unique.ecc.x),
                                                bytes(template.unique.ecc.y))
    return bool(copy.marshal() == template.marshal())


def ek_hash_of(ek_public: bytes) -> str:
    """``tpmproof.ek_hash`` of an EK TPMT_PUBLIC (as ``ztnet hosts`` shows it)."""
    from cryptography.hazmat.primitives import serialization

    tss = bindings()
    try:
        area, _ = tss.TPMT_PUBLIC.unmarshal(ek_public)
        key = serialization.load_pem_public_key(bytes(area.to_pem()))
    except (tss.TSS2_Exception, ValueError, TypeError) as exc:
        raise TpmError(f"tpm: the EK public area is unusable: {exc}") from None
    return tpmproof.ek_hash(key.public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo))


def sign_renewal(ref: KeyRef, spiffe_id: str, nonce: bytes, spki_der: bytes) -> bytes:
    """The enrollment key's signature a TPM-bound host's renewal carries."""
    with Tpm(ref.tcti) as tpm:
        return tpm.sign(ref, tpmproof.renewal_binding(spiffe_id, nonce, spki_der))

