"""`ztnet observe`: the flows the local daemon recorded (like `hubble observe`)."""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ztnet.cli.args import SubParsers, UsageError, add_command, daemon_state, instance_option
from ztnet.errors import ConfigError
from ztnet.instance import FLOWS_FILE
from ztnet.text import use_color

if TYPE_CHECKING:
    from ztnet.observe.query import FlowFilter

DEFAULT_LAST = 20  # like hubble observe, when no --since is given


def register(sub: SubParsers) -> None:
    p = add_command(sub, "observe", "Show flows the local daemon recorded (like `hubble "
                    "observe`): the last 20, or all since --since; --follow streams new ones.",
                    "ztnet observe --agent research-bot --verdict denied --since 10m --follow",
                    handle_observe)
    instance_option(p)
    p.add_argument("--state", type=Path, default=None, metavar="DIR",
                   help="the daemon's state directory (default /var/lib/ztnet[-INSTANCE])")
    p.add_argument("--file", type=Path, default=None, metavar="PATH",
                   help="flow log to read (default: DIR/flows.jsonl)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new flows")
    p.add_argument("--agent", action="append", default=[], metavar="NAME",
                   help="only this agent (repeat for several)")
    p.add_argument("--verdict", metavar="allowed|denied|audit", help="only this verdict")
    p.add_argument("--kind", action="append", default=[], metavar="KIND",
                   help="only connect, sendmsg, flow_end or dns records (repeat for several)")
    p.add_argument("--since", metavar="WHEN",
                   help="only flows since then: a duration ago (30s, 10m, 2h) or RFC 3339")
    p.add_argument("--last", type=int, default=None, metavar="N",
                   help="history to show: the last N matching flows (default 20 without "
                   "--since, all with it; 0 = none)")
    p.add_argument("--json", action="store_true",
                   help="one JSON record per line, in the schema of docs/flows.md")


def handle_observe(args: argparse.Namespace) -> int:
    from ztnet.observe import query

    try:
        flt = query.FlowFilter(
            agents=frozenset(args.agent),
            verdict=query.parse_verdict(args.verdict) if args.verdict else None,
            since_ns=query.parse_since(args.since) if args.since else None,
            kinds=frozenset(query.parse_kind(kind) for kind in args.kind))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    last = args.last if args.last is not None else (None if args.since else DEFAULT_LAST)
    options = ObserveOptions(
        path=args.file if args.file is not None else
        daemon_state(args.state, args.instance) / FLOWS_FILE,
        filter=flt, follow=args.follow, json=args.json, last=last,
        color=use_color(sys.stdout))
    return observe(options, sys.stdout, sys.stderr)


@dataclass(frozen=True, slots=True)
class ObserveOptions:
    path: Path
    filter: FlowFilter
    follow: bool = False
    json: bool = False
    last: int | None = DEFAULT_LAST  # None: all history; 0 with follow: none
    color: bool = False
    poll_interval: float = 1.0


def observe(options: ObserveOptions, out: TextIO, err: TextIO,
            stop: threading.Event | None = None) -> int:
    """Print matching history, then (``follow``) new records until ``stop``."""
    from ztnet.observe.query import FlowReader
    from ztnet.observe.render import Renderer

    path = options.path
    if not path.exists() and not (options.follow and path.parent.is_dir()):
        raise ConfigError(f"observe: no flow log at {path} (is the daemon running with "
                          "this --state? or pass --file)")
    reader = FlowReader(path, options.filter, poll_interval=options.poll_interval)
    renderer = Renderer(out, json=options.json, color=options.color)
    try:
        if options.last != 0:
            for record in reader.history(last=options.last):
                renderer.write(record)
        renderer.flush()
        if options.follow:
            for record in reader.follow(stop or threading.Event()):
                renderer.write(record)
                renderer.flush()
    except BrokenPipeError:  # `ztnet observe | head`
        return 0
    finally:
        reader.close()
    if reader.malformed:
        err.write(f"observe: skipped {reader.malformed} malformed lines in {path}\n")
    if renderer.count == 0 and not options.follow and not options.json:
        err.write("observe: no matching flows\n")
    return 0
