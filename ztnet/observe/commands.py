"""What `ztnet observe` and `ztnet audit verify` do (cli.py only parses)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ztnet.errors import ConfigError
from ztnet.observe.audit import Head, verify
from ztnet.observe.query import FlowFilter, FlowReader
from ztnet.observe.render import Renderer

FLOWS_FILE = "flows.jsonl"
AUDIT_FILE = "audit.jsonl"
DEFAULT_LAST = 20  # like hubble observe, when no --since is given


def default_state_dir(instance: str | None) -> Path:
    """``/var/lib/ztnet[-INSTANCE]``: the daemon's --state default."""
    suffix = f"-{instance}" if instance and instance != "default" else ""
    return Path(f"/var/lib/ztnet{suffix}")


def flows_path(*, file: Path | None, state: Path | None, instance: str | None) -> Path:
    if file is not None:
        return file
    return (state or default_state_dir(instance)) / FLOWS_FILE


def use_color(out: TextIO) -> bool:
    return out.isatty() and "NO_COLOR" not in os.environ


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


def audit_verify(path: Path, out: TextIO, *, head: str | None = None) -> int:
    report = verify(path, head=Head.parse(head) if head else None)
    for note in report.notes:
        out.write(f"note: {note}\n")
    if report.ok:
        out.write(f"OK: {report.records} records, chain intact, last seq {report.last.seq} "
                  f"hash {report.last.hash[:16]}…\n")
        return 0
    where = f"line {report.line}" if report.line else str(path)
    out.write(f"FAIL: {path}: {where}: {report.kind}: {report.problem} "
              f"({report.records} records verified before it)\n")
    return 1
