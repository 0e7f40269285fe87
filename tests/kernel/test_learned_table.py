"""The learned-address map is shared by every agent of a host: one agent's answers must not
fill it for the others (a per-agent cap), and entries must leave once nothing needs them
(a lapsed answer no socket of the agent is connected to), even while their grant is renewed.
Real pinned maps of a loaded datapath, read back after each step; and a real daemon's resolver
at its cap."""

from __future__ import annotations

import ipaddress

from ztnet.datapath.datapath import Datapath
from ztnet.datapath.learned import LearnedKey, LearnedTable, LearnedValue, boot_ns
from ztnet.instance import Instance
from ztnet.testing.dnslab import API_V4, ECHO_PORT, SHORT, ZERO, dns_lab

TCP = 6
STUB = "10.255.255.53"  # any address: the hooks redirect port 53 wherever it points
HOUR_NS = 3600 * 10**9


def key(agent: int, address: str, port: int = 443) -> LearnedKey:
    return LearnedKey(agent, TCP, ipaddress.ip_address(address), port)


def kernel_count(table: LearnedTable, agent: int) -> int:
    return sum(1 for k in table.entries() if k.agent == agent)


def test_an_agent_at_its_cap_gets_no_more_entries_and_others_are_untouched(
        instance: Instance) -> None:
    now = boot_ns()
    live = LearnedValue(now + HOUR_NS, now + HOUR_NS, 7)
    with Datapath.open(instance) as dp:
        table = dp.learned()
        greedy = {key(1, f"198.51.100.{i}"): live for i in range(1, 6)}
        refused = table.add(greedy, per_agent=3)
        assert len(refused) == 2 and refused <= greedy.keys()
        assert table.held(1) == kernel_count(table, 1) == 3
        # what it holds already may be renewed at the cap; nothing new gets in
        kept = sorted(greedy.keys() - refused)
        renewed = LearnedValue(now + 2 * HOUR_NS, now + 2 * HOUR_NS, 7)
        assert table.add({kept[0]: renewed, key(1, "198.51.100.99"): live}, per_agent=3) == {
            key(1, "198.51.100.99")}
        assert table.entries()[kept[0]] == renewed
        # another agent's room is its own
        other = {key(2, "203.0.113.1"): live, key(2, "203.0.113.2"): live}
        assert table.add(other, per_agent=3) == frozenset()
        assert table.held(2) == kernel_count(table, 2) == 2
        # a table opened afresh (a restarted daemon) counts what the kernel holds
        assert LearnedTable(dp.maps).held(1) == 3


def test_sweep_frees_lapsed_answers_no_socket_needs_and_keeps_the_rest(
        instance: Instance) -> None:
    now = boot_ns()
    lapsed = LearnedValue(now - 10**9, now + HOUR_NS, 7)  # answer over, grant renewed on
    live = LearnedValue(now + HOUR_NS, now + HOUR_NS, 7)
    over = LearnedValue(now - 2 * 10**9, now - 10**9, 7)  # past the grant too
    with Datapath.open(instance) as dp:
        table = dp.learned()
        connected = key(1, "198.51.100.1")
        unused = key(1, "198.51.100.2")
        fresh = key(1, "198.51.100.3")
        gone = key(1, "198.51.100.4")
        table.add({connected: lapsed, unused: lapsed, fresh: live, gone: over})
        assert table.held(1) == 4
        deleted = table.sweep(in_use=lambda k: k == connected)
        assert deleted == 2
        assert set(table.entries()) == {connected, fresh}
        assert table.held(1) == 2
        # without socket knowledge only what is past its grant goes
        table.add({unused: lapsed})
        assert table.sweep() == 0 and unused in table.entries()



def test_the_resolver_strips_what_would_pass_an_agents_cap_and_other_agents_still_learn(
        instance: Instance) -> None:
    """A real `ztnet daemon --dns --dns-max-entries 2`: bot's third address gets no entry, so
    its answer carries none and a connect to it is EPERM; agent other keeps its own share."""
    with dns_lab(instance, daemon_args=("--dns-floor", "2", "--dns-max-entries", "2")) as lab:
        for name, address in (("api.lab.test", API_V4), ("zero.lab.test", ZERO)):
            answer = lab.dnsagent("query", name, "A", STUB)
            assert [a[3] for a in answer["answers"] if a[1] == "A"] == [[address]], answer
        mark = lab.daemon.mark()
        answer = lab.dnsagent("query", "short.lab.test", "A", STUB)
        assert answer["rcode"] == "NOERROR" and not answer["answers"], answer
        event = lab.daemon.wait_event(lambda e: e.get("event") == "dns query"
                                      and e.get("qname") == "short.lab.test", start=mark)
        assert any("over the agent's cap of 2" in s for s in event["stripped"]), event
        assert lab.dnsagent("connect", SHORT, str(ECHO_PORT)) == {"result": "EPERM"}
        assert lab.dnsagent("connect", API_V4, str(ECHO_PORT)) == {"result": "OK"}
        assert lab.dnsagent("resolve", "api.lab.test", agent="other")["addresses"]
        assert lab.dnsagent("connect", API_V4, str(ECHO_PORT), agent="other") == {
            "result": "OK"}
