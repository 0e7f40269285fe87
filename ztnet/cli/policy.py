"""`ztnet policy check|compile|delta|verify` (a policy file and signed bundles, no controller)
and `ztnet policy apply|show` (the controller's policy, through ztnet.cli.operator).

The functions below the handlers are what the local commands do, callable by tests:
each returns an exit code and raises a ZtnetError subclass on failure (the CLI prints it
and exits with its code). Output goes to ``out`` (default stdout, looked up at call time
so tests can capture it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ztnet.cli import operator, policy_review
from ztnet.cli.args import (
    SubParsers,
    UsageError,
    add_command,
    add_group,
    duration,
    operator_options,
)
from ztnet.durations import format_remaining
from ztnet.errors import ConfigError
from ztnet.fsutil import replace_atomic
from ztnet.text import format_table, format_time

if TYPE_CHECKING:
    from ztnet.grants.bundle import VerifiedBundle

DEFAULT_ISSUER = "ztnet-cli"

PathLike = str | os.PathLike[str]


def register(sub: SubParsers) -> None:
    policy = add_command(
        sub, "policy",
        "Validate a policy file, compile it into a signed bundle, verify a bundle.",
        "ztnet policy check examples/policy.toml")
    group = add_group(policy, "policy_command")

    p = add_command(group, "apply", "Validate POLICY on the controller, store it as a new "
                    "version and push it to every connected host; prints which hosts "
                    "acknowledged or rejected it.", "ztnet policy apply examples/policy.toml "
                    "--controller ctl:7443 --credentials ~/.ztnet/admin", handle_apply)
    p.add_argument("policy", type=Path, metavar="POLICY", help="policy file (TOML)")
    operator_options(p)
    p.add_argument("--wait", type=duration, default=0, metavar="DURATION",
                   help="how long to wait for hosts (default: the controller's)")

    p = add_command(group, "show", "Print the controller's current policy (its version on "
                    "stderr).", "ztnet policy show --controller ctl:7443", handle_show)
    operator_options(p)

    p = add_command(group, "check",
                    "Validate POLICY (reporting every problem) and print a summary.",
                    "ztnet policy check examples/policy.toml", handle_check)
    p.add_argument("policy", metavar="POLICY", help="policy file (TOML)")

    p = add_command(group, "compile",
                    "Compile POLICY into a bundle of expiring grants for one host, signed "
                    "with KEY.",
                    "ztnet policy compile examples/policy.toml --key keys/signing.key "
                    "--host web-1 --ttl 5m --out web-1.bundle", handle_compile)
    p.add_argument("policy", metavar="POLICY", help="policy file (TOML)")
    p.add_argument("--key", required=True, help="signing key (signing.key)")
    p.add_argument("--host", required=True, help="host name the bundle is for")
    p.add_argument("--out", required=True, metavar="BUNDLE", help="bundle file to write")
    p.add_argument("--version", type=int,
                   help="policy version, must grow with every bundle (default: current Unix "
                   "time, s)")
    p.add_argument("--ttl", type=duration, default=300,
                   help="lifetime of rules without a ttl (default 5m)")
    p.add_argument("--bundle-ttl", type=duration,
                   help="how long the bundle itself is fresh (default: until its first grant "
                   "expires)")
    p.add_argument("--issuer", default=DEFAULT_ISSUER, help="issuer name recorded in the bundle")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="the host's labels (repeat): agents with a hosts selector are "
                   "issued only if it matches the host (default: no labels)")

    p = add_command(group, "delta",
                    "Compile POLICY into a signed delta against what a host holds (BASE and "
                    "the deltas already applied on it, in order): grants the host holds "
                    "stay as they are, new rules are added, removed rules revoked. Only "
                    "address grants change; anything else needs a whole bundle (compile).",
                    "ztnet policy delta examples/policy.toml --base web-1.bundle --key "
                    "keys/signing.key --out web-1.delta", handle_delta)
    p.add_argument("policy", metavar="POLICY", help="policy file (TOML)")
    p.add_argument("--base", required=True, metavar="BUNDLE",
                   help="the whole bundle the host holds")
    p.add_argument("--after", action="append", default=[], metavar="DELTA",
                   help="a delta already applied on BASE (repeat, oldest first)")
    p.add_argument("--key", required=True, help="signing key (signing.key); it also "
                   "verifies BASE and the deltas")
    p.add_argument("--out", required=True, metavar="DELTA", help="delta file to write")
    p.add_argument("--version", type=int,
                   help="version the delta leads to (default: current Unix time, s)")
    p.add_argument("--ttl", type=duration, default=300,
                   help="lifetime of new rules without a ttl (default 5m)")
    p.add_argument("--issuer", default=DEFAULT_ISSUER, help="issuer name recorded in the delta")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="the host's labels (repeat), as for compile")

    p = add_command(group, "verify", "Verify BUNDLE against trusted public keys and show its "
                    "grants; exits nonzero with the reason if it would be refused.",
                    "ztnet policy verify web-1.bundle --trust keys/signing.pub --host web-1",
                    handle_verify)
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file")
    p.add_argument("--trust", action="append", required=True, metavar="PUBKEY",
                   help="trusted public key (signing.pub); repeat to trust several")
    p.add_argument("--host", help="check the bundle is for this host (default: not checked)")
    p.add_argument("--min-version", type=int, default=1,
                   help="refuse bundles older than this version")

    policy_review.register(group)


# --- handlers: the parsed command line -> the functions below ------------------------


def handle_apply(args: argparse.Namespace) -> int:
    return operator.with_admin(args.controller, args.credentials,
                               lambda client: operator.policy_apply(client, args.policy,
                                                                    wait=float(args.wait)))


def handle_show(args: argparse.Namespace) -> int:
    return operator.with_admin(args.controller, args.credentials, operator.policy_show)


def handle_check(args: argparse.Namespace) -> int:
    return policy_check(args.policy)


def _labels(args: argparse.Namespace) -> dict[str, str]:
    from ztnet.policy.selectors import parse_labels

    try:
        return parse_labels(args.label)
    except ValueError as exc:
        raise UsageError(f"--label: {exc}") from None


def handle_compile(args: argparse.Namespace) -> int:
    labels = _labels(args)
    return policy_compile(args.policy, key_path=args.key, host=args.host, out_path=args.out,
                          version=args.version, default_ttl=args.ttl,
                          bundle_ttl=args.bundle_ttl, issuer=args.issuer, labels=labels)


def handle_delta(args: argparse.Namespace) -> int:
    labels = _labels(args)
    return policy_delta(args.policy, base_path=args.base, after=args.after, key_path=args.key,
                        out_path=args.out, version=args.version, default_ttl=args.ttl,
                        issuer=args.issuer, labels=labels)


def handle_verify(args: argparse.Namespace) -> int:
    return policy_verify(args.bundle, trust=args.trust, host=args.host,
                         min_version=args.min_version)


# --- what the commands do ------------------------------------------------------------


def policy_check(
    policy_path: PathLike, *, default_ttl: float = 300.0, out: TextIO | None = None
) -> int:
    """`ztnet policy check POLICY`: validate and summarize."""
    from ztnet.policy.document import load_policy
    from ztnet.policy.summary import summarize

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
    labels: dict[str, str] | None = None,
) -> int:
    """`ztnet policy compile`: policy → signed bundle for one host (with ``labels``,
    default none: agents whose host selector does not match it are left out). Without
    ``version`` the current Unix time in seconds is used, which grows between
    runs; a controller passes its own counter."""
    from ztnet.grants.bundle import sign_bundle, verify_bundle
    from ztnet.grants.keys import load_private_key
    from ztnet.policy.document import load_policy
    from ztnet.policy.issue import issue_bundle

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
        labels=labels or {},
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
    _write_bundle(Path(out_path), envelope)
    count = len(verified.grants)
    _print(
        out,
        f"wrote {os.fspath(out_path)}: version {bundle.version} for host {bundle.audience}, "
        f"{count} grant{'s' if count != 1 else ''}, expires {format_time(bundle.expires)}, "
        f"signed by key {verified.key_id}",
    )
    return 0


def policy_delta(
    policy_path: PathLike,
    *,
    base_path: PathLike,
    after: Sequence[PathLike] = (),
    key_path: PathLike,
    out_path: PathLike,
    version: int | None = None,
    default_ttl: float = 300.0,
    issuer: str = DEFAULT_ISSUER,
    now: float | None = None,
    out: TextIO | None = None,
    labels: dict[str, str] | None = None,
) -> int:
    """`ztnet policy delta`: the policy's address grants as a signed delta against the
    state BASE and ``after`` lead to (each verified with the key's public half, as the host
    will; a delta of the chain that does not verify is an error naming it)."""
    from ztnet.errors import GrantError
    from ztnet.grants.bundle import verify_bundle
    from ztnet.grants.delta import (
        DELTA_PAYLOAD_TYPE,
        HeldGrants,
        diff_bundles,
        sign_delta,
        verify_delta,
    )
    from ztnet.grants.envelope import verify_envelope
    from ztnet.grants.keys import load_private_key
    from ztnet.policy.document import load_policy
    from ztnet.policy.issue import issue_bundle

    now = time.time() if now is None else now
    private_key = load_private_key(key_path)
    trusted = [private_key.public_key()]
    state = verify_bundle(_read_bundle(base_path), trusted=trusted, host=None, min_version=1,
                          now=now)
    held = HeldGrants(state)
    for path in after:
        try:
            signed = verify_envelope(_read_bundle(path), trusted=trusted,
                                     payload_type=DELTA_PAYLOAD_TYPE)
            applied = verify_delta(signed, base=state, held=held, now=now, restoring=True)
        except GrantError as exc:
            raise GrantError(f"{os.fspath(path)}: {exc}") from None
        state = applied.apply_to(state)
        held.apply(applied.delta)
    target = issue_bundle(load_policy(policy_path), host=state.bundle.audience,
                          version=int(now) if version is None else version, now=now,
                          issuer=issuer, default_ttl=default_ttl, labels=labels or {})
    try:
        delta = diff_bundles(state, target)
    except ValueError as exc:
        raise ConfigError(f"delta: {exc}; write a whole bundle with `ztnet policy compile`") \
            from None
    envelope = sign_delta(delta, private_key)
    # Never write a delta this very code would refuse.
    verify_delta(verify_envelope(envelope, trusted=trusted, payload_type=DELTA_PAYLOAD_TYPE),
                 base=state, held=held, now=now)
    _write_bundle(Path(out_path), envelope)
    _print(out, f"wrote {os.fspath(out_path)}: version {delta.base_version} → {delta.version} "
                f"for host {delta.audience}, {len(delta.add)} added, {len(delta.revoke)} "
                f"revoked, {len(held.by_id) - len(delta.revoke) + len(delta.add)} grants after "
                f"it, the bundle still expires {format_time(state.bundle.expires)}")
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
    from ztnet.grants.bundle import verify_bundle
    from ztnet.grants.keys import load_public_key

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
        ["expires", f"{format_time(bundle.expires)} (in {format_remaining(bundle.expires - now)})"],
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
            f"{format_time(record.grant.not_after)} "
            f"(in {format_remaining(record.grant.not_after - now)})",
        ]
        for record in bundle.grants
    ]
    if rows:
        headers = ["GRANT", "SERIAL", "AGENT", "PROTO", "TO", "PORTS", "NOT BEFORE", "NOT AFTER"]
        lines.append(format_table(headers, rows))
    else:
        lines.append("no grants: every agent on this host is denied all network access")
    return "\n".join(lines)


def _read_bundle(path: PathLike) -> bytes:
    from ztnet.grants.limits import MAX_ENVELOPE_BYTES

    try:
        with open(path, "rb") as handle:
            # One byte over the limit is enough for the envelope check to refuse it.
            return handle.read(MAX_ENVELOPE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"bundle: cannot read {os.fspath(path)}: {exc.strerror or exc}") from None


def _write_bundle(path: Path, data: bytes) -> None:
    """Readers (a daemon polling the file) see the old bundle or the new one,
    never half of one. Bundles are signed, not secret: 0644."""
    try:
        replace_atomic(path, data, 0o644)
    except OSError as exc:
        raise ConfigError(f"bundle: cannot write {path}: {exc.strerror or exc}") from None


def _print(out: TextIO | None, text: str) -> None:
    print(text, file=out if out is not None else sys.stdout)
