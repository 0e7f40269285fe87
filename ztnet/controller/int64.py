"""Grant ids are unsigned 64-bit; SQLite and PostgreSQL store signed 64-bit integers."""

from __future__ import annotations


def signed64(value: int) -> int:
    """A 64-bit unsigned grant id as the signed 64-bit integer both databases store."""
    return value - 2**64 if value >= 2**63 else value


def unsigned64(value: int) -> int:
    return value & (2**64 - 1)
