"""`ztnet enroll`: the node side of enrollment (docs/controller.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ztnet.cli.args import SubParsers, add_command

if TYPE_CHECKING:
    from ztnet.daemon.enroll import TpmOptions


def register(sub: SubParsers) -> None:
    p = add_command(sub, "enroll", "Enroll this host with a controller: generate the host key "
                    "here, pin the controller's CA by its fingerprint, exchange the one-time "
                    "token and a CSR for a host certificate and the grant-signing key.",
                    "ztnet enroll --controller ctl.example:7444 --token=TOKEN "
                    "--ca-fingerprint 3f5a… --state /var/lib/ztnet", handle_enroll)
    p.add_argument("--controller", required=True, metavar="ADDR",
                   help="the controller's enrollment HOST:PORT (`serve --enroll-listen`)")
    p.add_argument("--token", required=True, help="one-time token (`controller token "
                   "create`); write --token=TOKEN if it starts with '-'")
    p.add_argument("--ca-fingerprint", required=True, metavar="SHA256",
                   help="hex SHA-256 of the controller's CA certificate (DER), printed with "
                   "the token; nothing is sent to a controller that does not match it")
    p.add_argument("--state", required=True, type=Path, metavar="DIR",
                   help="state directory for the credentials (created 0700)")
    p.add_argument("--host", default=None, help="this host's name (default: hostname)")
    p.add_argument("--tpm", action="store_true",
                   help="bind this host's identity to its TPM 2.0 (docs/controller.md)")
    p.add_argument("--tpm-device", metavar="PATH", default=None,
                   help="with --tpm: the TPM device (default /dev/tpmrm0)")
    p.add_argument("--tpm-swtpm", metavar="HOST:PORT", default=None,
                   help="with --tpm: a software TPM's server socket (tests, labs)")


def handle_enroll(args: argparse.Namespace) -> int:
    from ztnet.daemon.enroll import TpmOptions

    return enroll(args.controller, args.token, args.ca_fingerprint, args.state, host=args.host,
                  tpm=TpmOptions.from_flags(args.tpm, args.tpm_device, args.tpm_swtpm))


def enroll(controller: str, token: str, ca_fingerprint: str, state: Path, *,
           host: str | None = None, out: TextIO | None = None,
           tpm: TpmOptions | None = None) -> int:
    from ztnet.daemon.enroll import enroll as run_enroll

    identity = run_enroll(controller, token, ca_fingerprint, state, host=host, tpm=tpm)
    out = out if out is not None else sys.stdout
    print(f"enrolled {identity.host} as {identity.spiffe_id}; credentials in {state}", file=out)
    print("next: ztnet daemon --controller HOST:PORT --state "
          f"{state}  (the controller's mutual-TLS --listen port, not the enrollment port)",
          file=out)
    return 0
