"""Command-line parsing only: every command delegates to a function in a
module below, and every ZtnetError becomes a one-line message and an exit
code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ztnet.errors import ZtnetError

Handler = Callable[[argparse.Namespace], int]


def _command(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    help_text: str,
    example: str,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


# --- keys and policy (grants layer) -------------------------------------------------


def add_keys_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`ztnet keys …` (filled in with the signed-grants work)."""


def add_policy_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`ztnet policy …` (filled in with the signed-grants work)."""


# --- datapath and agents ----------------------------------------------------------


def add_datapath_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`ztnet run`, `agents`, `teardown`, `status`, `debug`."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ztnet",
        description="Zero-trust egress for AI agents: network paths exist only while a "
        "signed, expiring grant allows them, enforced in the kernel with eBPF.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_datapath_commands(sub)
    add_keys_commands(sub)
    add_policy_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ZtnetError as exc:
        print(f"ztnet: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
