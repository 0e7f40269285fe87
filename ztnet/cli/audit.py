"""`ztnet audit verify`: check the tamper-evident audit trail (docs/flows.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from ztnet.cli.args import SubParsers, add_command, add_group


def register(sub: SubParsers) -> None:
    p = add_command(sub, "audit", "Work with the tamper-evident audit trail.",
                    "ztnet audit verify /var/lib/ztnet/audit.jsonl")
    group = add_group(p, "audit_command")
    v = add_command(group, "verify", "Check FILE's hash chain and its head: prints OK and the "
                    "record count, or the first problem (edit, deletion, reordering, "
                    "truncation) with its line number and exits 1.",
                    "ztnet audit verify /var/lib/ztnet/audit.jsonl", handle_verify)
    v.add_argument("file", type=Path, metavar="FILE", help="audit log (audit.jsonl)")
    v.add_argument("--head", metavar="SEQ:HASH", help="check against this head recorded "
                   "elsewhere instead of FILE.head")


def handle_verify(args: argparse.Namespace) -> int:
    return audit_verify(args.file, sys.stdout, head=args.head)


def audit_verify(path: Path, out: TextIO, *, head: str | None = None) -> int:
    """Exit 0 when the chain (and its head) is intact, 1 at the first problem."""
    from ztnet.observe.audit import Head, verify

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
