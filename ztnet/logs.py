"""Structured log lines: ``event key=value …`` for people, one JSON object
per line with ``--log-format json`` for machines."""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER = logging.getLogger("ztnet")


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{key}={value}" for key, value in fields.items())
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return f"{stamp} {record.levelname.lower():<7} {record.getMessage()} {extra}".rstrip()


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
