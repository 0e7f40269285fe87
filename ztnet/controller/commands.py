"""What `ztnet controller …` does, as functions a test can call. Each
returns an exit code, prints to ``out`` (default: stdout at call time) and
raises a ZtnetError subclass on failure."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO

from ztnet import pki
from ztnet.controller import statedir
from ztnet.controller.enrollment import create_token
from ztnet.controller.store import SqliteStore
from ztnet.errors import ConfigError, RpcFailure
from ztnet.policy.document import format_duration

DEFAULT_ADMIN_TTL = 30 * 86400.0


def controller_init(state: Path, trust_domain: str, *, sans: tuple[str, ...] = (),
                    out: TextIO | None = None) -> int:
    paths = statedir.init_state(state, trust_domain, sans=sans, now=time.time())
    authority = statedir.load_authority(paths)
    _print(out, f"created controller state in {state} (trust domain {trust_domain})")
    _print(out, f"CA fingerprint (SHA-256): {authority.fingerprint}")
    _print(out, f"next: ztnet controller admin-cert --state {state} --out ADMIN_DIR")
    _print(out, f"      ztnet controller serve --state {state} --listen 0.0.0.0:7443 "
                "--enroll-listen 0.0.0.0:7444")
    return 0


def token_create(state: Path, host: str, *, ttl: float, as_json: bool,
                 out: TextIO | None = None) -> int:
    paths = statedir.open_state(state)
    authority = statedir.load_authority(paths)
    store = SqliteStore.open(paths.database)
    try:
        token = create_token(store, host, ttl=ttl, now=time.time())
    except RpcFailure as exc:
        raise ConfigError(f"controller: --{exc}") from None
    finally:
        store.close()
    if as_json:
        _print(out, json.dumps({"token": token, "ca_fingerprint": authority.fingerprint}))
    else:
        _print(out, f"token:          {token}")
        _print(out, f"ca fingerprint: {authority.fingerprint}")
        _print(out, f"host:           {host} (valid once, for {format_duration(ttl)})")
    return 0


def admin_cert(state: Path, out_dir: Path, *, name: str, ttl: float,
               out: TextIO | None = None) -> int:
    paths = statedir.open_state(state)
    admin = statedir.issue_admin_credentials(paths, out_dir, name, lifetime=ttl,
                                             now=time.time())
    _print(out, f"wrote {admin.key} (private, mode 0600), {admin.cert} and {admin.ca_cert}")
    _print(out, f"use: ztnet hosts --controller HOST:PORT --credentials {out_dir}")
    return 0


def revoke_host(state: Path, host: str, *, out: TextIO | None = None) -> int:
    """Revoke every certificate of ``host``: refused from the next RPC on, and
    its open grant stream ends at its next check."""
    paths = statedir.open_state(state)
    store = SqliteStore.open(paths.database)
    try:
        identity = pki.spiffe_id(store.trust_domain(), "host", host)
        count = store.revoke_certificates(identity.uri, time.time())
    finally:
        store.close()
    if count == 0:
        raise ConfigError(f"controller: host {host} has no certificate to revoke")
    _print(out, f"revoked {count} certificate(s) of {identity.uri}; it must enroll again")
    return 0


def _print(out: TextIO | None, text: str) -> None:
    print(text, file=out if out is not None else sys.stdout)
