"""Signing keys on disk."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztnet.errors import ConfigError
from ztnet.grants.keys import generate_keypair, key_id, load_private_key, load_public_key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_writes_a_matching_pair(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "keys"
    key_path, pub_path = generate_keypair(directory)
    assert (key_path, pub_path) == (directory / "signing.key", directory / "signing.pub")
    assert mode(directory) == 0o700
    assert mode(key_path) == 0o600 and mode(pub_path) == 0o644
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    private, public = load_private_key(key_path), load_public_key(pub_path)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert (
        private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        == raw
    )
    assert key_id(public) == hashlib.sha256(raw).hexdigest()


def test_private_key_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        key_path, _ = generate_keypair(tmp_path)
    finally:
        os.umask(old)
    assert mode(key_path) == 0o600


@pytest.mark.parametrize("existing", ["signing.key", "signing.pub"])
def test_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"precious")
    with pytest.raises(ConfigError, match=f"keys: {tmp_path / existing} already exists"):
        generate_keypair(tmp_path)
    assert (tmp_path / existing).read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_refuses_a_symlink_in_place_of_the_key(tmp_path: Path) -> None:
    (tmp_path / "signing.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(tmp_path)
    assert not (tmp_path / "elsewhere").exists()


def test_directory_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="keys: cannot create"):
        generate_keypair(tmp_path / "f")


def test_wrong_key_type_is_refused(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    key_path = tmp_path / "ec.key"
    key_path.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub_path = tmp_path / "ec.pub"
    pub_path.write_bytes(
        ec_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(
        ConfigError, match=f"keys: {key_path} holds a .* key; ztnet signs with Ed25519"
    ):
        load_private_key(key_path)
    with pytest.raises(
        ConfigError, match=f"keys: {pub_path} holds a .* key; ztnet verifies only Ed25519"
    ):
        load_public_key(pub_path)


def test_swapped_files_get_a_hint(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair(tmp_path)
    with pytest.raises(ConfigError, match=f"keys: {key_path} is a private key; trust the public"):
        load_public_key(key_path)
    with pytest.raises(ConfigError, match=r"is not a PEM private key \(that is a public key\)"):
        load_private_key(pub_path)


def test_encrypted_key_is_refused(tmp_path: Path) -> None:
    key_path, _ = generate_keypair(tmp_path / "k")
    encrypted = load_private_key(key_path).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    path = tmp_path / "enc.key"
    path.write_bytes(encrypted)
    with pytest.raises(ConfigError, match=f"keys: {path} is encrypted"):
        load_private_key(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        b"x" * 100_000,
    ],
)
def test_garbage_public_key(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pub"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"keys: .*{path.name}"):
        load_public_key(path)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"keys: cannot read {tmp_path / 'no.key'}"):
        load_private_key(tmp_path / "no.key")
    with pytest.raises(ConfigError, match=f"keys: cannot read {tmp_path / 'no.pub'}"):
        load_public_key(tmp_path / "no.pub")
