"""Shared machinery of the fuzz tests: the example-count knob, the seed corpora, mutation
strategies, and the checks every input must pass (no crash, no hang, a clear error).

``HARDENING_EXAMPLES`` (default 150) is the example count of a weight-1 target; `make test`
uses the default, `make test-hardening` a count that makes the whole run generate more than
100,000 inputs (every input is counted in the hardening figures).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.hardening import figures

CORPUS = Path(__file__).resolve().parent / "corpus"
EXAMPLES = int(os.environ.get("HARDENING_EXAMPLES", "150"))
HANG_SECONDS = 5.0  # one input taking longer than this is a hang
T = TypeVar("T")


def fuzz_settings(weight: float = 1.0) -> settings:
    return settings(max_examples=max(10, int(EXAMPLES * weight)), deadline=None,
                    database=None, suppress_health_check=list(HealthCheck))


def corpus(target: str) -> list[tuple[str, bytes]]:
    """(file name, content) of the seed corpus of ``target``, in name order."""
    directory = CORPUS / target
    return [(path.name, path.read_bytes()) for path in sorted(directory.iterdir())
            if path.is_file()]


TOKENS = [b"{", b"}", b"[", b"]", b'"', b"\\", b",", b":", b"=", b"\n", b"\x00",
          b"\\u0000", b"\\ud800", b"1e999", b"-1", b"18446744073709551616", b"null",
          b"\xff", b"\xed\xa0\x80", b"\x1b[8m", b"[[", b"]]", b'"""', b"'''"]
LONE_SURROGATE = b"\\ud800"


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes], max_mutations: int = 4,
            tokens: list[bytes] = TOKENS) -> bytes:
    """A seed with a few byte-level mutations: flips, inserts (bytes and JSON/TOML
    punctuation), deletions, truncation, duplication of a span."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, max_mutations))):
        position = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "token", "delete", "truncate", "dup"]))
        if op == "flip" and data:
            position = min(position, len(data) - 1)
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif op == "token":
            data[position:position] = draw(st.sampled_from(tokens))
        elif op == "delete":
            del data[position:position + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[position:]
        elif op == "dup":
            span = data[position:position + draw(st.integers(1, 64))]
            data[position:position] = span * draw(st.integers(1, 4))
    return bytes(data)


def handled(call: Callable[[], T], *, rejections: tuple[type[BaseException], ...],
            prefix: str | tuple[str, ...]) -> T | BaseException:
    """Run one input: it returns, or raises one of ``rejections`` whose message starts
    with ``prefix`` (a clear error naming the subsystem); anything else — another
    exception, an empty message, more than HANG_SECONDS — fails the test. Returns the
    result or the rejection, and counts the input."""
    started = time.monotonic()
    try:
        result: T | BaseException = call()
    except rejections as exc:
        message = str(exc)
        assert message.startswith(prefix), f"unclear rejection: {message!r}"
        assert message.strip() != str(prefix).strip(), "rejection says nothing"
        result = exc
    elapsed = time.monotonic() - started
    assert elapsed < HANG_SECONDS, f"one input took {elapsed:.1f}s"
    figures.fuzzed()
    return result
