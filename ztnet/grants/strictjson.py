"""Strict JSON for signed documents: UTF-8 only, no duplicate keys, no NaN or
Infinity, bounded nesting. Two readings of one document (last duplicate key
wins here, first wins elsewhere) are how signature checks get bypassed."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any


class StrictJSONError(ValueError):
    """The bytes are not strict JSON; the message says why."""


def loads(data: bytes) -> Any:
    try:
        # str(data, "utf-8") and parse: the decoded text is dropped as soon as
        # the parser is done with it
        return json.loads(str(data, "utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise StrictJSONError(f"not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise StrictJSONError("JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, our hooks, over-long integers
        raise StrictJSONError(f"not valid JSON: {exc}") from None


def dumps(document: Any) -> bytes:
    """The canonical form: sorted keys, no whitespace, ASCII only."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def key_diff(expected: frozenset[str], actual: Iterable[str]) -> str:
    """``missing keys [...] and unknown keys [...]``, whichever apply."""
    present = set(actual)
    missing, extra = sorted(expected - present), sorted(present - expected)
    parts = [f"missing keys {missing}"] if missing else []
    parts += [f"unknown keys {extra}"] if extra else []
    return " and ".join(parts)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in object")
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
