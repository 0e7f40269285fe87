"""ztnet.text: the one table renderer, and the escaping that keeps what hosts and agents
say from driving the operator's terminal."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztnet.text import escape, format_table, format_time, use_color


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain host-1", "plain host-1"),
    ("caf\u00e9 \u65e5\u672c", "caf\u00e9 \u65e5\u672c"),  # printable non-ASCII stays
    ("\x1b[31mred", "\\x1b[31mred"),
    ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),
    ("a\nb\tc\rd", "a\\nb\\tc\\rd"),
    ("\x00\x7f", "\\x00\\x7f"),
    ("\x9b2J", "\\x9b2J"),  # C1 CSI: a terminal honours it like ESC [
    ("right\u202eto-left", "right\\u202eto-left"),  # bidi override
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("\U000e0041tag", "\\U000e0041tag"),
    ("lone \ud800", "lone \\ud800"),
])
def test_escape(raw: str, shown: str) -> None:
    assert escape(raw) == shown
    assert escape(shown) == shown  # escaped text is printable: escaping again is a no-op


def test_table_aligns_columns_without_trailing_spaces() -> None:
    table = format_table(["HOST", "STATE"], [("host-a", "up"), ("b", "")])
    assert table.splitlines() == ["HOST    STATE", "host-a  up", "b"]


def test_table_right_aligns_the_columns_asked_for() -> None:
    table = format_table(["AGENT", "N"], [("bot", "7"), ("other", "123")], right={1})
    assert table.splitlines() == ["AGENT    N", "bot      7", "other  123"]


def test_table_of_no_rows_is_its_header() -> None:
    assert format_table(["A", "B"], []) == "A  B"


def test_table_escapes_every_cell_and_measures_the_escaped_text() -> None:
    table = format_table(["HOST", "REASON"], [("evil\x1b[2J", "bad\nline"), ("ok", "-")])
    assert "\x1b" not in table and table.count("\n") == 2
    assert table.splitlines() == ["HOST         REASON", "evil\\x1b[2J  bad\\nline",
                                  "ok           -"]


def test_table_rows_must_match_the_header() -> None:
    with pytest.raises(ValueError):
        format_table(["A", "B"], [("only one",)])


def test_format_time() -> None:
    assert format_time(0) == "1970-01-01T00:00:00.000Z"
    assert format_time(1_800_000_000.1234) == "2027-01-15T08:00:00.123Z"
    assert format_time(float("inf")) == "inf (unix)"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(_Terminal()) and not use_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(_Terminal())


@given(st.text())
def test_escaped_text_is_printable(text: str) -> None:
    shown = escape(text)
    assert shown.isprintable() and escape(shown) == shown
