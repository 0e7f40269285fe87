"""`ztnet enroll` against a scripted controller on loopback (no root needed): trust comes
from the CA fingerprint alone, and the token never reaches a server that is not proven to
hold a certificate from that CA."""

from __future__ import annotations

import json
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.fake_controller import TRUST_DOMAIN, FakeController
from ztnet.cli import main
from ztnet.daemon.credentials import HostCredentials
from ztnet.daemon.enroll import enroll
from ztnet.errors import ConfigError, ControllerError


@pytest.fixture
def controller() -> Iterator[FakeController]:
    with FakeController() as fake:
        yield fake


def test_enrollment_stores_checked_credentials_with_tight_modes(
        controller: FakeController, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    code = main(["enroll", "--controller", controller.enroll_address, "--token",
                 controller.token("web-1"), "--ca-fingerprint", controller.ca.fingerprint,
                 "--state", str(state), "--host", "web-1"])
    assert code == 0, capsys.readouterr().err
    assert f"spiffe://{TRUST_DOMAIN}/host/web-1" in capsys.readouterr().out
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "host.key").stat().st_mode) == 0o600
    identity = json.loads((state / "identity.json").read_text())
    assert identity == {"host": "web-1", "trust_domain": TRUST_DOMAIN,
                        "spiffe_id": f"spiffe://{TRUST_DOMAIN}/host/web-1",
                        "enrolled_via": controller.enroll_address, "server_name": ""}
    creds = HostCredentials(state)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert creds.cert.public_key().public_bytes(*spki) == \
        creds.key.public_key().public_bytes(*spki)
    assert (state / "signing.pub").read_bytes() == controller.service.signing_pub_pem
    assert (state / "ca.pem").read_bytes() == controller.ca.pem


def test_a_wrong_fingerprint_stops_before_the_token_is_sent(
        controller: FakeController, tmp_path: Path) -> None:
    token = controller.token("web-1")
    with pytest.raises(ControllerError, match="did not present the CA.*not sending the token"):
        enroll(controller.enroll_address, token, "ab" * 32, tmp_path / "s", host="web-1")
    assert token in controller.service.tokens  # never presented, still unused
    assert not (tmp_path / "s" / "identity.json").exists()


def test_an_impostor_presenting_the_real_ca_is_refused(
        controller: FakeController, tmp_path: Path) -> None:
    """The CA certificate is public: anyone can put it in their chain. What they cannot do is
    present a leaf that CA signed."""
    with FakeController(also_present=controller.ca.pem) as impostor:
        token = impostor.token("web-1")
        with pytest.raises(ControllerError, match="not issued by the pinned CA"):
            enroll(impostor.enroll_address, token, controller.ca.fingerprint, tmp_path / "s",
                   host="web-1")
        assert token in impostor.service.tokens


def test_a_token_works_once(controller: FakeController, tmp_path: Path) -> None:
    token = controller.token("web-1")
    enroll(controller.enroll_address, token, controller.ca.fingerprint, tmp_path / "a",
           host="web-1")
    with pytest.raises(ControllerError, match="refused the token.*UNAUTHENTICATED"):
        enroll(controller.enroll_address, token, controller.ca.fingerprint, tmp_path / "b",
               host="web-1")


def test_an_unreachable_controller_is_named(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(ControllerError, match=f"cannot reach the controller at "
                                                  f"127.0.0.1:{port}"):
            enroll(f"127.0.0.1:{port}", "t", "ab" * 32, tmp_path / "s", host="web-1")


def test_an_enrolled_directory_is_not_overwritten(controller: FakeController,
                                                   tmp_path: Path) -> None:
    enroll(controller.enroll_address, controller.token("web-1"), controller.ca.fingerprint,
           tmp_path, host="web-1")
    with pytest.raises(ConfigError, match="already holds an enrollment"):
        enroll(controller.enroll_address, controller.token("web-1"), controller.ca.fingerprint,
               tmp_path, host="web-1")


def test_bad_fingerprints_are_refused_before_any_connection(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="64 hex digits"):
        enroll("127.0.0.1:1", "t", "not-a-sha", tmp_path, host="web-1")


def test_renewal_is_due_half_way_from_receipt_whatever_the_backdating(tmp_path: Path) -> None:
    """The controller backdates certificates 5 minutes for clock skew; a 4 s certificate
    is then "past half its lifetime" by not_before, but must not be renewed in a loop."""
    with FakeController(host_cert_lifetime=4.0, backdate=300.0) as fake:
        enroll(fake.enroll_address, fake.token("web-1"), fake.ca.fingerprint, tmp_path,
               host="web-1")
        now = time.time()
        assert now + 1.0 < HostCredentials(tmp_path).renew_at() <= now + 2.1


def test_the_daemon_in_controller_mode_needs_an_enrollment(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["daemon", "--controller", "127.0.0.1:7443", "--state", str(tmp_path)])
    assert code == 2 and "holds no enrollment" in capsys.readouterr().err


def test_the_controller_is_the_only_source_of_grants(
        controller: FakeController, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enroll(controller.enroll_address, controller.token("web-1"), controller.ca.fingerprint,
           tmp_path, host="web-1")
    code = main(["daemon", "--controller", controller.address, "--state", str(tmp_path),
                 "--bundle", str(tmp_path / "b.json")])
    assert code == 2 and "exclude each other" in capsys.readouterr().err
    code = main(["daemon", "--controller", controller.address, "--state", str(tmp_path),
                 "--host", "web-2"])
    assert code == 2 and "differs from the enrolled host web-1" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["abc", "zz" * 32, "ab" * 33])
def test_a_fingerprint_that_is_not_a_sha256_stops_before_anything_is_written(
        tmp_path: Path, bad: str) -> None:
    state = tmp_path / "state"
    with pytest.raises(ConfigError, match=r"^enroll: --ca-fingerprint must be a SHA-256 "
                                          r"\(64 hex digits\)$"):
        enroll("127.0.0.1:1", "token", bad, state, host="web-1")
    assert not state.exists()
