"""Text for people and terminals: tables, times, escaping, colour.

Every cell that reaches a terminal may hold what a host, an agent or a peer said (a process
name, a rejection reason, a host name), so :func:`format_table` escapes control and other
non-printable characters: an agent naming its process ``"\\x1b]0;owned\\a"`` shows up as
that text, and cannot retitle, recolour or rewrite the operator's terminal.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from typing import TextIO

_SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def escape(text: str) -> str:
    """``text`` with every non-printable character (C0/C1 controls, DEL, format and
    separator characters other than the space, lone surrogates) written as a Python-style
    escape: ``"\\x1b"`` becomes the four characters ``\\x1b``, a newline ``\\n``."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def _escape_char(ch: str) -> str:
    short = _SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]], *,
                 right: Collection[int] = ()) -> str:
    """Columns two spaces apart, left-aligned (right-aligned for the column indexes in
    ``right``), the header line first; no trailing spaces. Cells are escaped."""
    table = [[escape(cell) for cell in headers]]
    table += [[escape(cell) for cell in row] for row in rows]
    for row in table:
        if len(row) != len(headers):
            raise ValueError(f"text: a table row has {len(row)} cells, its header "
                             f"{len(headers)}")
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = []
    for row in table:
        cells = [cell.rjust(width) if i in right else cell.ljust(width)
                 for i, (cell, width) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_time(seconds: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2024-05-01T12:00:00.000Z."""
    try:
        moment = datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, ValueError, OSError):
        return f"{seconds!r} (unix)"
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def use_color(out: TextIO) -> bool:
    """Colour only for a terminal, and never when ``NO_COLOR`` is set (no-color.org)."""
    return out.isatty() and "NO_COLOR" not in os.environ
