"""The TPM layer's pure parts: TCTI strings, what the enrollment key signs, the key
reference on disk, and importing the bindings (no TPM needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ztnet.errors import TpmError
from ztnet.identity import tpmproof
from ztnet.identity.tpm import KeyRef, load_key_ref, store_key_ref, tcti_for
from ztnet.testing.swtpm import available


def test_tcti_strings() -> None:
    assert tcti_for() == "device:/dev/tpmrm0"
    assert tcti_for(device="/dev/tpm0") == "device:/dev/tpm0"
    assert tcti_for(swtpm="127.0.0.1:2321") == "swtpm:host=127.0.0.1,port=2321"
    for bad in ("2321", "host:", "h:99999", "a,b=c:1"):
        with pytest.raises(TpmError, match="--tpm-swtpm"):
            tcti_for(swtpm=bad)
    with pytest.raises(TpmError, match="exclude each other"):
        tcti_for(device="/dev/tpm0", swtpm="127.0.0.1:1")
    with pytest.raises(TpmError, match="--tpm-device"):
        tcti_for(device="/dev/x,y")


def test_bindings_are_framed_and_separated_by_purpose() -> None:
    spki = b"key"
    enroll = tpmproof.csr_binding("web-1", b"s" * 32, spki)
    renew = tpmproof.renewal_binding("web-1", b"s" * 32, spki)
    assert enroll != renew and len(enroll) == len(renew) == 32
    # length prefixes: moving a byte between fields changes the digest
    assert tpmproof.csr_binding("web-1x", b"s" * 31, spki) != \
        tpmproof.csr_binding("web-1", b"xs" + b"s" * 30, spki)


def test_the_key_reference_round_trips_and_refuses_corruption(tmp_path: Path) -> None:
    assert load_key_ref(tmp_path) is None  # a software host
    ref = KeyRef("swtpm:host=127.0.0.1,port=1", tpmproof.DEFAULT_HANDLE, b"\x00\x23pub",
                 "sha256:" + "0" * 64)
    store_key_ref(tmp_path, ref)
    assert load_key_ref(tmp_path) == ref
    (tmp_path / "tpm.json").write_text('{"tcti": "x"}')
    with pytest.raises(TpmError, match="is corrupt"):
        load_key_ref(tmp_path)


@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_the_bindings_work_after_unittest_mock_was_imported() -> None:
    # tpm2-pytss 1.2 builds empty shells when it sees unittest.mock at import
    program = ("import unittest.mock\n"
               "from ztnet.identity.tpm import bindings\n"
               "t = bindings()\n"
               "area = t.TPM2B_PUBLIC.parse('ecc256:ecdsa-sha256', "
               "objectAttributes=t.TPMA_OBJECT.SIGN_ENCRYPT).publicArea\n"
               "print(int(area.type))\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(0x0023)


def test_the_enroll_flags() -> None:
    from ztnet.daemon.enroll import TpmOptions
    from ztnet.errors import ConfigError

    assert TpmOptions.from_flags(False, None, None) is None
    assert TpmOptions.from_flags(True, None, None) == TpmOptions("device:/dev/tpmrm0")
    assert TpmOptions.from_flags(True, None, "127.0.0.1:2321") == \
        TpmOptions("swtpm:host=127.0.0.1,port=2321")
    with pytest.raises(ConfigError, match="need --tpm"):
        TpmOptions.from_flags(False, "/dev/tpm0", None)


def test_opening_a_missing_device_names_it() -> None:
    if available() is not None:
        pytest.skip(str(available()))
    from ztnet.identity.tpm import Tpm

    with pytest.raises(TpmError, match="tpm: opening device:/nonexistent/tpm failed"):
        Tpm("device:/nonexistent/tpm")
