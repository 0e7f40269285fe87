"""`ztnet demo --local`: the single-host enforcement showcase, without a
controller or daemon (the full story is `ztnet demo`, ztnet/lab/demo.py). Two
network namespaces, a server on the far side, one agent with one grant set
through the datapath API directly, and every kind of attempt the threat model
lists, each checked: the command exits non-zero if anything did not behave as
described. Kept because it needs nothing but the datapath."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from dataclasses import dataclass

from ztnet.datapath.datapath import Datapath, teardown
from ztnet.grants.model import Grant, PortRange, Proto
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair, nsenter_argv
from ztnet.lab.servers import ServerProcess
from ztnet.lab.sniff import Sniffer

API_PORT, EXFIL_PORT = 8443, 4444
AGENT = "research-bot"


@dataclass(frozen=True, slots=True)
class Step:
    what: str
    probe: list[str]
    user: str | None
    expect: str


def _probe(instance: Instance, netns: str, step: Step) -> str:
    run = [sys.executable, "-m", "ztnet.cli", "run", "--instance", instance.name,
           "--agent", AGENT]
    if step.user:
        run += ["--user", step.user]
    argv = nsenter_argv(netns, [*run, "--", sys.executable, "-m", "ztnet.lab.traffic",
                                *step.probe])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return str(json.loads(lines[-1])["result"]) if lines else f"FAILED: {out.stderr.strip()}"


def run_showcase() -> int:
    instance = Instance.resolve("demo")
    colour = sys.stdout.isatty()
    ok_mark, bad_mark = ("\033[32mok\033[0m", "\033[31mFAIL\033[0m") if colour else ("ok", "FAIL")
    failures = 0
    teardown(instance)  # a crashed earlier demo may have left its instance behind
    try:
        with NetnsPair(prefix="ztdemo") as pair, \
                ServerProcess(pair.b.netns, bind=[pair.b.ipv4, pair.b.ipv6],
                              tcp=[API_PORT, EXFIL_PORT], udp=[EXFIL_PORT]), \
                Datapath.open(instance) as datapath:
            subprocess.run(nsenter_argv(pair.a.netns, ["sysctl", "-q", "-w",
                           "net.ipv4.ping_group_range=0 2147483647"]), check=True)
            now = time.time()
            api_grant = Grant(0x5EED, AGENT, Proto.TCP,
                              ipaddress.ip_network(f"{pair.b.ipv4}/32"),
                              PortRange(API_PORT, API_PORT), now - 1, now + 300)
            datapath.replace([api_grant])
            print(f"agent {AGENT!r} holds one grant: {api_grant.label} tcp "
                  f"{pair.b.ipv4}:{API_PORT}, expires in 5m (enforced by the kernel clock)\n")
            steps = [
                Step("call the granted API", ["tcp", pair.b.ipv4, str(API_PORT), "--payload",
                                              "GET /"], "nobody", "OK"),
                Step("exfiltrate over TCP", ["tcp", pair.b.ipv4, str(EXFIL_PORT)], "nobody",
                     "EPERM"),
                Step("exfiltrate over UDP", ["udp", pair.b.ipv4, str(EXFIL_PORT)], "nobody",
                     "EPERM"),
                Step("ping the peer (ICMP)", ["icmp", pair.b.ipv4], "nobody", "EPERM"),
                Step("same API over IPv6", ["tcp", pair.b.ipv6, str(API_PORT)], "nobody",
                     "EPERM"),
                Step("cloud metadata 169.254.169.254", ["tcp", "169.254.169.254", "80"],
                     "nobody", "EPERM"),
                Step("loopback service 127.0.0.1:22", ["tcp", "127.0.0.1", "22"], "nobody",
                     "EPERM"),
            ]
            with Sniffer(pair.b.netns, pair.b.iface) as sniffer:
                for step in steps:
                    got = _probe(instance, pair.a.netns, step)
                    good = got == step.expect
                    failures += not good
                    print(f"  {ok_mark if good else bad_mark:>4}  {step.what:<34} {got:<8} "
                          f"(expected {step.expect})")
                raw = _probe(instance, pair.a.netns,
                             Step("raw IP packet (root agent)", ["raw", pair.b.ipv4], None, "*"))
                sniffer.wait_for(lambda p: p.dport == API_PORT)
            packets = sniffer.stop()
            leaked = [p for p in packets if p.dport == EXFIL_PORT or p.icmp_type == 8]
            good = not leaked
            failures += not good
            print(f"  {ok_mark if good else bad_mark:>4}  {'raw IP packet (root agent)':<34} "
                  f"{'dropped' if good else 'LEAKED':<8} (sendto said {raw})")
            good = not leaked and any(p.dport == API_PORT for p in packets)
            print(f"\nsniffer on the peer saw {len(packets)} packets: "
                  f"{'only the granted flow' if good else 'SOMETHING ELSE'}")
            failures += not good
            counters = datapath.counters()
            print(f"kernel counters: connect allowed {counters['connect_allow']}, "
                  f"denied {counters['connect_deny']}, sendmsg denied "
                  f"{counters['sendmsg_deny']}, egress dropped {counters['egress_drop']}")
    finally:
        teardown(instance)
    print(f"\n{'all steps behaved as described' if not failures else f'{failures} step(s) FAILED'}")
    return 1 if failures else 0
