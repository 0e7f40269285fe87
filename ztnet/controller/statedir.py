"""The controller's state directory (mode 0700)::

    ca.key       CA private key (0600)        ca.pem       CA certificate (10 years)
    signing.key  grant-signing key (0600)     signing.pub  its public half (hosts trust it)
    server.key   TLS key (0600)               server.pem   the controller's certificate
    ztnet.db     the SQLite database (0600, WAL mode); absent when the state is in
                 PostgreSQL (`--database postgresql://…`: several replicas share it)
    audit.jsonl  the hash-chained audit trail of admin decisions (0600; `ztnet audit
                 verify`), made by `serve` on first use

`controller init` builds it in a temporary sibling directory and renames it
into place at the end, so a failure leaves nothing half-made, and it never
touches a directory that already has anything in it. Admin credential
directories (`controller admin-cert --out DIR`) hold admin.key, admin.pem and
ca.pem: everything an operator's client needs for mutual TLS.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ztnet import pki
from ztnet.controller import ca
from ztnet.controller.pgstore import PgStore
from ztnet.controller.store import SqliteStore, Store
from ztnet.errors import ConfigError
from ztnet.fsutil import FileTooLarge, create_new, read_bounded, replace_atomic
from ztnet.grants.keys import generate_keypair
from ztnet.grants.model import is_dns_name

ADMIN_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\Z")
# `serve` re-issues its own certificate when less than this is left.
SERVER_RENEW_BEFORE = 30 * 86400.0
MAX_FILE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class StatePaths:
    root: Path

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def signing_key(self) -> Path:
        return self.root / "signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.root / "signing.pub"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def database(self) -> Path:
        return self.root / "ztnet.db"

    @property
    def audit(self) -> Path:
        """The controller's hash-chained audit trail (labels, alerts, quarantines, releases)."""
        return self.root / "audit.jsonl"


@dataclass(frozen=True, slots=True)
class AdminPaths:
    root: Path

    @property
    def key(self) -> Path:
        return self.root / "admin.key"

    @property
    def cert(self) -> Path:
        return self.root / "admin.pem"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"


def init_state(root: Path, trust_domain: str, *, sans: tuple[str, ...] = (),
               now: float, database: str | None = None) -> StatePaths:
    """Create a complete state directory at ``root`` (absent or empty); ``database``
    (a postgresql:// URL): the state goes there (migrated, given the trust domain)
    instead of ztnet.db."""
    if not is_dns_name(trust_domain):
        raise ConfigError(f"controller: trust domain {trust_domain!r} is not a lower-case "
                          "DNS name (e.g. example.org)")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"controller: {root} already exists and is not empty; refusing to "
                          "overwrite a controller's state (its CA and keys are irreplaceable)")
    dns, ips = ca.split_sans(("localhost", *sans))
    ips = tuple(dict.fromkeys(("127.0.0.1", "::1", *ips)))
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.init-", dir=root.parent))
    except OSError as exc:
        raise ConfigError(f"controller: cannot create {root}: {exc.strerror or exc}") from None
    try:
        paths = StatePaths(staging)
        authority = ca.create_authority(trust_domain, now=now)
        create_file(paths.ca_key, pki.private_key_pem(authority.key), 0o600)
        create_file(paths.ca_cert, authority.cert_pem, 0o644)
        generate_keypair(staging)
        store: Store = (SqliteStore.create(paths.database, trust_domain) if database is None
                        else PgStore.open(database, trust_domain=trust_domain))
        try:
            if isinstance(store, PgStore) and store.holds_state():
                raise ConfigError(f"controller: {store.where} already holds a controller's "
                                  "state; replicas share it by copying the first replica's "
                                  "state directory, not by running init again")
            _issue_server_certificate(paths, authority, store, dns, ips, now)
        finally:
            store.close()
        os.rename(staging, root)  # replaces an empty directory atomically
        root.chmod(0o700)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return StatePaths(root)


def open_state(root: Path, database: str | None = None) -> StatePaths:
    """``database`` given: the state is in PostgreSQL, ztnet.db is not needed."""
    paths = StatePaths(root)
    files = (paths.ca_key, paths.ca_cert, paths.signing_key, paths.server_key,
             paths.server_cert) + ((paths.database,) if database is None else ())
    for path in files:
        if not path.is_file():
            raise ConfigError(f"controller: {path} is missing; is {root} a controller state "
                              "directory (`ztnet controller init`)?")
    return paths


def open_store(paths: StatePaths, database: str | None = None, *,
               migrate: bool = True) -> Store:
    """The state directory's SQLite file, or the PostgreSQL database at ``database``
    (migrated unless ``migrate`` is False; its trust domain must be this directory's)."""
    if database is None:
        return SqliteStore.open(paths.database)
    return PgStore.open(database, trust_domain=trust_domain_of(paths), migrate=migrate)


def trust_domain_of(paths: StatePaths) -> str:
    """From the server certificate's SPIFFE id (spiffe://DOMAIN/controller)."""
    cert = x509.load_pem_x509_certificate(read_file(paths.server_cert))
    try:
        return pki.certificate_identity(cert).trust_domain
    except ValueError as exc:
        raise ConfigError(f"controller: {paths.server_cert}: {exc}") from None


def load_authority(paths: StatePaths) -> ca.Authority:
    return ca.load_authority(read_file(paths.ca_key), read_file(paths.ca_cert))


def ensure_server_certificate(paths: StatePaths, authority: ca.Authority, store: Store,
                              now: float) -> bool:
    """Re-issue server.pem (same names, new key) when it is close to expiry;
    True if it did. The controller is its own CA, so it never needs a person
    to renew this."""
    cert = x509.load_pem_x509_certificate(read_file(paths.server_cert))
    if pki.not_after(cert) - now > SERVER_RENEW_BEFORE:
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = tuple(san.get_values_for_type(x509.DNSName))
    ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    _issue_server_certificate(paths, authority, store, dns, ips, now, replace=True)
    return True


def issue_admin_credentials(paths: StatePaths, out: Path, name: str, *, lifetime: float,
                            now: float, database: str | None = None) -> AdminPaths:
    if not ADMIN_NAME_RE.match(name):
        raise ConfigError(f"controller: admin name {name!r} must be lower-case letters, "
                          "digits, '.', '_' or '-' (at most 63)")
    admin = AdminPaths(out)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"controller: cannot create {out}: {exc.strerror or exc}") from None
    authority = load_authority(paths)
    store = open_store(paths, database)
    try:
        identity = pki.spiffe_id(store.trust_domain(), "admin", name)
        key = pki.new_tls_key()
        cert = ca.issue(authority, key.public_key(), identity, now=now, lifetime=lifetime)
        create_file(admin.key, pki.private_key_pem(key), 0o600)
        create_file(admin.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        create_file(admin.ca_cert, authority.cert_pem, 0o644)
        store.record_certificate(cert.serial_number, identity.uri, now, pki.not_after(cert))
    finally:
        store.close()
    return admin


def _issue_server_certificate(paths: StatePaths, authority: ca.Authority, store: Store,
                              dns: tuple[str, ...], ips: tuple[str, ...], now: float, *,
                              replace: bool = False) -> None:
    key = pki.new_tls_key()
    identity = pki.spiffe_id(store.trust_domain(), "controller")
    cert = ca.issue(authority, key.public_key(), identity, now=now, lifetime=ca.SERVER_LIFETIME,
                    dns_names=dns, ip_addresses=ips)
    write = replace_file if replace else create_file
    write(paths.server_key, pki.private_key_pem(key), 0o600)
    write(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    store.record_certificate(cert.serial_number, identity.uri, now, pki.not_after(cert))


def create_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never replacing one) with ``mode`` from the start."""
    try:
        create_new(path, data, mode)
    except FileExistsError:
        raise ConfigError(f"controller: {path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise ConfigError(f"controller: cannot write {path}: {exc.strerror or exc}") from None


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Readers see the old or the new file."""
    try:
        replace_atomic(path, data, mode)
    except OSError as exc:
        raise ConfigError(f"controller: cannot write {path}: {exc.strerror or exc}") from None


def read_file(path: Path) -> bytes:
    try:
        return read_bounded(path, MAX_FILE)
    except OSError as exc:
        raise ConfigError(f"controller: cannot read {path}: {exc.strerror or exc}") from None
    except FileTooLarge:
        raise ConfigError(f"controller: {path} is too large") from None
