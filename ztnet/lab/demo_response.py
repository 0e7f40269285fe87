"""The demo's detection-and-response chapter (docs/detection.md): a hostile agent scans and
bursts denied attempts, a detector fires, the controller quarantines the agent on its host
within about a second (the kernel's quarantine flag; its held connection is cut, a sniffer
on the API host sees none of its packets afterwards), and the operator releases it.

Self-contained: it runs after the summary, with its own policy version (the lab policy plus a
``[detection]`` table binding the scan detectors to ``quarantine``), its own sniffer and
ops-bot on host-b, whose grants the earlier chapters left alone.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from ztnet.errors import LabError
from ztnet.lab.hold import HeldConnection
from ztnet.lab.netns import poll_until
from ztnet.lab.policy import OPS_BOT, lab_policy
from ztnet.lab.sniff import Sniffer
from ztnet.lab.topology import API_ALT_PORT, CONTROL_PORT, EXFIL_PORT, HOST_IFACE
from ztnet.lab.wire import control_from

if TYPE_CHECKING:
    from ztnet.lab.demo import Demo

DETECTION = """
# detection and response (docs/detection.md): scanning quarantines the agent on its host
[detection]
cooldown = "5m"
max_auto_quarantines = 5
[detection.actions]
fan-out = "quarantine"
denied-burst = "quarantine"
"""
SCAN_PORTS = 25


def response_chapter(demo: Demo) -> None:
    sniffer = Sniffer(demo.lab.topology.netns(demo.api), HOST_IFACE)
    sniffer.start()
    try:
        _chapter(demo, sniffer)
    finally:
        sniffer.stop(check=False)


def _chapter(demo: Demo, sniffer: Sniffer) -> None:
    lab, b, api, exfil = demo.lab, demo.b, demo.api, demo.exfil
    demo.step("the operator binds the scan detectors (fan-out, denied-burst) to quarantine "
              "([detection] in the policy)")
    policy = lab.run_dir / "demo-detection-policy.toml"
    policy.write_text(lab_policy(lab.topology) + DETECTION)
    done = lab.operator("policy", "apply", str(policy))
    demo.check(done.returncode == 0, "every host applied the new version")

    since = demo.step(f"{OPS_BOT}@host-b holds a connection to api:{API_ALT_PORT}, then turns "
                      f"hostile: it scans {SCAN_PORTS} ports of {exfil.fqdn}")
    with HeldConnection(lab, b, OPS_BOT, api.ipv4, API_ALT_PORT) as held:
        connected = held.event().get("event") == "connected"
        scan = [{"kind": "tcp", "host": exfil.ipv4, "port": EXFIL_PORT + i}
                for i in range(SCAN_PORTS)]
        results = {r["result"] for r in lab.run_attempts(b, OPS_BOT, scan, timeout=0.5)}
        demo.check(connected and results == {"EPERM"},
                   f"every connect() of the scan failed with EPERM at once "
                   f"({SCAN_PORTS} denied attempts in well under a second)")
        alert = _await_alert(demo)
        broken = held.event()
    in_force = _flag_time(demo)
    demo.step("a detector fires; the controller quarantines the agent on host-b")
    if alert is None:
        demo.check(False, "no alert with action quarantine was raised")
        return
    evidence = set(alert["evidence"])
    trigger = max((r.time_ns for r in demo.trace.records[since:] if r.uuid in evidence),
                  default=alert["first_evidence_ns"]) / 1e9
    demo.say(f"    alert #{alert['id']} {alert['detector']} on {alert['agent']}@{alert['host']}: "
             f"{alert['summary']} ({len(evidence)} flow ids as evidence)")
    demo.check(alert["host"] == b.name and alert["action"] == "quarantine",
               f"alert raised {1000 * (alert['time'] - trigger):.0f} ms after the connect() "
               "that crossed the threshold")
    demo.check(in_force is not None and (broken.get("result") == "ECONNABORTED"),
               f"quarantine in force in host-b's kernel {_ms(in_force, trigger)} after that "
               f"connect(); the held connection was cut: {broken.get('result', 'no answer')}")

    demo.step(f"{OPS_BOT}@host-b tries its own API again; the sniffer on api watches")
    marked = time.time()
    got = lab.run_attempts(b, OPS_BOT, [{"kind": "tcp", "host": api.ipv4,
                                         "port": API_ALT_PORT}])[0]
    lab.run_attempts(b, None, [{"kind": "tcp", "host": api.ipv4, "port": CONTROL_PORT}],
                     timeout=1.0)
    try:
        sniffer.wait_for(control_from(b), 10.0, "the positive control from host-b")
        seen = [p for p in sniffer.packets() if p.src in (b.ipv4, b.ipv6)
                and p.time >= marked and not control_from(b)(p)
                and not p.is_bare_reset]  # the host's answer to the api for the cut socket
    except LabError as exc:
        demo.check(False, str(exc))
        return
    demo.check(got["result"] == "EPERM" and not seen,
               f"connect() failed with {got['result']} (QUARANTINED); the sniffer saw none of "
               "its packets, only the unconfined control")
    listed = lab.operator("quarantines")
    for line in listed.stdout.strip().splitlines():
        demo.say(f"    {line}")

    demo.step("the operator releases it (ztnet release): an explicit, audited action")
    done = lab.operator("release", "--agent", OPS_BOT, "--reason", "demo: investigated")
    got = lab.run_attempts(b, OPS_BOT, [{"kind": "tcp", "host": api.ipv4,
                                         "port": API_ALT_PORT}])[0]
    demo.check(done.returncode == 0 and got["result"] == "OK",
               f"grants restored with fresh windows: api:{API_ALT_PORT} says {got['result']}")


def _await_alert(demo: Demo) -> dict[str, Any] | None:
    def quarantined() -> dict[str, Any] | None:
        done = demo.lab.operator("alerts", "--json", "--agent", OPS_BOT)
        for line in reversed(done.stdout.splitlines()):
            if line.startswith("{"):
                alert: dict[str, Any] = json.loads(line)
                if alert["action"] == "quarantine":
                    return alert
        return None

    try:
        return poll_until(quarantined, 10.0, "the quarantining alert")
    except LabError:
        return None


def _flag_time(demo: Demo) -> float | None:
    """When host-b's daemon set the quarantine flag: its log line (``quarantine changed``)."""
    from ztnet.datapath.datapath import Datapath

    with Datapath.inspect(demo.lab.instance(demo.b)) as datapath:
        if OPS_BOT not in datapath.quarantined():
            return None
    for line in reversed(demo.lab.daemon_log(demo.b).splitlines()):
        if '"quarantine changed"' in line and OPS_BOT in line:
            return float(json.loads(line).get("flags_at", 0.0)) or None
    return None


def _ms(at: float | None, since: float) -> str:
    return "?" if at is None else f"{1000 * (at - since):.0f} ms"
