"""The demo's just-in-time chapter (docs/policy.md, "Just-in-time grants"): research-bot on
host-a has no path to api:API_ALT_PORT; the operator grants it one for a few seconds with a
reason (`ztnet grant`), the agent uses it and holds a connection, and at the end of the ttl
the path is gone without anyone removing it: the held connection is cut and a new connect()
fails with EPERM. `ztnet grants --all` shows the grant with its reason and approver.

Self-contained: it runs after the summary and touches no other chapter's grants.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ztnet.lab.hold import HeldConnection
from ztnet.lab.policy import RESEARCH_BOT
from ztnet.lab.topology import API_ALT_PORT

if TYPE_CHECKING:
    from ztnet.lab.demo import Demo

TTL = 6
REASON = "demo: TICKET-42, one report for the ops team"


def jit_chapter(demo: Demo) -> None:
    lab, a, api = demo.lab, demo.a, demo.api
    attempt = [{"kind": "tcp", "host": api.ipv4, "port": API_ALT_PORT}]
    demo.step(f"{RESEARCH_BOT}@host-a has no grant for api:{API_ALT_PORT}; the operator grants "
              f"one just in time, for {TTL}s (ztnet grant --reason …)")
    before = lab.run_attempts(a, RESEARCH_BOT, attempt)[0]
    done = lab.operator("grant", "--agent", RESEARCH_BOT, "--to", api.ipv4, "--ports",
                        str(API_ALT_PORT), "--ttl", f"{TTL}s", "--reason", REASON,
                        "--host", a.name)
    granted_at = time.time()
    said = done.stdout.splitlines()[0] if done.stdout else done.stderr.strip()
    demo.check(before["result"] == "EPERM" and done.returncode == 0,
               f"before: {before['result']}; {said}")

    demo.step(f"{RESEARCH_BOT} uses the path and holds a connection to api:{API_ALT_PORT}")
    with HeldConnection(lab, a, RESEARCH_BOT, api.ipv4, API_ALT_PORT) as held:
        connected = held.event()
        demo.check(connected.get("event") == "connected",
                   f"connected {time.time() - granted_at:.1f}s after the grant")
        listed = lab.operator("grants")
        for line in listed.stdout.strip().splitlines():
            demo.say(f"    {line}")
        demo.step("the ttl runs out: nobody revokes anything")
        broken = held.event(timeout=TTL + 10)
    ended = time.time() - granted_at
    after = lab.run_attempts(a, RESEARCH_BOT, attempt)[0]
    demo.check(broken.get("event") == "broken" and after["result"] == "EPERM"
               and TTL - 1.5 <= ended <= TTL + 3,
               f"the held connection ended {ended:.1f}s after the grant "
               f"({broken.get('result', 'no answer')}); a new connect() fails with "
               f"{after['result']}")
