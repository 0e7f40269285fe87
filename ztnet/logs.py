"""Structured log lines: ``event key=value …`` for people, one JSON object
per line with ``--log-format json`` for machines.

Field values are often what a host or an agent said (a NACK reason, a comm):
in the text format every value and the event name pass through
``ztnet.text.escape`` (no newline can forge a line, no escape sequence reaches
the terminal), and a value with spaces, quotes, backslashes or ``=`` is
written as a JSON string, so no value can forge another ``key=value`` field
either. The JSON format escapes by itself."""

from __future__ import annotations

import json
import logging
import sys
import time

from ztnet.text import escape

LOGGER = logging.getLogger("ztnet")


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{escape(str(key))}={_value(value)}" for key, value in fields.items())
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        message = escape(record.getMessage())
        return f"{stamp} {record.levelname.lower():<7} {message} {extra}".rstrip()


def _value(value: object) -> str:
    text = escape(str(value))
    if text and not any(char in text for char in ' "=\\'):
        return text
    # a JSON string: quotes and backslashes escaped, so the value ends where it says
    return json.dumps(text, ensure_ascii=False)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                "event": record.getMessage(), **getattr(record, "fields", {})}
        return json.dumps(line, default=str)


def setup(log_format: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else _TextFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level)
    LOGGER.propagate = False


def event(name: str, level: int = logging.INFO, **fields: object) -> None:
    LOGGER.log(level, name, extra={"fields": fields})
