"""The ``ztnet`` command: parsing only. Every command delegates to a plain function,
and every ZtnetError becomes a one-line message and an exit code.

One module per command (or group of commands), each with ``register(subparsers)``;
:mod:`ztnet.cli.args` holds what they share. The modules import the layers below inside
the functions that use them, so ``ztnet --help`` stays quick and a command loads only what
it runs (``ztnet daemon`` never imports the lab's scapy, nothing here imports bcc until a
datapath command runs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ztnet.cli import (
    audit,
    controller,
    daemon,
    debug,
    demo,
    enroll,
    jit,
    keys,
    lab,
    observe,
    operator,
    policy,
    response,
    run,
)
from ztnet.cli.args import COMMAND_PARSER, HANDLER, Handler, UsageError
from ztnet.errors import ZtnetError

# The order of `ztnet --help`.
COMMANDS = (daemon, controller, operator, jit, response, enroll, run, demo, debug, keys,
            policy, observe, audit, lab)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ztnet",
        description="Zero-trust egress for AI agents: network paths exist only while a "
        "signed, expiring grant allows them, enforced in the kernel with eBPF.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = getattr(args, HANDLER)
    try:
        return handler(args)
    except UsageError as exc:
        command_parser: argparse.ArgumentParser = getattr(args, COMMAND_PARSER)
        command_parser.error(str(exc))  # exits 2, like argparse's own errors
    except ZtnetError as exc:
        from ztnet.text import escape

        # messages may quote what a host or the controller sent: escaped, line by line
        message = "\n".join(escape(line) for line in str(exc).split("\n"))
        print(f"ztnet: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


__all__ = ["build_parser", "main"]
