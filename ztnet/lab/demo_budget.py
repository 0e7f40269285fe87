"""The demo's byte-budget chapter (docs/policy.md, "Byte budgets"): research-bot may upload
reports to api:UPLOAD_PORT, at most UPLOAD_BUDGET per connection (``max_bytes_out`` in the
lab policy). It tries to upload four times that: the kernel counts the connection's bytes on
the egress path, drops its packets once the budget would be crossed, records the cut, and
the host's daemon destroys the socket, so the upload fails with an error instead of hanging.

Self-contained: it runs after the summary and uses only its own rule and port.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ztnet.durations import parse_size
from ztnet.lab.policy import RESEARCH_BOT, UPLOAD_BUDGET
from ztnet.lab.topology import UPLOAD_PORT
from ztnet.observe.records import EventType, Verdict

if TYPE_CHECKING:
    from ztnet.lab.demo import Demo

ERRORS = ("ECONNABORTED", "ECONNRESET", "EPIPE")


def budget_chapter(demo: Demo) -> None:
    from ztnet.lab.demo import record

    lab, a, api = demo.lab, demo.a, demo.api
    budget = parse_size(UPLOAD_BUDGET)
    size = 4 * budget
    since = demo.step(f"{RESEARCH_BOT} uploads {size >> 20} MiB to api:{UPLOAD_PORT}, a path "
                      f"its policy caps at {UPLOAD_BUDGET}iB per connection (max_bytes_out)")
    got = lab.run_attempts(a, RESEARCH_BOT, [{"kind": "upload", "host": api.ipv4,
                                              "port": UPLOAD_PORT, "size": size}],
                           timeout=10.0)[0]
    cut = demo.expect(since, "the budget cut", record(a, RESEARCH_BOT, EventType.CONNECT,
                                                      Verdict.DENIED, api.ipv4, UPLOAD_PORT))
    end = demo.expect(since, "the cut flow's end", record(a, RESEARCH_BOT, EventType.FLOW_END,
                                                          Verdict.DENIED, api.ipv4, UPLOAD_PORT))
    out = end.flow.bytes_out if end is not None and end.flow is not None else -1
    demo.check(got["result"] in ERRORS and cut is not None and cut.drop_reason == "BUDGET"
               and 0 < out <= budget,
               f"the upload failed with {got['result']} (the kernel cut the flow at "
               f"{out:,} bytes out, headers included, of {budget:,}; the daemon destroyed "
               "the socket)")
