"""Flow records for people: a table like ``hubble observe``, or JSON lines.

Columns have fixed widths so that a followed stream stays aligned without
knowing the rows to come (which is why this is not ztnet.text.format_table);
cells are escaped like that table's. Verdicts are coloured only when asked
(the CLI asks when stdout is a terminal and ``NO_COLOR`` is unset).
"""

from __future__ import annotations

import time
from typing import TextIO

from ztnet.observe.records import EventType, FlowRecord, Verdict, to_json
from ztnet.text import escape

_GREEN, _RED, _YELLOW, _RESET = "\x1b[32m", "\x1b[31m", "\x1b[33m", "\x1b[0m"
_PROTOS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6"}
_KINDS = {EventType.CONNECT: "connect", EventType.SENDMSG: "sendmsg",
          EventType.FLOW_END: "end", EventType.DNS: "dns"}
# (title, width); only AGENT is ever cut (names may be 63 characters): other long
# cells push the row out rather than lose an address or a grant id
COLUMNS = (("TIME", 19), ("AGENT", 14), ("PROCESS", 20), ("TYPE", 7), ("VERDICT", 7),
           ("PROTO", 6), ("SOURCE -> DESTINATION", 44), ("GRANT / REASON", 22), ("BYTES", 0))
_CUT = frozenset({"AGENT"})


def _fit(text: str, title: str, width: int) -> str:
    if title in _CUT and len(text) > width:
        return text[: width - 1] + "…"
    return text.ljust(width)


def _destination(record: FlowRecord) -> str:
    """``api.github.com (140.82.112.5):443`` when ztnet's resolver named the address; a DNS
    query's name, type and answers: ``api.github.com A = 140.82.112.5``."""
    if record.dns is not None:
        answers = f" = {','.join(record.dns.answers)}" if record.dns.answers else ""
        return f"{record.dns.name} {record.dns.type}{answers}"
    where = _host_port(record.destination, record.destination_port, record.ip_version)
    if not record.destination_names:
        return where
    host = f"[{record.destination}]" if record.ip_version == 6 else record.destination
    named = f"{record.destination_names[0]} ({host})"
    return f"{named}:{record.destination_port}" if record.destination_port else named


def _host_port(address: str, port: int, ip_version: int) -> str:
    if not address:
        return "-"
    host = f"[{address}]" if ip_version == 6 and port else address
    return f"{host}:{port}" if port else host


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{count}B"  # not reached


def format_clock(time_ns: int) -> str:
    """Local time with milliseconds: ``Jan 15 08:00:00.123``."""
    seconds, fraction = divmod(time_ns, 1_000_000_000)
    return time.strftime("%b %d %H:%M:%S", time.localtime(seconds)) + \
        f".{fraction // 1_000_000:03d}"


def cells(record: FlowRecord) -> list[str]:
    process = record.process
    if record.grant is not None:
        why = record.grant.name
        if record.drop_reason == "BUDGET":  # a byte budget of that grant cut the flow
            why += " BUDGET"
    else:
        why = record.drop_reason
    if record.dns is not None and record.dns.rcode != "NOERROR":
        why = record.dns.rcode  # REFUSED, SERVFAIL, NXDOMAIN ...
    if record.suppressed:
        why += f" (+{record.suppressed} suppressed)"
    size = ""
    if record.flow is not None:
        size = f"out {human_bytes(record.flow.bytes_out)} in {human_bytes(record.flow.bytes_in)}"
    flow = (f"{_host_port(record.source, record.source_port, record.ip_version)} -> "
            f"{_destination(record)}")
    # Every cell may hold what an agent chose (its process name, above all): escaped.
    return [escape(cell) for cell in (
        format_clock(record.time_ns),
        record.agent.name or "-",
        f"{process.pid}/{process.comm}" if process.pid else "-",
        _KINDS[record.event_type],
        record.verdict.value,
        _PROTOS.get(record.proto, str(record.proto)),
        flow,
        why,
        size,
    )]


def _colour(verdict: Verdict, text: str) -> str:
    shade = {Verdict.ALLOWED: _GREEN, Verdict.AUDIT: _YELLOW}.get(verdict, _RED)
    return f"{shade}{text}{_RESET}"


def header() -> str:
    return "  ".join(title.ljust(width) for title, width in COLUMNS).rstrip()


def format_row(record: FlowRecord, *, color: bool = False) -> str:
    parts = [_fit(cell, title, width)
             for cell, (title, width) in zip(cells(record), COLUMNS, strict=True)]
    if color:
        parts[4] = _colour(record.verdict, parts[4])
        if record.suppressed:
            parts[7] = f"{_YELLOW}{parts[7]}{_RESET}"
    return "  ".join(parts).rstrip()


class Renderer:
    """Writes records to ``out`` as a table (header first) or as JSON lines."""

    def __init__(self, out: TextIO, *, json: bool = False, color: bool = False) -> None:
        self.out, self.json, self.color = out, json, color
        self.count = 0

    def write(self, record: FlowRecord) -> None:
        if self.json:
            self.out.write(to_json(record) + "\n")
        else:
            if self.count == 0:
                self.out.write(header() + "\n")
            self.out.write(format_row(record, color=self.color) + "\n")
        self.count += 1

    def flush(self) -> None:
        self.out.flush()
