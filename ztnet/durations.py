"""Durations and sizes as people write them: ``5m``, ``24h``, ``64M``.

One parser each, shared by policy files (a rule's ``ttl``), the CLI's options and anything
else that reads such a value. Each raises ValueError with the explanation a person needs;
the caller adds where the value came from.
"""

from __future__ import annotations

import re

# Grants end up as nanosecond deadlines in the kernel; a year is far beyond any
# sane grant and keeps every deadline comfortably inside 64 bits.
MAX_DURATION = 365 * 86400

_DURATION_RE = re.compile(r"([0-9]{1,9})([smhd])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_RE = re.compile(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_duration(text: str) -> int:
    """``"30s"``, ``"5m"``, ``"2h"`` or ``"1d"`` → seconds (1s .. 365d)."""
    match = _DURATION_RE.match(text)
    if match is None:
        raise ValueError(
            f"bad duration {text!r}: expected a whole number and a unit, "
            'like "30s", "5m", "2h" or "1d"'
        )
    seconds = int(match[1]) * _UNITS[match[2]]
    if seconds == 0:
        raise ValueError(f"duration {text!r} must be greater than zero")
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {text!r} is longer than the maximum of 365d")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact ``parse_duration`` spelling, else plain seconds."""
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{seconds:g}s"


def format_remaining(seconds: float) -> str:
    """Time left, to the second and never negative: ``4m59s``, ``1d2h``, ``0s``."""
    whole = max(0, int(seconds))
    parts = []
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    if whole or not parts:
        parts.append(f"{whole}s")
    return "".join(parts)


def parse_size(text: str) -> int:
    """``65536``, ``512K``, ``64M``, ``1G`` (binary units; a trailing ``B``/``iB`` is
    accepted) -> bytes."""
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"bad size {text!r}: expected a number of bytes with an optional "
                         "K, M or G suffix (like 64M)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
