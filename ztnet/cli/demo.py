"""`ztnet demo`: the product's story on the lab, checked step by step (docs/lab.md)."""

from __future__ import annotations

import argparse

from ztnet.cli.args import SubParsers, add_command


def register(sub: SubParsers) -> None:
    p = add_command(sub, "demo", "The whole story in one command (root): brings the lab up "
                    "(controller, enrolled daemons, services; `ztnet lab`), applies the lab "
                    "policy, runs a scripted agent with live flow traces, revokes its grant, "
                    "prints a summary and tears the lab down; exits non-zero if any step "
                    "misbehaves.", "sudo ztnet demo", handle_demo)
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    p.add_argument("--name", default="ztlab",
                   help="lab name (several labs can coexist; default ztlab)")


def handle_demo(args: argparse.Namespace) -> int:
    from ztnet.lab.demo import run_demo  # the lab (scapy, pyroute2) loads only here

    return run_demo(args.name, keep=args.keep)
