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

import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.kernel.controller_lab import PORTS, Lab, enroll_with_cli, ztnet
from ztnet.cli.operator import flows
from ztnet.daemon.requests import RequestSocket, ask
from ztnet.identity.cgroups import ensure_agent_cgroup, remove_tree
from ztnet.instance import Instance
from ztnet.testing.agents import LineProcess, agent_argv, traffic_argv
from ztnet.testing.controller import TRUST_DOMAIN, ControllerProcess, create_token, init_controller
from ztnet.testing.daemon import DaemonProcess
from ztnet.v1 import node_pb2

HOST = "jithost"
A, B, C = PORTS
AGENT = "bot"


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


def enroll_host(controller: ControllerProcess, state: Path) -> None:
    enroll_with_cli(controller, state, HOST, create_token(controller.state, HOST))


def applied(event: dict[str, object]) -> bool:
    return event.get("event") == "bundle applied"


def test_a_jit_grant_works_until_its_ttl_and_not_after_with_nobody_removing_it(
        lab: Lab, tmp_path: Path) -> None:
    state = init_controller(tmp_path / "ctl")
    with ControllerProcess(state, policy=write_policy(tmp_path / "policy.toml", lab)) as ctl:
        enroll_host(ctl, lab.state)
        with DaemonProcess(lab.instance, None, None, lab.state, controller=ctl.address) as d:
            d.wait_event(applied)
            assert (lab.attempt(AGENT, A), lab.attempt(AGENT, B)) == ("OK", "EPERM")
            with ctl.admin() as admin:
                response = admin.issue_grant(AGENT, lab.pair.b.ipv4, str(B), ttl=8,
                                             reason="TICKET-42")
            assert [(r.host, r.outcome) for r in response.results] == [(HOST, "ack")]
            not_after = response.grant.not_after
            assert lab.attempt(AGENT, B) == "OK"
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
            assert (lab.attempt(AGENT, B), lab.attempt(AGENT, A)) == ("EPERM", "OK")
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
            assert (lab.attempt(AGENT, B), lab.attempt(AGENT, C)) == ("EPERM", "EPERM")

            decided = admin.decide_grant_request(str(wanted["request_id"]), approve=True,
                                                 wait=10)
            assert [(r.host, r.outcome) for r in decided.results] == [(HOST, "ack")]
            admin.decide_grant_request(str(unwanted["request_id"]), approve=False, note="no")
            assert (lab.attempt(AGENT, B), lab.attempt(AGENT, C)) == ("OK", "EPERM")
            code, status, _ = request_grant(lab, C)  # a new request: pending again
            assert code == 3
            listed = {r.id: r.state for r in admin.list_grant_requests().requests}
            assert listed[str(unwanted["request_id"])] == "denied"
            assert listed[str(wanted["request_id"])] == "approved"
            assert listed[str(status["request_id"])] == "pending"

            code, _, error = request_grant(lab, B, agent="elsewhere")
            assert code != 0 and "PERMISSION_DENIED" in error and "does not run" in error

            # the trace of the allowed connect names the grant; `ztnet flows` its reason
            legend = f"flows: {decided.grant.grant_id} is a just-in-time grant for {AGENT}, " \
                f"approved by ops (host:{HOST}): need port {B}"
            deadline = time.monotonic() + 30
            while True:
                out, err = io.StringIO(), io.StringIO()
                flows(admin, agent=AGENT, as_json=True, out=out, err=err)
                if legend in err.getvalue():
                    break
                assert time.monotonic() < deadline, err.getvalue()
                time.sleep(0.2)  # the daemon uploads its flow records in batches
            assert decided.grant.grant_id in out.getvalue()


def test_a_process_of_an_agent_may_ask_only_for_itself(instance: Instance,
                                                       tmp_path: Path) -> None:
    """The daemon's socket on its own (no controller: what it would forward is recorded),
    asked by a process placed in agent bot's cgroup (without `ztnet run`'s seccomp filter,
    which would refuse it the unix socket at all) and by one outside every agent."""
    forwarded: list[str] = []

    def call(invoke: Callable[[Any], Any]) -> node_pb2.RequestGrantResponse:
        class Stub:
            def RequestGrant(self, request: node_pb2.RequestGrantRequest,  # noqa: N802
                             timeout: float) -> node_pb2.RequestGrantResponse:
                forwarded.append(request.agent)
                return node_pb2.RequestGrantResponse(request_id="r-1", state="pending")
        return invoke(Stub())  # type: ignore[no-any-return]

    path = tmp_path / "requests.sock"
    cgroup = ensure_agent_cgroup(instance, AGENT)
    server = RequestSocket(path, call, instance=instance)
    server.start()
    try:
        script = ("import json, sys\nfrom pathlib import Path\n"
                  "from ztnet.identity.cgroups import join\n"
                  "from ztnet.daemon.requests import ask\n"
                  "join(Path(sys.argv[1]))\n"
                  "for agent in ('elsewhere', 'bot'):\n"
                  "    print(json.dumps(ask(Path(sys.argv[2]), {'op': 'request', 'agent': agent,"
                  " 'to': '10.0.0.1', 'ports': '443', 'proto': 'tcp', 'ttl': 60,"
                  " 'reason': 'x'})))\n")
        done = subprocess.run([sys.executable, "-c", script, str(cgroup), str(path)],
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        answers = [json.loads(line) for line in done.stdout.splitlines()]
        assert answers[0] == {"ok": False, "error": f"agent: a process of agent {AGENT} may "
                              "ask only for itself"}
        assert answers[1]["ok"] and answers[1]["request_id"] == "r-1"
        # outside every agent's cgroup (the host's own software): any agent, checked by the
        # controller
        assert ask(path, {"op": "request", "agent": "elsewhere", "to": "10.0.0.1",
                          "ports": "443", "proto": "tcp", "ttl": 60, "reason": "x"})["ok"]
        for bad, problem in (({"op": "nope"}, "op:"), ({"op": "status", "x": "1"}, "unknown"),
                             ({"op": "request", "ttl": "60"}, "ttl:"),
                             ({"op": "status", "request_id": 7}, "expected a string")):
            answer = ask(path, bad)
            assert not answer["ok"] and problem in answer["error"], answer
        assert forwarded == [AGENT, "elsewhere"]
    finally:
        server.stop()
        remove_tree(cgroup)
