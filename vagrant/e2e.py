#!/usr/bin/env python3
"""End-to-end checks across ztnet's Vagrant VMs; prints a pass/fail table, exits 1 on a failure.

Runs on the machine that ran ``vagrant up`` (standard library only) and drives the VMs over
SSH. The checks are the lab's (tests/kernel/test_lab_e2e.py): the traffic matrix and how its
three witnesses are matched come from ztnet/lab/scenarios.py through vmcheck.py (run in the
controller VM); agents are ``ztnet run`` processes running the traffic agent
(``ztnet.lab.traffic many``), the capture is ``ztnet.lab.sniff``,
the services are ``ztnet.lab.servers``/``ztnet.lab.dns``, addresses and policy come from
``ztnet.lab.topology``/``ztnet.lab.policy`` (labvm.py). On top: enrollment and the daemons'
state, the servers' own logs, and a revocation that cuts a live flow.

    python3 vagrant/e2e.py [--vagrant-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PY = "/ztnet/.venv/bin/python"
ZTNET = "/ztnet/.venv/bin/ztnet"
ADMIN = "ZTNET_CONTROLLER={ctl}:{port} ZTNET_CREDENTIALS=/root/ztnet-admin"
VMCHECK = "cd /ztnet && /ztnet/.venv/bin/python -m vagrant.vmcheck"
CAPTURE = "/tmp/ztnet-e2e-capture.jsonl"


class CheckFailed(Exception):
    pass


@dataclass
class Cluster:
    """SSH to the VMs with the configuration `vagrant ssh-config` prints (one multiplexed
    connection per VM: a new SSH handshake costs seconds under software emulation)."""

    vagrant_dir: Path
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ztnet-e2e-")))

    def __post_init__(self) -> None:
        config = subprocess.run(["vagrant", "ssh-config"], cwd=self.vagrant_dir, check=True,
                                capture_output=True, text=True).stdout
        self.config = self.workdir / "ssh-config"
        self.config.write_text(config)

    def ssh(self, vm: str, command: str, *, stdin: str | None = None, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        argv = ["ssh", "-F", str(self.config), "-o", "ControlMaster=auto",
                "-o", f"ControlPath={self.workdir}/%h.sock", "-o", "ControlPersist=600",
                "-o", "LogLevel=ERROR", vm, "sudo sh -c " + shlex.quote(command)]
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise CheckFailed(f"{vm}: `{command}` exited {done.returncode}: "
                              f"{(done.stderr or done.stdout).strip()[-600:]}")
        return done

    def close(self) -> None:
        for sock in self.workdir.glob("*.sock"):
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                           capture_output=True, check=False)


@dataclass
class Report:
    rows: list[tuple[str, bool, str, float]] = field(default_factory=list)

    def check(self, name: str, fn: Callable[[], str]) -> bool:
        start = time.monotonic()
        try:
            detail, ok = fn(), True
        except (CheckFailed, subprocess.TimeoutExpired, KeyError, ValueError) as exc:
            detail, ok = str(exc), False
        self.add(name, ok, detail, time.monotonic() - start)
        return ok

    def add(self, name: str, ok: bool, detail: str, seconds: float = 0.0) -> None:
        self.rows.append((name, ok, detail, seconds))
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)

    def table(self) -> str:
        width = max(len(r[0]) for r in self.rows)
        lines = [f"{'check':<{width}}  result  seconds  detail", "-" * (width + 40)]
        for name, ok, detail, seconds in self.rows:
            first = detail.splitlines()[0] if detail else ""
            lines.append(f"{name:<{width}}  {'PASS' if ok else 'FAIL':<6}  {seconds:7.1f}  "
                         f"{first[:110]}")
        passed = sum(ok for _, ok, _, _ in self.rows)
        lines.append(f"{passed} passed, {len(self.rows) - passed} failed")
        return "\n".join(lines)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


class E2E:
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        env = self.c.ssh("controller", f"{PY} /ztnet/vagrant/labvm.py env").stdout
        self.lab = dict(line.split("=", 1) for line in env.splitlines() if "=" in line)
        self.lab = {k: v.strip("'") for k, v in self.lab.items()}
        self.admin = ADMIN.format(ctl=self.lab["CONTROLLER_V4"], port=self.lab["CONTROLLER_PORT"])
        self.api_port, self.api_alt_port = map(int, self.lab["API_PORTS"].split())
        # agent host -> the agent it runs (topology.agent_for)
        self.agents = {vm: self.lab[f"{self.key(vm)}_AGENT"]
                       for vm in self.lab["AGENT_HOSTS"].split()}
        self.plan: dict[str, Any] = {}
        self.results: dict[str, list[dict[str, object]]] = {}
        self.raw: dict[str, list[dict[str, object]]] = {}
        self.sniffer_pid = ""

    @staticmethod
    def key(vm: str) -> str:
        return vm.upper().replace("-", "_")

    def host_ip(self, vm: str) -> str:
        return self.lab[f"{self.key(vm)}_V4"]

    # --- helpers ---------------------------------------------------------------------------

    def operator(self, args: str) -> str:
        return self.c.ssh("controller", f"{self.admin} {ZTNET} {args}").stdout

    def run_attempts(self, vm: str, agent: str | None, attempts: list[dict[str, object]], *,
                     user: str | None = "nobody") -> list[dict[str, object]]:
        """The lab's traffic agent (`python -m ztnet.lab.traffic many -`) as ``agent`` under
        `ztnet run` (as ``user``; None: root), or unconfined when agent is None -- like
        Lab.run_attempts."""
        traffic = f"{PY} -m ztnet.lab.traffic many - --timeout 5"
        run = f"{ZTNET} run --agent {agent}" + (f" --user {user}" if user else " --allow-root")
        out = self.c.ssh(vm, f"{run} -- {traffic}" if agent else traffic,
                         stdin=json.dumps(attempts)).stdout
        results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        expect(len(results) == len(attempts), f"{vm}: {len(results)} results for "
               f"{len(attempts)} attempts: {out.strip()}")
        return results

    def lab_iface(self, vm: str, address: str) -> str:
        return self.c.ssh(vm, f"ip -o -4 addr show | awk 'index($4, \"{address}/\") == 1 "
                              "{print $2; exit}'").stdout.strip()

    # --- checks ----------------------------------------------------------------------------

    def topology(self) -> str:
        missing = []
        vms = {"controller": ["CONTROLLER_V4", "CONTROLLER_V6"],
               **{vm: [f"{self.key(vm)}_V4", f"{self.key(vm)}_V6"] for vm in self.agents},
               "services": ["API_V4", "API_V6", "EXFIL_V4", "EXFIL_V6", "DNS_V4", "DNS_V6"]}
        for vm, keys in vms.items():
            have = self.c.ssh(vm, "ip -o addr show").stdout
            missing += [f"{vm}:{self.lab[k]}" for k in keys if f" {self.lab[k]}/" not in have]
        expect(not missing, f"addresses of ztnet.lab.topology missing: {missing}")
        return "every VM holds its lab addresses (ztnet/lab/topology.py)"

    def controller_up(self) -> str:
        self.c.ssh("controller", "systemctl is-active --quiet ztnet-controller")
        return "ztnet-controller active; policy from ztnet/lab/policy.py"

    def enrolled(self) -> str:
        table = self.operator("hosts")
        rows = {line.split()[0]: line.split() for line in table.splitlines()[1:] if line.split()}
        for vm in self.agents:
            expect(vm in rows, f"{vm} not enrolled:\n{table}")
            # HOST APPLIED IN-SYNC CONNECTED …
            expect(rows[vm][2:4] == ["yes", "yes"], f"{vm} not in sync and connected:\n{table}")
        return ", ".join(f"{vm} v{rows[vm][1]}" for vm in self.agents) + " in sync, connected"

    def enforcing(self, vm: str) -> str:
        self.c.ssh(vm, "systemctl is-active --quiet ztnet-daemon")
        status = dict(line.split(":", 1) for line in
                      self.c.ssh(vm, f"{ZTNET} status").stdout.splitlines()
                      if ":" in line and not line.startswith(" "))
        expect(status.get("enforcing", "").strip() == "yes", f"{vm} not enforcing: {status}")
        agent, agents = self.agents[vm], self.c.ssh(vm, f"{ZTNET} agents").stdout
        expect(agent in agents, f"{agent} not among the agents on {vm}:\n{agents}")
        return (f"ztnet-daemon active, enforcing, {status['grants'].strip()} grants; "
                f"agent {agent} registered")

    def start_sniffer(self) -> str:
        iface = self.lab_iface("services", self.lab["API_V4"])
        expect(bool(iface), "no lab interface on services")
        self.sniffer_pid = self.c.ssh("services", (
            f"rm -f {CAPTURE} /tmp/ztnet-e2e-sniff.log; cd /tmp && "
            f"PYTHONUNBUFFERED=1 nohup {PY} -m ztnet.lab.sniff --iface {iface} "
            f"--out {CAPTURE} > /tmp/ztnet-e2e-sniff.log 2>&1 & "
            "echo $!")).stdout.strip()
        deadline = time.monotonic() + 180
        while "READY" not in self.c.ssh("services", "cat /tmp/ztnet-e2e-sniff.log").stdout:
            expect(time.monotonic() < deadline, "the sniffer did not start")
            time.sleep(2)
        return f"ztnet.lab.sniff capturing on services {iface} (pid {self.sniffer_pid})"

    def traffic(self) -> str:
        """The lab test's matrix from each agent host (as nobody, and raw sockets as root
        inside the agent's cgroup), then the unconfined positive controls."""
        self.plan = json.loads(self.c.ssh("controller", VMCHECK + " plan").stdout)
        for vm, what in self.plan.items():
            self.results[vm] = self.run_attempts(vm, what["agent"], what["attempts"])
            self.raw[vm] = self.run_attempts(vm, what["agent"], what["raw"], user=None)
        for vm, what in self.plan.items():
            self.run_attempts(vm, None, what["controls"])
        sizes = ", ".join(f"{vm} {len(w['attempts']) + len(w['raw'])}"
                          for vm, w in self.plan.items())
        return f"attempts from ztnet/lab/scenarios.py: {sizes}"

    def judge(self, packets: list[str]) -> list[tuple[str, bool, str]]:
        """vmcheck.py judges the evidence; the daemons upload flows in batches, so the
        verdicts are judged again until the flow store has them all (for up to 90 s)."""
        deadline = time.monotonic() + 90
        while True:
            flows = self.operator("flows --json --limit 10000 --since 2h").splitlines()
            evidence = {"results": self.results, "raw": self.raw, "packets": packets,
                        "flows": flows}
            out = self.c.ssh("controller", VMCHECK + " judge", stdin=json.dumps(evidence)).stdout
            rows = [(str(name), bool(ok), str(detail)) for name, ok, detail in
                    (json.loads(line) for line in out.splitlines() if line.startswith("["))]
            if all(ok for _, ok, _ in rows) or time.monotonic() > deadline:
                return rows
            time.sleep(5)

    def stop_sniffer(self) -> list[str]:
        """Once the positive controls of every agent host were captured: stop, and return
        the capture (JSON lines of ztnet.lab.sniff.CapturedPacket)."""
        sources = {f'"src": "{self.host_ip(vm)}"' for vm in self.plan}
        deadline = time.monotonic() + 30
        while True:
            lines = self.c.ssh("services", f"cat {CAPTURE}").stdout.splitlines()
            seen = {s for s in sources for line in lines
                    if s in line and f'"dport": {self.lab["CONTROL_PORT"]},' in line}
            if seen == sources or time.monotonic() > deadline:
                break
            time.sleep(2)
        self.c.ssh("services", f"kill -TERM {self.sniffer_pid}; "
                               f"while kill -0 {self.sniffer_pid} 2>/dev/null; do sleep 1; done")
        text = self.c.ssh("services", f"cat {CAPTURE}").stdout
        return [line for line in text.splitlines() if line.startswith("{")]

    def server_events(self, unit: str) -> list[dict[str, Any]]:
        text = self.c.ssh("services", f"journalctl -u {unit} -o cat --no-pager").stdout
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def revoke_cuts(self, vm: str) -> str:
        """`ztnet revoke` of every grant of ``vm``'s agent cuts its established flow to the
        api; new connections get EPERM; `--restore` gives the access back."""
        api4, agent = self.lab["API_V4"], self.agents[vm]
        hold = (f"{ZTNET} run --agent {agent} --user nobody -- {PY} -m ztnet.lab.traffic "
                f"hold {api4} {self.api_port} --interval 0.5 --limit 300 --timeout 5")
        self.c.ssh(vm, f"rm -f /tmp/ztnet-e2e-hold.log; nohup {hold} "
                             "> /tmp/ztnet-e2e-hold.log 2>&1 &")

        def hold_log() -> str:
            return self.c.ssh(vm, "cat /tmp/ztnet-e2e-hold.log").stdout

        deadline = time.monotonic() + 120
        while '"connected"' not in hold_log():
            expect(time.monotonic() < deadline, f"the held flow did not connect: {hold_log()}")
            time.sleep(1)
        self.operator(f"revoke --agent {agent}")
        try:
            deadline = time.monotonic() + 60
            while '"broken"' not in hold_log():
                expect(time.monotonic() < deadline, f"the flow survived the revocation: "
                                                    f"{hold_log()}")
                time.sleep(1)
            broken = json.loads(hold_log().strip().splitlines()[-1])
            after = self.run_attempts(vm, agent, [
                {"kind": "tcp", "host": api4, "port": self.api_port}])[0]
            expect(after["result"] == "EPERM", f"new connection after revoke: {after}")
        finally:
            self.operator(f"revoke --agent {agent} --restore")
        again = self.run_attempts(vm, agent, [
            {"kind": "tcp", "host": api4, "port": self.api_port}])[0]
        expect(again["result"] == "OK", f"connection after --restore: {again}")
        return (f"held flow cut ({broken['result']}), new connect EPERM; after --restore OK")


def run(vagrant_dir: Path) -> int:
    started = time.monotonic()
    cluster = Cluster(vagrant_dir)
    report = Report()
    try:
        e = E2E(cluster)
        agents = {e.host_ip(vm) for vm in e.agents}
        report.check("VM addresses = ztnet.lab topology", e.topology)
        report.check("controller up", e.controller_up)
        report.check("hosts enrolled, policy applied", e.enrolled)
        report.check("host-a daemon enforcing", lambda: e.enforcing("host-a"))
        report.check("host-b daemon enforcing", lambda: e.enforcing("host-b"))
        if not report.check("sniffer on services", e.start_sniffer):
            raise CheckFailed("no sniffer")
        try:
            traffic_ok = report.check("lab matrix traffic ran", e.traffic)
        finally:
            packets = e.stop_sniffer()
        if traffic_ok:
            for name, ok, detail in e.judge(packets):
                report.add(name, ok, detail)

        def servers() -> str:
            exfil = [ev for ev in e.server_events("ztnet-lab-exfil")
                     if ev.get("peer") and ev["peer"][0] in agents]
            expect(not exfil, f"the exfil server saw agent traffic: {exfil}")
            api = [ev for ev in e.server_events("ztnet-lab-api")
                   if ev["event"] == "data" and ev["peer"][0] == e.host_ip("host-a")]
            expect(bool(api), "the api server received nothing from host-a")
            return "exfil server saw nothing from the agents; api received host-a's payload"

        report.check("server logs: exfil silent, api received", servers)
        report.check("revoke cuts research-bot's live flow", lambda: e.revoke_cuts("host-a"))
    except CheckFailed as exc:
        report.add("(aborted)", False, str(exc))
    finally:
        cluster.close()
    print()
    print(report.table())
    print(f"e2e checks took {time.monotonic() - started:.0f}s")
    return 0 if all(ok for _, ok, _, _ in report.rows) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vagrant-dir", type=Path, default=Path(__file__).resolve().parent)
    return run(parser.parse_args().vagrant_dir)


if __name__ == "__main__":
    sys.exit(main())
