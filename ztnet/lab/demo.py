"""`ztnet demo`: the whole story on one machine, checked as it is told.

The lab comes up (controller, two enrolled agent hosts, services), the operator applies the
lab policy through the controller, and a scripted agent on host-a does what a compromised
agent would: it uses its API, then tries to exfiltrate over TCP and UDP, to sneak out through
a raw socket and IPv6, and to reach the cloud metadata service. host-b's agent shows that
another host enforces another policy. Finally the operator revokes the agent's grant and its
established connection is cut. After the summary, chapters of their own: an agent scans, a
detector fires, the controller quarantines it on its host, the operator releases it
(ztnet/lab/demo_response.py); the operator grants research-bot a path just in time and it
disappears when its ttl ends (ztnet/lab/demo_jit.py); a byte budget cuts an upload
(ztnet/lab/demo_budget.py); research-bot reaches a CDN granted by name, through ztnet's
resolver, and not a name nobody granted (ztnet/lab/demo_names.py). Every step is checked
three ways — the traffic agent's errno, the flow record the host's daemon wrote (printed
live), and the sniffers on the api and exfil hosts — and the closing summary is computed from
the flow records. Any deviation makes the command exit 1, so `make demo` doubles as a smoke test.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from ztnet.errors import LabError
from ztnet.identity.launch import DYNAMIC_USER
from ztnet.lab.cluster import Lab
from ztnet.lab.demo_budget import budget_chapter
from ztnet.lab.demo_jit import jit_chapter
from ztnet.lab.demo_names import names_chapter
from ztnet.lab.demo_response import response_chapter
from ztnet.lab.netns import poll_until
from ztnet.lab.policy import OPS_BOT, RESEARCH_BOT, lab_policy
from ztnet.lab.procs import child_env
from ztnet.lab.summary import summarize, table
from ztnet.lab.topology import (
    API_ALT_PORT,
    API_PORT,
    DNS_PORT,
    EXFIL_PORT,
    METADATA_IPV4,
    METADATA_PORT,
    LabHost,
    Role,
    Topology,
)
from ztnet.lab.trace import LiveTrace
from ztnet.lab.wire import Wire
from ztnet.observe.records import EventType, FlowRecord, Verdict
from ztnet.text import use_color

PAYLOAD = "GET /v1/reports HTTP/1.1"
# (attempts, allowed, denied, alerts) the story produces, per agent: the summary must agree
EXPECTED = {RESEARCH_BOT: (8, 3, 5, 1), OPS_BOT: (2, 1, 1, 0)}
C, S, E = EventType.CONNECT, EventType.SENDMSG, EventType.FLOW_END
ALLOWED, DENIED = Verdict.ALLOWED, Verdict.DENIED


def record(host: LabHost, agent: str, kind: EventType, verdict: Verdict, destination: str,
           port: int, source_port: int | None = None) -> Callable[[FlowRecord], bool]:
    def match(r: FlowRecord) -> bool:
        return (r.host == host.name and r.agent.name == agent and r.event_type == kind
                and r.verdict == verdict and r.destination == destination
                and r.destination_port == port
                and (source_port is None or r.source_port == source_port))

    return match


class Demo:
    def __init__(self, lab: Lab, out: TextIO) -> None:
        self.lab, self.out = lab, out
        self.color = use_color(out)
        self.failures: list[str] = []
        self.steps = 0
        self.grant = ""  # the grant research-bot's API call used (step 3), revoked later
        topo = lab.topology
        self.a, self.b = topo.agent_hosts_list[:2]
        self.api, self.exfil, self.dns = (topo.by_role(role)[0] for role in
                                          (Role.API, Role.EXFIL, Role.DNS))
        self.trace = LiveTrace({h.name: lab.flows_path(h) for h in topo.agent_hosts_list}, out,
                               color=self.color)
        self.wire = Wire(lab)

    # --- output and checks -----------------------------------------------------------------

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def step(self, title: str) -> int:
        self.trace.flush()
        self.steps += 1
        self.say(f"\n[{self.steps}] {title}")
        return self.trace.mark()

    def check(self, ok: bool, text: str) -> bool:
        self.trace.flush()
        if self.color:
            mark = "\x1b[32m  ok\x1b[0m" if ok else "\x1b[31mFAIL\x1b[0m"
        else:
            mark = "  ok" if ok else "FAIL"
        self.say(f"    {mark}  {text}")
        if not ok:
            self.failures.append(f"step {self.steps}: {text}")
        return ok

    def expect(self, since: int, what: str, match: Callable[[FlowRecord], bool]
               ) -> FlowRecord | None:
        try:
            return self.trace.wait(match, 10.0, what, since=since)
        except LabError as exc:
            self.check(False, str(exc))
            return None

    def attempt(self, host: LabHost, agent: str, kind: str, target: str, port: int = 0, *,
                user: str | None = DYNAMIC_USER, **extra: str) -> dict[str, Any]:
        spec = {"kind": kind, "host": target, "port": port, **extra}
        return self.lab.run_attempts(host, agent, [spec], user=user)[0]

    # --- the story -------------------------------------------------------------------------

    def run(self) -> None:
        a, api = self.a, self.api
        policy = self.lab.run_dir / "demo-policy.toml"
        policy.write_text(lab_policy(self.lab.topology))
        self.step("the operator applies the lab policy through the controller "
                  "(ztnet policy apply, mutual TLS)")
        done = self.lab.operator("policy", "apply", str(policy))
        for line in (done.stdout + done.stderr).strip().splitlines():
            self.say(f"    {line}")
        self.check(done.returncode == 0, "every agent host verified, applied and acknowledged "
                   "the signed bundle")
        self.wire.ready()
        self.say(f"\nlive flow trace of {', '.join(h.name for h in (self.a, self.b))} "
                 "(each host's flows.jsonl, as `ztnet observe --follow` reads it):")
        self.trace.print_header()

        since = self.step(f"{RESEARCH_BOT}@host-a resolves {api.fqdn} (allowed: udp "
                          f"{self.dns.ipv4}:{DNS_PORT})")
        got = self.attempt(a, RESEARCH_BOT, "dns", self.dns.ipv4, name=api.fqdn)
        seen = self.expect(since, "the DNS query", record(a, RESEARCH_BOT, S, ALLOWED,
                                                          self.dns.ipv4, DNS_PORT))
        self.check(got["result"] == "OK" and api.ipv4 in got.get("addresses", ())
                   and seen is not None, f"answer {got.get('addresses', got['result'])}")

        since = self.step(f"{RESEARCH_BOT} calls the internal API {api.fqdn}:{API_PORT}")
        got = self.attempt(a, RESEARCH_BOT, "tcp", api.ipv4, API_PORT, payload=PAYLOAD)
        seen = self.expect(since, "the API call", record(a, RESEARCH_BOT, C, ALLOWED, api.ipv4,
                                                         API_PORT))
        end = self.expect(since, "the API flow's end", record(
            a, RESEARCH_BOT, E, ALLOWED, api.ipv4, API_PORT, int(got.get("sport", 0))))
        self.grant = seen.grant.name if seen is not None and seen.grant else ""
        version = seen.grant.policy_version if seen is not None and seen.grant else 0
        self.check(got["result"] == "OK" and got["received"] == len(PAYLOAD) and bool(self.grant)
                   and end is not None and end.flow is not None and end.flow.bytes_out > 0,
                   f"allowed by grant {self.grant or '?'} (policy version {version}); "
                   f"the API echoed {got.get('received')} bytes")

        for kind, title in (("tcp", "exfiltrate to the sink over TCP"),
                            ("udp", "exfiltrate to the sink over UDP")):
            since = self.step(f"{RESEARCH_BOT} tries to {title} {self.exfil.fqdn}:{EXFIL_PORT}")
            got = self.attempt(a, RESEARCH_BOT, kind, self.exfil.ipv4, EXFIL_PORT,
                               payload="customer-db.tar.gz")
            seen = self.expect(since, f"the {kind} attempt", record(
                a, RESEARCH_BOT, C if kind == "tcp" else S, DENIED, self.exfil.ipv4,
                EXFIL_PORT))
            call = "connect()" if kind == "tcp" else "sendto()"
            self.check(got["result"] == "EPERM" and seen is not None,
                       f"{call} failed with {got['result']} at once: no packet left host-a")

        since = self.step(f"{RESEARCH_BOT} tries the same API over IPv6 "
                          f"[{api.ipv6}]:{API_PORT} (no IPv6 grant)")
        got = self.attempt(a, RESEARCH_BOT, "tcp", api.ipv6, API_PORT)
        seen = self.expect(since, "the IPv6 attempt", record(a, RESEARCH_BOT, C, DENIED,
                                                             api.ipv6, API_PORT))
        self.check(got["result"] == "EPERM" and seen is not None,
                   f"connect() failed with {got['result']}")

        self.step(f"{RESEARCH_BOT}, running as root, sends a raw ICMP packet to {api.ipv4} "
                  "(raw sockets bypass connect and sendmsg hooks)")
        before = self.wire.egress_drops(a)
        got = self.attempt(a, RESEARCH_BOT, "raw", api.ipv4, user=None)
        arrived = self.wire.raw_arrived(a, api)
        dropped = self.wire.egress_drops(a) - before
        # a raw socket learns of the egress drop as EPERM from sendto()
        self.check(got["result"] in ("OK", "EPERM") and not arrived and dropped >= 1,
                   f"sendto() said {got['result']}, but the egress backstop dropped it "
                   f"(egress_drop +{dropped}); the sniffer on api saw no echo request")

        since = self.step(f"{RESEARCH_BOT} tries the cloud metadata service "
                          f"{METADATA_IPV4}:{METADATA_PORT}")
        got = self.attempt(a, RESEARCH_BOT, "tcp", METADATA_IPV4, METADATA_PORT)
        seen = self.expect(since, "the metadata attempt", record(a, RESEARCH_BOT, C, DENIED,
                                                                 METADATA_IPV4, METADATA_PORT))
        self.check(got["result"] == "EPERM" and seen is not None,
                   f"connect() failed with {got['result']}, and the attempt raised an alert")

        self.other_host()
        self.say("\n    detection, quarantine and just-in-time grants: after the summary")
        self.revoke()
        self.step("the wire: unconfined positive controls from every agent host, then the "
                  "sniffers on api and exfil stop")
        for ok, text in self.wire.verdicts(expected_api={
                (self.a.name, "TCP", API_PORT), (self.b.name, "TCP", API_ALT_PORT),
                (self.b.name, "ICMP", 0)}):
            self.check(ok, text)

    def other_host(self) -> None:
        b, api = self.b, self.api
        since = self.step(f"{OPS_BOT}@host-b, another host with another policy: "
                          f"api:{API_ALT_PORT} and ping allowed, api:{API_PORT} not")
        script: list[dict[str, Any]] = [
            {"kind": "tcp", "host": api.ipv4, "port": API_ALT_PORT, "payload": PAYLOAD},
            {"kind": "tcp", "host": api.ipv4, "port": API_PORT},
            {"kind": "icmp", "host": api.ipv4}]
        got = [r["result"] for r in self.lab.run_attempts(b, OPS_BOT, script)]
        found = [self.expect(since, what, match) for what, match in (
            ("api:8443", record(b, OPS_BOT, C, ALLOWED, api.ipv4, API_ALT_PORT)),
            ("api:443", record(b, OPS_BOT, C, DENIED, api.ipv4, API_PORT)),
            # ping sockets pass no sendmsg hook: the allowed echo shows as a flow end
            ("the ping", record(b, OPS_BOT, E, ALLOWED, api.ipv4, 0)))]
        self.check(got == ["OK", "EPERM", "OK"] and all(found),
                   f"results {', '.join(got)}; host-b's daemon recorded each one")

    def revoke(self) -> None:
        a, api = self.a, self.api
        since = self.step(f"{RESEARCH_BOT} holds a connection to the API; the operator "
                          f"revokes grant {self.grant} (ztnet revoke)")
        if not self.grant:  # without an id, `ztnet revoke` would take every grant: skip
            self.check(False, "no grant id was recorded for the API call; nothing to revoke")
            return
        argv = self.lab.agent_argv(a, RESEARCH_BOT, [
            sys.executable, "-m", "ztnet.lab.traffic", "hold", api.ipv4, str(API_PORT),
            "--limit", "20"])
        hold = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=child_env())
        lines: queue.Queue[str] = queue.Queue()
        done: subprocess.CompletedProcess[str] | None = None

        def read() -> None:
            for line in hold.stdout or ():
                lines.put(line)

        threading.Thread(target=read, daemon=True).start()
        try:
            first = lines.get(timeout=20)
            self.expect(since, "the held connection", record(a, RESEARCH_BOT, C, ALLOWED,
                                                             api.ipv4, API_PORT))
            done = self.lab.operator("revoke", "--agent", RESEARCH_BOT, "--grant", self.grant)
            for line in (done.stdout + done.stderr).strip().splitlines():
                self.say(f"    {line}")
            broken = lines.get(timeout=20)
        except queue.Empty:
            first = broken = "(no answer from the traffic agent)"
        finally:
            hold.kill()
            hold.wait()
        self.expect(since, "the cut flow's end", record(a, RESEARCH_BOT, E, ALLOWED, api.ipv4,
                                                        API_PORT))
        revoked = done is not None and done.returncode == 0
        self.check('"connected"' in first and '"ECONNABORTED"' in broken and revoked,
                   f"the established connection was cut at once: {broken.strip()}")
        since = self.trace.mark()
        got = self.attempt(a, RESEARCH_BOT, "tcp", api.ipv4, API_PORT)
        seen = self.expect(since, "the retry", record(a, RESEARCH_BOT, C, DENIED, api.ipv4,
                                                      API_PORT))
        self.check(got["result"] == "EPERM" and seen is not None,
                   f"a new attempt fails with {got['result']}")

    def summary(self) -> None:
        self.trace.flush()
        tallies = summarize(self.trace.records)
        self.say("\nsummary (computed from the flow records of both hosts):")
        for line in table(tallies):
            self.say(f"    {line}")
        got = {t.agent: t.counts() for t in tallies}

        def show(counts: Mapping[str, tuple[int, ...]]) -> str:
            return ", ".join(f"{agent} {'/'.join(map(str, c))}" for agent, c in counts.items())

        self.check(got == EXPECTED, f"attempts/allowed/denied/alerts: {show(got)}"
                   + (", as the story did" if got == EXPECTED else f"; expected {show(EXPECTED)}"))
        self.controller_store()

    def controller_store(self) -> None:
        """The daemons also stream their records to the controller: it must hold them all."""
        local = {r.uuid for r in self.trace.records}
        stored: set[str] = set()

        def uploaded() -> bool | None:  # uploads are batched: poll the store
            stored.clear()
            stored.update(r.uuid for r in self.lab.controller_flows(since="10m"))
            return True if local <= stored else None

        problem = ""
        try:
            poll_until(uploaded, 20.0, "the controller's flow store")
        except LabError as exc:
            problem = f"; {len(local - stored)} missing ({exc})"
        self.check(not problem, "the controller's flow store (ztnet flows --controller) "
                   f"holds all {len(local)} records{problem}")


def run_demo(name: str = "ztlab", *, keep: bool = False, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    start = time.monotonic()

    def progress(message: str) -> None:
        out.write(f"lab: {message}\n")
        out.flush()

    try:
        topology = Topology(name, 2)
    except ValueError as exc:
        raise LabError(str(exc)) from None
    lab = Lab(topology, progress=progress)
    out.write("ztnet demo: zero-trust egress for AI agents, across hosts, on this machine\n\n")
    demo: Demo | None = None
    try:
        if lab.leftovers():
            # a lab left up (or half up) may hold revocations or agents of its own: the story
            # is only checkable from a clean start
            progress(f"lab {name} exists: starting it afresh")
            lab.down()
        lab.up()
        out.write(f"lab {name} up in {time.monotonic() - start:.1f}s\n")
        out.write(lab.topology.table() + "\n")
        demo = Demo(lab, out)
        demo.wire.start()
        demo.trace.start()
        demo.run()
        demo.summary()
        response_chapter(demo)
        jit_chapter(demo)
        budget_chapter(demo)
        names_chapter(demo)
        if keep and demo.grant:  # leave the lab as `lab up` makes it
            lab.operator("revoke", "--agent", RESEARCH_BOT, "--grant", demo.grant, "--restore")
    except LabError as exc:
        out.write(f"\nFAIL: {exc}\n")
        if demo is not None:
            demo.failures.append(str(exc))
        else:
            return 1
    finally:
        if demo is not None:
            demo.trace.stop()
            demo.wire.close()
        if not keep:
            lab.down()
    assert demo is not None
    elapsed = time.monotonic() - start
    if keep:
        flag = "" if name == "ztlab" else f" --name {name}"
        out.write(f"\nthe lab stays up: ztnet lab status{flag}; ztnet lab down{flag} when done\n")
    if demo.failures:
        out.write(f"\n{len(demo.failures)} check(s) FAILED in {elapsed:.1f}s:\n")
        for failure in demo.failures:
            out.write(f"  {failure}\n")
        return 1
    out.write(f"\nall {demo.steps} steps behaved as described ({elapsed:.1f}s)\n")
    return 0
