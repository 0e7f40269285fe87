"""What `ztnet keys …` and `ztnet policy …` do, as functions a test can call.

Each returns an exit code and raises a ZtnetError subclass on failure (the
CLI prints it and exits with its code). Output goes to ``out`` (default
stdout, looked up at call time so tests can capture it).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from ztnet.errors import ConfigError
from ztnet.fsutil import replace_atomic
from ztnet.grants.bundle import (
    VerifiedBundle,
    format_time,
    sign_bundle,
    verify_bundle,
)
from ztnet.grants.envelope import MAX_ENVELOPE_BYTES
from ztnet.grants.keys import generate_keypair, key_id, load_private_key, load_public_key
from ztnet.policy.document import load_policy
from ztnet.policy.issue import issue_bundle
from ztnet.policy.summary import format_table, summarize

DEFAULT_ISSUER = "ztnet-cli"

PathLike = str | os.PathLike[str]


def keys_init(directory: PathLike, *, out: TextIO | None = None) -> int:
    """`ztnet keys init DIR`: create a signing key pair."""
    key_path, pub_path = generate_keypair(directory)
    kid = key_id(load_public_key(pub_path))
    _print(out, f"wrote {key_path} (private, mode 0600) and {pub_path}")
    _print(out, f"key id {kid}")
    _print(out, f"hosts verify bundles with: ztnet policy verify BUNDLE --trust {pub_path}")
    return 0


def policy_check(
    policy_path: PathLike, *, default_ttl: float = 300.0, out: TextIO | None = None
) -> int:
    """`ztnet policy check POLICY`: validate and summarize."""
    policy = load_policy(policy_path)
    _print(out, summarize(policy, default_ttl=default_ttl))
    return 0


def policy_compile(
    policy_path: PathLike,
    *,
    key_path: PathLike,
    host: str,
    out_path: PathLike,
    version: int | None = None,
    default_ttl: float = 300.0,
    bundle_ttl: float | None = None,
    issuer: str = DEFAULT_ISSUER,
    now: float | None = None,
    out: TextIO | None = None,
) -> int:
    """`ztnet policy compile`: policy → signed bundle for one host. Without
    ``version`` the current Unix time in seconds is used, which grows between
    runs; a controller passes its own counter."""
    now = time.time() if now is None else now
    policy = load_policy(policy_path)
    private_key = load_private_key(key_path)
    bundle = issue_bundle(
        policy,
        host=host,
        version=int(now) if version is None else version,
        now=now,
        issuer=issuer,
        default_ttl=default_ttl,
        bundle_ttl=bundle_ttl,
    )
    envelope = sign_bundle(bundle, private_key)
    # Never write a bundle this very code would refuse.
    verified = verify_bundle(
        envelope,
        trusted=[private_key.public_key()],
        host=bundle.audience,
        min_version=bundle.version,
        now=now,
    )
    _write_atomic(Path(out_path), envelope)
    count = len(verified.grants)
    _print(
        out,
        f"wrote {os.fspath(out_path)}: version {bundle.version} for host {bundle.audience}, "
        f"{count} grant{'s' if count != 1 else ''}, expires {format_time(bundle.expires)}, "
        f"signed by key {verified.key_id}",
    )
    return 0


def policy_verify(
    bundle_path: PathLike,
    *,
    trust: Sequence[PathLike],
    host: str | None = None,
    min_version: int = 1,
    now: float | None = None,
    out: TextIO | None = None,
) -> int:
    """`ztnet policy verify`: check a bundle and show what it grants. Without
    ``host`` the audience is shown but not checked."""
    now = time.time() if now is None else now
    if not trust:
        raise ConfigError("bundle: no trusted key given (--trust signing.pub)")
    keys = [load_public_key(path) for path in trust]
    envelope = _read_bundle(bundle_path)
    verified = verify_bundle(envelope, trusted=keys, host=host, min_version=min_version, now=now)
    _print(out, render_bundle(verified, source=os.fspath(bundle_path), host=host, now=now))
    return 0


def render_bundle(verified: VerifiedBundle, *, source: str, host: str | None, now: float) -> str:
    bundle = verified.bundle
    audience = bundle.audience if host else f"{bundle.audience} (not checked: no --host)"
    fields = [
        ["trust domain", bundle.trust_domain],
        ["issuer", bundle.issuer],
        ["audience", audience],
        ["version", str(bundle.version)],
        ["issued at", format_time(bundle.issued_at)],
        ["expires", f"{format_time(bundle.expires)} (in {_left(bundle.expires - now)})"],
        ["signed by", verified.key_id],
        ["payload sha256", verified.payload_sha256],
    ]
    lines = [f"bundle {source}: signature valid"]
    lines += [f"  {name + ':':<16}{value}" for name, value in fields]
    rows = [
        [
            record.grant.label,
            str(record.serial),
            record.grant.agent,
            str(record.grant.proto),
            str(record.grant.network),
            "any" if record.grant.ports is None else str(record.grant.ports),
            format_time(record.grant.not_before),
            f"{format_time(record.grant.not_after)} (in {_left(record.grant.not_after - now)})",
        ]
        for record in bundle.grants
    ]
    if rows:
        headers = ["GRANT", "SERIAL", "AGENT", "PROTO", "TO", "PORTS", "NOT BEFORE", "NOT AFTER"]
        lines.append(format_table(headers, rows))
    else:
        lines.append("no grants: every agent on this host is denied all network access")
    return "\n".join(lines)


def _left(seconds: float) -> str:
    whole = max(0, int(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    if whole or not parts:
        parts.append(f"{whole}s")
    return "".join(parts)


def _read_bundle(path: PathLike) -> bytes:
    try:
        with open(path, "rb") as handle:
            # One byte over the limit is enough for the envelope check to refuse it.
            return handle.read(MAX_ENVELOPE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"bundle: cannot read {os.fspath(path)}: {exc.strerror or exc}") from None


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers (a daemon polling the file) see the old bundle or the new one,
    never half of one. Bundles are signed, not secret: 0644."""
    try:
        replace_atomic(path, data, 0o644)
    except OSError as exc:
        raise ConfigError(f"bundle: cannot write {path}: {exc.strerror or exc}") from None


def _print(out: TextIO | None, text: str) -> None:
    print(text, file=out if out is not None else sys.stdout)


__all__ = [
    "DEFAULT_ISSUER",
    "keys_init",
    "policy_check",
    "policy_compile",
    "policy_verify",
    "render_bundle",
]
