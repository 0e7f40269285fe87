"""ztnet.durations: the one parser of durations and sizes people write."""

from __future__ import annotations

import pytest

from ztnet.durations import (
    MAX_DURATION,
    format_duration,
    format_remaining,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), ("365d", 365 * 86400)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    "text", ["5", "m", "0s", "5 m", "1h30m", "-5m", "5M", "366d", "1.5h", "5m\n"]
)
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_the_longest_duration_is_a_year() -> None:
    assert parse_duration("365d") == MAX_DURATION
    with pytest.raises(ValueError, match="longer than the maximum of 365d"):
        parse_duration(f"{MAX_DURATION + 1}s")


def test_format_duration_falls_back_to_seconds() -> None:
    assert format_duration(90) == "90s" and format_duration(1.5) == "1.5s"


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (-5, "0s"), (59.9, "59s"), (299, "4m59s"), (3600, "1h"), (93784, "1d2h3m4s"),
])
def test_format_remaining(seconds: float, text: str) -> None:
    assert format_remaining(seconds) == text


def test_sizes() -> None:
    assert parse_size("65536") == 65536
    assert parse_size("512K") == 512 << 10 and parse_size("64M") == 64 << 20
    assert parse_size("1g") == 1 << 30 and parse_size("2MiB") == 2 << 20
    for bad in ("", "M", "1T", "-1M", "1.5M"):
        with pytest.raises(ValueError):
            parse_size(bad)
