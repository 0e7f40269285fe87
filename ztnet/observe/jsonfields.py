"""JSON building blocks of the flow and audit records: RFC 3339 times with
nanoseconds, and typed access to decoded objects."""

from __future__ import annotations

import calendar
import functools
import re
import time
from typing import Any

_NS = 1_000_000_000

_TIME_RE = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?"
                      r"(Z|[+-]\d\d:\d\d)\Z")


def format_rfc3339(time_ns: int) -> str:
    """RFC 3339 in UTC with nanoseconds: ``2027-01-15T08:00:00.123456789Z``."""
    seconds, fraction = divmod(time_ns, _NS)
    return f"{_utc_second(seconds)}.{fraction:09d}Z"


@functools.lru_cache(maxsize=64)
def _utc_second(seconds: int) -> str:
    # records come in bursts within the same second: format each second once
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def parse_time(text: str) -> int:
    """RFC 3339 (any offset, up to ns) -> Unix ns, exactly."""
    # The form format_rfc3339 writes (every record a daemon sends): its second parsed once
    # per second of records (the controller's ingest reads two times per record)
    if len(text) == 30 and text[19] == "." and text[29] == "Z":
        fraction = text[20:29]
        if fraction.isascii() and fraction.isdigit():
            try:
                return _utc_seconds(text[:19]) * _NS + int(fraction)
            except ValueError:
                pass  # said by the full parse, naming the whole text
    return _parse_time(text)


@functools.lru_cache(maxsize=64)
def _utc_seconds(second: str) -> int:
    return _parse_time(second + "Z") // _NS


def _parse_time(text: str) -> int:
    match = _TIME_RE.match(text)
    if match is None:
        raise ValueError(f"bad time {text!r}: expected RFC 3339, like 2027-01-15T08:00:00Z")
    fields = [int(match[i]) for i in range(1, 7)]
    if not (1 <= fields[1] <= 12 and 1 <= fields[2] <= 31 and fields[3] < 24
            and fields[4] < 60 and fields[5] < 61):
        raise ValueError(f"bad time {text!r}: a field is out of range")
    seconds = calendar.timegm((*fields, 0, 0, 0))
    offset = match[8]
    if offset != "Z":
        sign = 1 if offset[0] == "+" else -1
        seconds -= sign * (int(offset[1:3]) * 3600 + int(offset[4:6]) * 60)
    return seconds * _NS + int((match[7] or "").ljust(9, "0"))


class JsonObject:
    """Typed access to a decoded JSON object, naming the path on errors."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise TypeError(f"{where} is not an object")
        self.data, self.where = data, where

    def integer(self, key: str) -> int:
        value = self.data[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TypeError(f"{self.where}.{key} is not a non-negative integer")
        return value

    def string(self, key: str) -> str:
        value = self.data[key]
        if not isinstance(value, str):
            raise TypeError(f"{self.where}.{key} is not a string")
        return value

    def obj(self, key: str) -> JsonObject:
        return JsonObject(self.data[key], f"{self.where}.{key}")

    def optional(self, key: str) -> JsonObject | None:
        return None if self.data[key] is None else self.obj(key)
