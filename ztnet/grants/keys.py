"""Ed25519 grant-signing keys on disk.

``keys init DIR`` writes ``DIR/signing.key`` (PEM PKCS#8, mode 0600) and
``DIR/signing.pub`` (PEM SubjectPublicKeyInfo). A key is named by its key id,
the hex SHA-256 of the raw 32-byte public key, which is what envelopes carry.
The algorithm is fixed: a key of any other type is refused, never adapted to.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ztnet.errors import ConfigError
from ztnet.fsutil import FileTooLarge, create_new, read_bounded

PRIVATE_KEY_NAME = "signing.key"
PUBLIC_KEY_NAME = "signing.pub"
# Key files are a few hundred bytes; refuse to slurp anything much larger.
MAX_KEY_FILE = 64 * 1024


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_keypair(directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Create a new key pair in ``directory`` (made 0700 if missing). Refuses
    to replace an existing key: losing a signing key is not recoverable."""
    root = Path(directory)
    key_path, pub_path = root / PRIVATE_KEY_NAME, root / PUBLIC_KEY_NAME
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"keys: cannot create {root}: {exc.strerror or exc}") from None
    if not root.is_dir():
        raise ConfigError(f"keys: {root} is not a directory")
    for path in (key_path, pub_path):
        if os.path.lexists(path):
            raise ConfigError(
                f"keys: {path} already exists; refusing to overwrite a key "
                "(move it away first if you really mean to replace it)"
            )
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(key_path, private_pem, 0o600)
    try:
        _write_new(pub_path, public_pem, 0o644)
    except ConfigError:
        key_path.unlink()  # leave no half-made pair behind
        raise
    return key_path, pub_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # Never truncate a file that appeared since the check above, never write a
    # key through a planted symlink: create_new is O_EXCL | O_NOFOLLOW.
    try:
        create_new(path, data, mode)
    except OSError as exc:
        raise ConfigError(f"keys: cannot create {path}: {exc.strerror or exc}") from None


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    data = _read(path)
    if b"PRIVATE KEY-----" not in data:
        hint = " (that is a public key)" if b"PUBLIC KEY-----" in data else ""
        raise ConfigError(f"keys: {os.fspath(path)} is not a PEM private key{hint}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"keys: {os.fspath(path)} is encrypted; ztnet needs an unencrypted key"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"keys: {os.fspath(path)}: cannot load private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"keys: {os.fspath(path)} holds a {_kind(key)} key; ztnet signs with Ed25519 "
            "(create one with `ztnet keys init DIR`)"
        )
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    data = _read(path)
    if b"PRIVATE KEY-----" in data:
        raise ConfigError(
            f"keys: {os.fspath(path)} is a private key; trust the public key "
            f"({PUBLIC_KEY_NAME}) instead"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"keys: {os.fspath(path)}: cannot load public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(
            f"keys: {os.fspath(path)} holds a {_kind(key)} key; ztnet verifies only Ed25519"
        )
    return key


def _read(path: str | os.PathLike[str]) -> bytes:
    name = os.fspath(path)
    try:
        return read_bounded(name, MAX_KEY_FILE)
    except OSError as exc:
        raise ConfigError(f"keys: cannot read {name}: {exc.strerror or exc}") from None
    except FileTooLarge:
        raise ConfigError(f"keys: {name} is too large to be a key file") from None


def _kind(key: object) -> str:
    name = type(key).__name__.removeprefix("_")
    for suffix in ("PrivateKey", "PublicKey"):
        name = name.removesuffix(suffix)
    return name or "non-Ed25519"
