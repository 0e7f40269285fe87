"""What every command module shares: how a command is declared, the option types
(durations, sizes), the options several commands take (instance, state directories,
the controller's address and credentials), and the usage error a handler raises.

A command is ``add_command(sub, name, help, example, handler)``; the handler is a
module-level function that takes the parsed Namespace, converts its values and calls a
plain function. A value that can only be checked after parsing (it depends on another
option, or argparse cannot say it) makes the handler raise :class:`UsageError`; ``main``
reports it in argparse's own form (usage line, ``ztnet CMD: error: …``, exit 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias, TypeVar

from ztnet.durations import parse_duration, parse_size
from ztnet.instance import Instance

Handler: TypeAlias = Callable[[argparse.Namespace], int]
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
T = TypeVar("T")

HANDLER = "handler"  # Namespace attributes set by add_command, read by main
COMMAND_PARSER = "command_parser"


class UsageError(Exception):
    """A bad command line found by a handler (the message names the option)."""


def add_command(sub: SubParsers, name: str, help_text: str, example: str,
                handler: Handler | None = None) -> argparse.ArgumentParser:
    """A sub-command whose help shows ``help_text`` and one example; ``handler`` runs it
    (a group of sub-commands has none)."""
    parser = sub.add_parser(name, help=help_text, description=help_text,
                            epilog=f"example:\n  {example}",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    if handler is not None:
        parser.set_defaults(**{HANDLER: handler, COMMAND_PARSER: parser})
    return parser


def add_group(parser: argparse.ArgumentParser, dest: str,
              metavar: str = "COMMAND") -> SubParsers:
    """The sub-commands of a group such as ``ztnet controller``; one is required."""
    return parser.add_subparsers(dest=dest, metavar=metavar, required=True)


# --- value types --------------------------------------------------------------------


def checked(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type`` from a parser that raises ValueError: argparse shows the
    parser's own message (``argument --ttl: bad duration '5 minutes': …``)."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


duration = checked(parse_duration)  # "30s", "5m", "2h", "1d" -> seconds
size = checked(parse_size)  # "65536", "512K", "64M", "1G" -> bytes


def duration_or_off(text: str) -> int:
    """A duration, or 0/off for no limit (0)."""
    return 0 if text in ("0", "off") else duration(text)


# --- options several commands take ---------------------------------------------------


def instance_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instance", default=None,
                        help="instance name, for several daemons on one kernel (default: default)")


def controller_state_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", required=True, type=Path, metavar="DIR",
                        help="the controller's state directory")


def operator_options(parser: argparse.ArgumentParser) -> None:
    """Where the admin API is and who calls it (docs/controller.md, operator commands)."""
    parser.add_argument("--controller", metavar="ADDR", default=None,
                        help="the controller's mutual-TLS HOST:PORT (default: "
                        "$ZTNET_CONTROLLER)")
    parser.add_argument("--credentials", metavar="DIR", default=None,
                        help="admin credential directory from `controller admin-cert` "
                        "(default: $ZTNET_CREDENTIALS)")


def daemon_state(state: Path | None, instance: str | None) -> Path:
    """The daemon's state directory: ``--state``, else the instance's default
    (``/var/lib/ztnet[-INSTANCE]``)."""
    return state if state is not None else Instance.resolve(instance).state_dir
