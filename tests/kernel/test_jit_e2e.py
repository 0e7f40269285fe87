"""Just-in-time grants end to end: a real controller, an enrolled host's real daemon, agents
in a network namespace, the real kernel.

* an operator's grant works from the moment the host acknowledged it until its ttl, and not
  after, with nobody removing it (the controller is stopped): new connects get EPERM and the
  established connection stops carrying data, both at the kernel's deadline;
* `ztnet request-grant` through the daemon's socket: outside the auto-approve rules the
  request waits (EPERM), approving it opens the path, denying never does; and the host
  cannot ask for an agent the policy runs elsewhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair
from ztnet.lab.servers import ServerProcess
from ztnet.testing.agents import LineProcess, agent_argv, run_traffic, traffic_argv
from ztnet.testing.controller import TRUST_DOMAIN, ControllerProcess, create_token, init_controller
from ztnet.testing.daemon import DaemonProcess

HOST = "jithost"
A, B, C = 8080, 7070, 9090
AGENT = "bot"


@dataclass
class Lab:
    instance: Instance
    pair: NetnsPair
    state: Path

    def attempt(self, port: int) -> str:
        return str(run_traffic(self.instance, AGENT, ["tcp", self.pair.b.ipv4, str(port)],
                               netns=self.pair.a.netns, user="nobody")["result"])


@pytest.fixture
def lab(instance: Instance, tmp_path: Path) -> Iterator[Lab]:
    with NetnsPair() as pair, ServerProcess(pair.b.netns, bind=[pair.b.ipv4], tcp=[A, B, C]):
        yield Lab(instance, pair, tmp_path / "state")


def write_policy(path: Path, lab: Lab) -> Path:
    path.write_text(f"""trust_domain = "{TRUST_DOMAIN}"
[agents.{AGENT}]
[[agents.{AGENT}.allow]]
to = "{lab.pair.b.ipv4}"
ports = "{A}"

[agents.elsewhere]
hosts = ["otherhost"]

[jit]
max_ttl = "10m"
""")
    return path


def ztnet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ztnet.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def enroll_host(controller: ControllerProcess, state: Path) -> None:
    """`ztnet enroll` with a fresh token, as on a real host."""
    from cryptography import x509

    from ztnet.pki import fingerprint

    token = create_token(controller.state, HOST)
    ca = fingerprint(x509.load_pem_x509_certificate(controller.state.ca_pem))
    done = ztnet("enroll", "--controller", controller.enroll_address, f"--token={token}",
                 "--ca-fingerprint", ca, "--state", str(state), "--host", HOST)
    assert done.returncode == 0, done.stderr


def applied(event: dict[str, object]) -> bool:
    return event.get("event") == "bundle applied"


def test_a_jit_grant_works_until_its_ttl_and_not_after_with_nobody_removing_it(
        lab: Lab, tmp_path: Path) -> None:
    state = init_controller(tmp_path / "ctl")
    with ControllerProcess(state, policy=write_policy(tmp_path / "policy.toml", lab)) as ctl:
        enroll_host(ctl, lab.state)
        with DaemonProcess(lab.instance, None, None, lab.state, controller=ctl.address) as d:
            d.wait_event(applied)
            assert (lab.attempt(A), lab.attempt(B)) == ("OK", "EPERM")
            with ctl.admin() as admin:
                response = admin.issue_grant(AGENT, lab.pair.b.ipv4, str(B), ttl=8,
                                             reason="TICKET-42")
            assert [(r.host, r.outcome) for r in response.results] == [(HOST, "ack")]
            not_after = response.grant.not_after
            assert lab.attempt(B) == "OK"
            holder = LineProcess.start(agent_argv(lab.instance, AGENT, traffic_argv(
                "hold", lab.pair.b.ipv4, str(B), "--limit", "30", "--timeout", "0.5"),
                netns=lab.pair.a.netns, user="nobody"))
            try:
                assert holder.read()["event"] == "connected"
                # nobody will remove the grant: the controller goes away
                assert ctl.stop() == 0
                broken = holder.read()
                broke_at = time.time()
            finally:
                holder.kill()
            # the echo that went unanswered was sent at most --timeout before it was noticed
            assert broken["event"] == "broken" and broken["result"] == "TIMEOUT", broken
            assert broke_at >= not_after, (broke_at, not_after)
            assert broke_at - not_after < 5.0
            assert (lab.attempt(B), lab.attempt(A)) == ("EPERM", "OK")
            flows = [json.loads(line) for line in (lab.state / "flows.jsonl").read_text()
                     .splitlines()]
            grants = {str((f.get("grant") or {}).get("id", "")) for f in flows}
            assert response.grant.grant_id in grants, "the flow trace names the JIT grant"


def request_grant(lab: Lab, port: int, *extra: str, agent: str = AGENT
                  ) -> tuple[int, dict[str, object], str]:
    done = ztnet("request-grant", "--state", str(lab.state), "--agent", agent, "--to",
                 lab.pair.b.ipv4, "--ports", str(port), "--ttl", "2m", "--reason",
                 f"need port {port}", "--json", *extra)
    answer = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, answer, done.stderr


def test_requests_wait_for_an_operator_approve_opens_deny_never(
        lab: Lab, tmp_path: Path) -> None:
    state = init_controller(tmp_path / "ctl")
    with ControllerProcess(state, policy=write_policy(tmp_path / "policy.toml", lab)) as ctl:
        enroll_host(ctl, lab.state)
        with DaemonProcess(lab.instance, None, None, lab.state, controller=ctl.address) as d, \
                ctl.admin() as admin:
            d.wait_event(applied)
            code, wanted, _ = request_grant(lab, B)
            assert (code, wanted["state"]) == (3, "pending"), wanted
            code, unwanted, _ = request_grant(lab, C)
            assert (code, unwanted["state"]) == (3, "pending")
            assert (lab.attempt(B), lab.attempt(C)) == ("EPERM", "EPERM")

            decided = admin.decide_grant_request(str(wanted["request_id"]), approve=True,
                                                 wait=10)
            assert [(r.host, r.outcome) for r in decided.results] == [(HOST, "ack")]
            admin.decide_grant_request(str(unwanted["request_id"]), approve=False, note="no")
            assert (lab.attempt(B), lab.attempt(C)) == ("OK", "EPERM")
            code, status, _ = request_grant(lab, C)  # a new request: pending again
            assert code == 3
            listed = {r.id: r.state for r in admin.list_grant_requests().requests}
            assert listed[str(unwanted["request_id"])] == "denied"
            assert listed[str(wanted["request_id"])] == "approved"
            assert listed[str(status["request_id"])] == "pending"

            code, _, error = request_grant(lab, B, agent="elsewhere")
            assert code != 0 and "PERMISSION_DENIED" in error and "does not run" in error
