"""`ztnet controller init|serve|migrate|token create|admin-cert|revoke-host|revoke-admin|
raise-version`: run the controller and administer its state directory (docs/controller.md).
``--database postgresql://…`` (or $ZTNET_DATABASE) puts the state in PostgreSQL, shared by
replicas; without it, the state directory's SQLite file.

The functions below the handlers are what the commands do, callable by tests: each
returns an exit code, prints to ``out`` (default: stdout at call time) and raises a
ZtnetError subclass on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ztnet.cli.args import (
    SubParsers,
    UsageError,
    add_command,
    add_group,
    checked,
    controller_state_option,
    duration,
    duration_or_off,
)
from ztnet.controller.limits import DEFAULT_LIMITS, HostLimits, parse_rate
from ztnet.durations import format_duration
from ztnet.errors import ConfigError

if TYPE_CHECKING:
    from ztnet.pki import Kind

DEFAULT_ADMIN_TTL = 30 * 86400.0
DATABASE_ENV = "ZTNET_DATABASE"


def database_url(value: str) -> str:
    from ztnet.controller.pgstore import is_database_url

    if not is_database_url(value):
        raise argparse.ArgumentTypeError(
            "want a postgresql://USER@HOST:PORT/DBNAME URL (the password from ~/.pgpass or "
            "$PGPASSWORD rather than the command line); without --database the state "
            "directory's SQLite file is used")
    return value


def database_option(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get(DATABASE_ENV) or None
    parser.add_argument("--database", type=database_url, default=default, metavar="URL",
                        help="keep the state in this PostgreSQL database (shared by "
                        f"replicas; default: ${DATABASE_ENV}, else the state directory's "
                        "SQLite file)")


def register(sub: SubParsers) -> None:
    controller = add_command(sub, "controller", "Run and administer the controller: the CA, "
                             "enrollment tokens, admin credentials and the gRPC server.",
                             "ztnet controller init --state /var/lib/ztnet-controller "
                             "--trust-domain example.org")
    group = add_group(controller, "controller_command")

    p = add_command(group, "init", "Create a state directory: a CA for mutual TLS, a grant-"
                    "signing key, the server certificate and the database. Never overwrites.",
                    "ztnet controller init --state /var/lib/ztnet-controller "
                    "--trust-domain example.org --san ctl.example.org", handle_init)
    controller_state_option(p)
    database_option(p)
    p.add_argument("--trust-domain", required=True, metavar="DOMAIN",
                   help="SPIFFE trust domain (policies must name the same one)")
    p.add_argument("--san", action="append", default=[], metavar="NAME",
                   help="extra DNS name or IP address for the server certificate (repeat); "
                   "localhost, 127.0.0.1 and ::1 are always included")

    p = add_command(group, "serve", "Serve the node and admin APIs (gRPC, mutual TLS), push "
                    "signed grants to every connected host, renew them before they expire.",
                    "ztnet controller serve --state /var/lib/ztnet-controller "
                    "--listen 0.0.0.0:7443 --enroll-listen 0.0.0.0:7444", handle_serve)
    controller_state_option(p)
    database_option(p)
    p.add_argument("--listen", required=True, metavar="ADDR",
                   help="mutual-TLS HOST:PORT for daemons and operators (port 0: any)")
    p.add_argument("--enroll-listen", metavar="ADDR", default=None,
                   help="server-authenticated TLS HOST:PORT where hosts without a "
                   "certificate can Enroll (default: enrollment off)")
    p.add_argument("--policy", type=Path, metavar="FILE",
                   help="apply this policy at start if it is newer than the stored one")
    p.add_argument("--grant-ttl", type=duration, default=300, metavar="DURATION",
                   help="lifetime of grants whose rule has no ttl; bundles are renewed at "
                   "half their lifetime (default 5m)")
    p.add_argument("--host-cert-ttl", type=duration, default=3600, metavar="DURATION",
                   help="lifetime of host certificates; hosts renew at half of it "
                   "(default 1h: what a copied state directory is worth)")
    p.add_argument("--tpm-ek-ca", type=Path, action="append", default=[], metavar="PEM",
                   help="EK CA certificates (PEM; repeatable): TPMs whose EK certificate "
                   "they signed may enroll with `ztnet enroll --tpm`")
    p.add_argument("--tpm-ek-allowlist", type=Path, default=None, metavar="FILE",
                   help="EK hashes (sha256:HEX, one a line) of TPMs that may enroll, e.g. "
                   "TPMs without an EK certificate")
    p.add_argument("--apply-timeout", type=duration, default=10, metavar="DURATION",
                   help="how long ApplyPolicy and Revoke wait for hosts by default (10s)")
    p.add_argument("--ready-file", type=Path, metavar="FILE",
                   help="write {pid, listen, enroll_listen} as JSON here once serving")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--flow-retention", type=duration_or_off, default=7 * 86400,
                   metavar="DURATION", help="delete flow records received longer ago than "
                   "this (default 7d; 0: keep them)")
    p.add_argument("--flow-max-rows", type=int, default=10_000_000, metavar="N",
                   help="keep at most N flow records, deleting the oldest of the host "
                   "holding the most (default 10000000, about 16 GB of disk; 0: no limit)")
    p.add_argument("--flow-prune-interval", type=duration, default=60, metavar="DURATION",
                   help="how often retention runs (default 1m)")
    p.add_argument("--metrics", metavar="ADDR", default=None,
                   help="serve Prometheus metrics at http://ADDR/metrics (e.g. "
                   "127.0.0.1:9465; default: off)")
    p.add_argument("--otlp-endpoint", metavar="HOST:PORT", default=None,
                   help="also export every stored flow record as an OTLP log record to the "
                   "OpenTelemetry collector at HOST:PORT (gRPC, no TLS; docs/flows.md)")
    p.add_argument("--flow-max-rows-per-host", type=int, default=1_000_000, metavar="N",
                   help="keep at most N flow records of any one host, deleting its oldest "
                   "(default 1000000; 0: no limit)")
    limits, rate = DEFAULT_LIMITS, checked(parse_rate)
    p.add_argument("--host-subscribe-rate", type=rate, default=limits.subscribe, metavar="N/T",
                   help=f"StreamGrants calls per host (default {limits.subscribe}; off: none)")
    p.add_argument("--host-renew-rate", type=rate, default=limits.renew, metavar="N/T",
                   help=f"RenewCertificate calls per host (default {limits.renew})")
    p.add_argument("--host-flow-rate", type=rate, default=limits.flow_records, metavar="N/T",
                   help=f"flow records per host; faster batches wait (default "
                   f"{limits.flow_records})")
    p.add_argument("--host-request-rate", type=rate, default=limits.grant_requests,
                   metavar="N/T", help=f"RequestGrant calls per host (just-in-time grant "
                   f"requests; default {limits.grant_requests})")
    p.add_argument("--host-max-streams", type=int, default=limits.max_streams, metavar="N",
                   help=f"open StreamGrants and ReportFlows streams per host, each (default "
                   f"{limits.max_streams}; 0: no limit)")

    p = add_command(group, "migrate", "Create or upgrade the PostgreSQL schema (under a lock: "
                    "replicas starting together migrate once), and give the database this "
                    "state directory's trust domain. `serve --database` also does it at start.",
                    "ztnet controller migrate --state DIR --database "
                    "postgresql://ztnet@db.example.org/ztnet", handle_migrate)
    controller_state_option(p)
    p.add_argument("--database", type=database_url, required=DATABASE_ENV not in os.environ,
                   default=os.environ.get(DATABASE_ENV) or None, metavar="URL",
                   help=f"the PostgreSQL database (default: ${DATABASE_ENV})")

    p = add_command(group, "token", "Enrollment tokens.",
                    "ztnet controller token create --state DIR --host web-1")
    tokens = add_group(p, "token_command")
    p = add_command(tokens, "create", "Print a one-time enrollment token for HOST and the CA "
                    "fingerprint, the two things `ztnet enroll` needs.",
                    "ztnet controller token create --state DIR --host web-1 --ttl 15m --json",
                    handle_token_create)
    controller_state_option(p)
    database_option(p)
    p.add_argument("--host", required=True, help="the host this token may enroll")
    p.add_argument("--ttl", type=duration, default=900, metavar="DURATION",
                   help="how long the token is valid (default 15m)")
    p.add_argument("--json", action="store_true",
                   help='print {"token": …, "ca_fingerprint": …}')
    p.add_argument("--require-tpm", action="store_true",
                   help="the token only enrolls a host proving a TPM-resident key "
                   "(`ztnet enroll --tpm`); software enrollment is refused")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="label the host it enrolls (repeat; host selectors in the policy "
                   "pick hosts by label, docs/policy.md); `ztnet label` changes them later")

    p = add_command(group, "admin-cert", "Write an admin credential directory (admin.key, "
                    "admin.pem, ca.pem) for the operator commands.",
                    "ztnet controller admin-cert --state DIR --out ~/.ztnet/admin --name alice",
                    handle_admin_cert)
    controller_state_option(p)
    database_option(p)
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="directory to write (created 0700)")
    p.add_argument("--name", default="admin", help="who holds it (in the SPIFFE id)")
    p.add_argument("--ttl", type=duration, default=int(DEFAULT_ADMIN_TTL), metavar="DURATION",
                   help="lifetime (default 30d)")

    p = add_command(group, "revoke-host", "Revoke every certificate of HOST (a lost or "
                    "compromised host); it must enroll again with a new token.",
                    "ztnet controller revoke-host --state DIR --host web-1", handle_revoke_host)
    controller_state_option(p)
    database_option(p)
    p.add_argument("--host", required=True)

    p = add_command(group, "revoke-admin", "Revoke every certificate of admin NAME (a lost "
                    "credential directory or a departed operator); refused from its next call.",
                    "ztnet controller revoke-admin --state DIR --name alice",
                    handle_revoke_admin)
    controller_state_option(p)
    database_option(p)
    p.add_argument("--name", required=True, help="the admin's name (as in admin-cert --name)")

    p = add_command(group, "raise-version", "Raise the bundle version counter above N (after "
                    "restoring the database from a backup, hosts hold versions above it).",
                    "ztnet controller raise-version --state DIR --above 1234",
                    handle_raise_version)
    controller_state_option(p)
    database_option(p)
    p.add_argument("--above", required=True, type=int, metavar="N",
                   help="the highest version any host holds (in its log and `ztnet hosts`)")


# --- handlers: the parsed command line -> the functions below ------------------------


def handle_init(args: argparse.Namespace) -> int:
    return controller_init(args.state, args.trust_domain, sans=tuple(args.san),
                           database=args.database)


def handle_migrate(args: argparse.Namespace) -> int:
    return migrate(args.state, args.database)


def handle_serve(args: argparse.Namespace) -> int:
    for flag in ("flow_max_rows", "flow_max_rows_per_host", "host_max_streams"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')}: must be 0 (no limit) or more")
    return serve(state=args.state, listen=args.listen, enroll_listen=args.enroll_listen,
                 policy=args.policy, grant_ttl=args.grant_ttl,
                 host_cert_ttl=args.host_cert_ttl, apply_timeout=args.apply_timeout,
                 ready_file=args.ready_file, log_format=args.log_format,
                 flow_retention=args.flow_retention, flow_max_rows=args.flow_max_rows,
                 flow_prune_interval=args.flow_prune_interval, metrics=args.metrics,
                 flow_max_rows_per_host=args.flow_max_rows_per_host,
                 host_limits=HostLimits(subscribe=args.host_subscribe_rate,
                                        renew=args.host_renew_rate,
                                        flow_records=args.host_flow_rate,
                                        max_streams=args.host_max_streams,
                                        grant_requests=args.host_request_rate),
                 tpm_ek_cas=tuple(args.tpm_ek_ca), tpm_ek_allowlist=args.tpm_ek_allowlist,
                 otlp_endpoint=args.otlp_endpoint, database=args.database)


def handle_token_create(args: argparse.Namespace) -> int:
    from ztnet.policy.selectors import parse_labels

    try:
        labels = parse_labels(args.label)
    except ValueError as exc:
        raise UsageError(f"--label: {exc}") from None
    return token_create(args.state, args.host, ttl=args.ttl, as_json=args.json,
                        require_tpm=args.require_tpm, labels=labels,
                        database=args.database)


def handle_admin_cert(args: argparse.Namespace) -> int:
    return admin_cert(args.state, args.out, name=args.name, ttl=args.ttl,
                      database=args.database)


def handle_revoke_host(args: argparse.Namespace) -> int:
    return revoke_host(args.state, args.host, database=args.database)


def handle_revoke_admin(args: argparse.Namespace) -> int:
    return revoke_admin(args.state, args.name, database=args.database)


def handle_raise_version(args: argparse.Namespace) -> int:
    return raise_version(args.state, args.above, database=args.database)


# --- what the commands do ------------------------------------------------------------


def controller_init(state: Path, trust_domain: str, *, sans: tuple[str, ...] = (),
                    out: TextIO | None = None, database: str | None = None) -> int:
    from ztnet.controller import statedir

    paths = statedir.init_state(state, trust_domain, sans=sans, now=time.time(),
                                database=database)
    authority = statedir.load_authority(paths)
    _print(out, f"created controller state in {state} (trust domain {trust_domain})")
    _print(out, f"CA fingerprint (SHA-256): {authority.fingerprint}")
    _print(out, f"next: ztnet controller admin-cert --state {state} --out ADMIN_DIR")
    _print(out, f"      ztnet controller serve --state {state} --listen 0.0.0.0:7443 "
                "--enroll-listen 0.0.0.0:7444" + (" --database URL" if database else ""))
    return 0


def migrate(state: Path, database: str, *, out: TextIO | None = None) -> int:
    """Migrate ``database`` (idempotent; concurrent calls migrate once)."""
    from ztnet.controller import pgschema, statedir
    from ztnet.controller.pgstore import describe

    paths = statedir.open_state(state, database)
    statedir.open_store(paths, database).close()
    _print(out, f"{describe(database)} is at schema {pgschema.PG_SCHEMA_VERSION} "
                f"(trust domain {statedir.trust_domain_of(paths)})")
    return 0


def serve(*, state: Path, listen: str, enroll_listen: str | None = None,
          policy: Path | None = None, grant_ttl: float = 300.0,
          host_cert_ttl: float = 3600.0, apply_timeout: float = 10.0,
          ready_file: Path | None = None, log_format: str = "text",
          flow_retention: float = 7 * 86400.0, flow_max_rows: int = 10_000_000,
          flow_prune_interval: float = 60.0, metrics: str | None = None,
          flow_max_rows_per_host: int = 1_000_000,
          host_limits: HostLimits = DEFAULT_LIMITS,
          tpm_ek_cas: tuple[Path, ...] = (), tpm_ek_allowlist: Path | None = None,
          otlp_endpoint: str | None = None, database: str | None = None) -> int:
    """Serve until stopped (SIGTERM/SIGINT)."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before gRPC's core starts
    from ztnet import logs
    from ztnet.controller.flows import Retention
    from ztnet.controller.server import ServeConfig
    from ztnet.controller.server import serve as run_server

    logs.setup(log_format)
    if otlp_endpoint is not None:  # a bad address fails here, before anything starts
        from ztnet.observe.otlp import parse_endpoint

        parse_endpoint(otlp_endpoint)
    return run_server(ServeConfig(
        state=state, listen=listen, enroll_listen=enroll_listen, policy=policy,
        grant_ttl=grant_ttl, host_cert_ttl=host_cert_ttl, apply_timeout=apply_timeout,
        ready_file=ready_file,
        retention=Retention(max_age=flow_retention, max_rows=flow_max_rows,
                            max_rows_per_host=flow_max_rows_per_host,
                            interval=flow_prune_interval),
        metrics=metrics, host_limits=host_limits, tpm_ek_cas=tpm_ek_cas,
        tpm_ek_allowlist=tpm_ek_allowlist, otlp_endpoint=otlp_endpoint,
        database=database))


def token_create(state: Path, host: str, *, ttl: float, as_json: bool,
                 out: TextIO | None = None, require_tpm: bool = False,
                 labels: dict[str, str] | None = None, database: str | None = None) -> int:
    from ztnet.controller import statedir
    from ztnet.controller.enrollment import create_token
    from ztnet.errors import RpcFailure

    paths = statedir.open_state(state, database)
    authority = statedir.load_authority(paths)
    store = statedir.open_store(paths, database)
    try:
        token = create_token(store, host, ttl=ttl, now=time.time(), require_tpm=require_tpm,
                             labels=labels)
    except RpcFailure as exc:
        raise ConfigError(f"controller: --{exc}") from None
    finally:
        store.close()
    if as_json:
        printed: dict[str, object] = {"token": token, "ca_fingerprint": authority.fingerprint}
        if require_tpm:
            printed["require_tpm"] = True
        if labels:
            printed["labels"] = labels
        _print(out, json.dumps(printed))
    else:
        _print(out, f"token:          {token}")
        _print(out, f"ca fingerprint: {authority.fingerprint}")
        _print(out, f"host:           {host} (valid once, for {format_duration(ttl)}"
                    f"{'; TPM enrollment only: ztnet enroll --tpm' if require_tpm else ''})")
        if labels:
            from ztnet.policy.selectors import format_labels

            _print(out, f"labels:         {format_labels(labels)}")
    return 0


def admin_cert(state: Path, out_dir: Path, *, name: str, ttl: float = DEFAULT_ADMIN_TTL,
               out: TextIO | None = None, database: str | None = None) -> int:
    from ztnet.controller import statedir

    paths = statedir.open_state(state, database)
    admin = statedir.issue_admin_credentials(paths, out_dir, name, lifetime=ttl,
                                             now=time.time(), database=database)
    _print(out, f"wrote {admin.key} (private, mode 0600), {admin.cert} and {admin.ca_cert}")
    _print(out, f"use: ztnet hosts --controller HOST:PORT --credentials {out_dir}")
    return 0


def revoke_host(state: Path, host: str, *, out: TextIO | None = None,
                database: str | None = None) -> int:
    """Revoke every certificate of ``host``: refused from the next RPC on, and
    its open grant stream ends at its next check."""
    return _revoke(state, "host", host, "it must enroll again", out, database)


def revoke_admin(state: Path, name: str, *, out: TextIO | None = None,
                 database: str | None = None) -> int:
    """Revoke every certificate of admin ``name``: every admin RPC checks
    revocation, so the next call with it is UNAUTHENTICATED."""
    return _revoke(state, "admin", name, "issue a new one with `ztnet controller admin-cert`",
                   out, database)


def _revoke(state: Path, kind: Kind, name: str, then: str, out: TextIO | None,
            database: str | None) -> int:
    from ztnet import pki
    from ztnet.controller import statedir

    paths = statedir.open_state(state, database)
    store = statedir.open_store(paths, database)
    try:
        identity = pki.spiffe_id(store.trust_domain(), kind, name)
        count = store.revoke_certificates(identity.uri, time.time())
        if kind == "host":
            store.unbind_host(name)  # its TPM must attest again, with a new token
    finally:
        store.close()
    if count == 0:
        raise ConfigError(f"controller: {kind} {name} has no certificate to revoke")
    _print(out, f"revoked {count} certificate(s) of {identity.uri}; {then}")
    return 0


def raise_version(state: Path, above: int, *, out: TextIO | None = None,
                  database: str | None = None) -> int:
    """Make the next bundle version greater than ``above``: the one way a version
    moves on something other than a change (hosts ahead after a restore)."""
    from ztnet.controller import statedir
    from ztnet.policy.issue import MAX_ISSUE_VERSION

    if not 0 <= above < MAX_ISSUE_VERSION:
        raise ConfigError(f"controller: --above must be between 0 and {MAX_ISSUE_VERSION - 1}")
    paths = statedir.open_state(state, database)
    store = statedir.open_store(paths, database)
    try:
        before = store.current_version()
        if before > above:
            _print(out, f"the version counter is {before}, already above {above}")
            return 0
        version = store.next_version(at_least=above)
    finally:
        store.close()
    _print(out, f"raised the version counter from {before} to {version}; hosts get a new "
                "bundle when they next connect")
    return 0


def _print(out: TextIO | None, text: str) -> None:
    print(text, file=out if out is not None else sys.stdout)
