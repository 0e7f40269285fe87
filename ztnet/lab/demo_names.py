"""The demo's hostname chapter (docs/policy.md, "Hostname grants"; docs/daemon.md, `--dns`):
research-bot's policy grants ``cdn.example.com`` by name, a CDN-like name whose upstream (the
inet host, ztnet.lab.upstream) answers one of three edges per query with a 2-second TTL. The
agent asks a resolver of its choice (the inet host's); the kernel sends the query to ztnet's
resolver on host-a, which asks upstream and installs the answer in the kernel before the
agent sees it, so resolve-then-connect works and the flow record names the address. After
the TTL the CDN hands out another edge, which works too. ``files.example.com`` is granted to
nobody: REFUSED without asking upstream, and its address, looked up out of band (unconfined,
from host-a), gets EPERM.

Self-contained: it runs after the summary and uses only its own names and addresses.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from ztnet.lab.policy import RESEARCH_BOT
from ztnet.lab.topology import (
    API_PORT,
    CDN_NAME,
    CDN_TTL,
    DNS_PORT,
    UNGRANTED_ADDRESS,
    UNGRANTED_NAME,
    Role,
)
from ztnet.observe.records import EventType, FlowRecord, Verdict

if TYPE_CHECKING:
    from ztnet.lab.demo import Demo

PAYLOAD = "GET /assets/model-card.json HTTP/1.1"
RCODES = {"RCODE5": "REFUSED", "RCODE3": "NXDOMAIN", "RCODE2": "SERVFAIL"}


def _rcode(got: dict[str, Any]) -> str:
    result = str(got["result"])
    return RCODES.get(result, result)


def names_chapter(demo: Demo) -> None:
    from ztnet.lab.demo import record

    lab, a = demo.lab, demo.a
    inet = lab.topology.by_role(Role.INTERNET)[0]
    resolver = inet.ipv4

    def resolve(name: str) -> dict[str, Any]:
        return demo.attempt(a, RESEARCH_BOT, "dns", resolver, name=name)

    def named(address: str) -> Any:
        base = record(a, RESEARCH_BOT, EventType.CONNECT, Verdict.ALLOWED, address, API_PORT)

        def match(r: FlowRecord) -> bool:
            return base(r) and CDN_NAME in r.destination_names

        return match

    def query(name: str, rcode: str) -> Any:
        def match(r: FlowRecord) -> bool:  # the resolver's own record of the query
            return (r.host == a.name and r.agent.name == RESEARCH_BOT
                    and r.event_type == EventType.DNS and r.dns is not None
                    and r.dns.name == name and r.dns.rcode == rcode)

        return match

    def reach(address: str) -> dict[str, Any]:
        return demo.attempt(a, RESEARCH_BOT, "tcp", address, API_PORT, payload=PAYLOAD)

    since = demo.step(f"{RESEARCH_BOT} resolves {CDN_NAME} (granted by name, tcp/{API_PORT}) "
                      f"asking {resolver}:{DNS_PORT}; the kernel sends the query to ztnet's "
                      "resolver on host-a")
    first = resolve(CDN_NAME)
    answered = time.monotonic()
    seen = demo.expect(since, "the redirected query", record(
        a, RESEARCH_BOT, EventType.SENDMSG, Verdict.ALLOWED, resolver, DNS_PORT))
    traced = demo.expect(since, "the resolver's query record", query(CDN_NAME, "NOERROR"))
    addresses = list(first.get("addresses", ()))
    one = addresses[0] if addresses else ""
    demo.check(first["result"] == "OK" and len(addresses) == 1 and seen is not None
               and traced is not None and traced.dns is not None
               and list(traced.dns.answers) == addresses,
               f"answer {addresses or _rcode(first)} (ttl {CDN_TTL}s), entries in the kernel "
               "before the answer")
    if not one:
        return
    got = reach(one)
    flow = demo.expect(since, "the connection by name", named(one))
    demo.check(got["result"] == "OK" and got.get("received") == len(PAYLOAD) and flow is not None,
               f"connected at once; the flow record names it {CDN_NAME} ({one})")

    since = demo.step(f"the {CDN_TTL}s TTL runs out; {RESEARCH_BOT} resolves {CDN_NAME} again")
    # the wait is the story (a TTL running out), not synchronisation
    time.sleep(max(0.0, CDN_TTL - (time.monotonic() - answered)) + 0.2)
    second = resolve(CDN_NAME)
    again = list(second.get("addresses", ()))
    other = again[0] if again else ""
    got = reach(other) if other else {"result": _rcode(second)}
    flow = demo.expect(since, "the connection to the new edge", named(other)) if other else None
    demo.check(second["result"] == "OK" and bool(other) and other != one
               and got["result"] == "OK" and flow is not None,
               f"a second address appears ({other or 'none'}, was {one}) and works: "
               f"{got['result']}")

    since = demo.step(f"{RESEARCH_BOT} tries {UNGRANTED_NAME}, which no policy grants, and "
                      "its address looked up out of band")
    refused = resolve(UNGRANTED_NAME)
    # the upstream logs each query before it answers: had ztnet's resolver asked, it is there
    asked = sum(json.loads(line).get("name") == UNGRANTED_NAME
                for line in lab.process_log("upstream").splitlines() if line.startswith("{"))
    direct = lab.run_attempts(a, None, [{"kind": "dns", "host": resolver, "port": DNS_PORT,
                                         "name": UNGRANTED_NAME}])[0]
    address = (direct.get("addresses") or [UNGRANTED_ADDRESS])[0]
    got = reach(address)
    refusal = demo.expect(since, "the resolver's refusal", query(UNGRANTED_NAME, "REFUSED"))
    denied = demo.expect(since, "the ungranted address", record(
        a, RESEARCH_BOT, EventType.CONNECT, Verdict.DENIED, address, API_PORT))
    demo.check(_rcode(refused) == "REFUSED" and asked == 0 and address == UNGRANTED_ADDRESS
               and got["result"] == "EPERM" and denied is not None and refusal is not None,
               f"the name is {_rcode(refused)} ("
               + ("never asked upstream" if asked == 0 else f"{asked} queries upstream!")
               + f"); unconfined, host-a "
               f"learns {address}; connect() to it fails with {got['result']}")
