"""Per-host limits on the node API, as configured: rates and the stream cap
(``controller serve --host-…`` flags, docs/controller.md "Per-host limits").
``ztnet.controller.limiter`` enforces them. No gRPC here: the CLI reads these
at parse time."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE_RE = re.compile(r"(\d+)/(\d*)([smh])\Z")


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` per ``period`` seconds, refilled evenly; bursts of up to
    ``count``. ``count`` 0: no limit."""

    count: int
    period: float = 1.0

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        if self.count == 0:
            return "off"
        for unit, seconds in reversed(_UNITS.items()):
            if self.period == seconds:
                return f"{self.count}/{unit}"
        return f"{self.count}/{self.period:g}s"


def parse_rate(text: str) -> Rate:
    """``N/s``, ``N/m``, ``N/h`` or ``N/10s`` (N per that many seconds); ``0`` or ``off``:
    no limit. ValueError says what is wrong."""
    if text in ("0", "off"):
        return Rate(0)
    match = _RATE_RE.match(text)
    if match is None or int(match[1]) == 0 or match[2] == "0":
        raise ValueError(f"{text!r} is not a rate (want N/s, N/m, N/h or N/10s; 0 or off: "
                         "no limit)")
    return Rate(int(match[1]), int(match[2] or 1) * _UNITS[match[3]])


@dataclass(frozen=True, slots=True)
class HostLimits:
    """Defaults: far above what a daemon does (it subscribes once per
    connection with backoff, renews its certificate at half its lifetime and
    uploads in batches of 500), far below what hurts the controller."""

    subscribe: Rate = Rate(30, 60.0)
    renew: Rate = Rate(10, 3600.0)
    flow_records: Rate = Rate(10_000, 1.0)
    max_streams: int = 4  # per RPC: StreamGrants and ReportFlows each; 0: no limit
    # RequestGrant calls: each auto-approved one is an epoch pushed to every host
    grant_requests: Rate = Rate(30, 3600.0)




DEFAULT_LIMITS = HostLimits()
