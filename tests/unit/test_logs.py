"""The text log: what hosts and agents say cannot forge a line or a field."""

from __future__ import annotations

import logging

import pytest

from ztnet import logs


def test_the_text_log_cannot_be_forged(capsys: pytest.CaptureFixture[str]) -> None:
    saved = logs.LOGGER.handlers[:], logs.LOGGER.level, logs.LOGGER.propagate
    logs.setup("text")
    try:
        logs.event("host nack", logging.WARNING, host="h1",
                   reason="x\n2026-01-01T00:00:00 info    host enrolled host=ghost\x1b[8m",
                   note="a=b c", empty="")
    finally:
        logs.LOGGER.handlers[:], logs.LOGGER.level, logs.LOGGER.propagate = saved
    (line,) = capsys.readouterr().err.splitlines()
    assert "\x1b" not in line
    # a value with a space, quote, backslash or "=" is a JSON string
    assert line.endswith('host nack host=h1 reason="x\\\\n2026-01-01T00:00:00 info    host '
                         'enrolled host=ghost\\\\x1b[8m" note="a=b c" empty=""')
    assert logs._value('x\\" y=z') == '"x\\\\\\" y=z"'  # cannot end the quote early
