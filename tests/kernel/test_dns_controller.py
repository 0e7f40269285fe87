"""Hostname grants through a real controller: signed into the host's bundle by the
controller, enforced by a real `ztnet daemon --dns` that follows it, and revoked by an
operator's ApplyPolicy: the name is REFUSED from then on, the address the agent learned gets
EPERM, and the connection the agent held to it is cut."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.kernel.controller_lab import enroll_with_cli
from ztnet.instance import Instance
from ztnet.testing.controller import ControllerProcess, init_controller
from ztnet.testing.daemon import HOST
from ztnet.testing.dnslab import API_V4, ECHO_PORT, dns_lab, policy

STUB = "10.255.255.53"  # any address: the hooks redirect port 53 wherever it points
API_RULE = f'[[agents.bot.allow]]\nto = "api.lab.test"\nports = "{ECHO_PORT}"\n'


def token(controller: ControllerProcess) -> str:
    created = subprocess.run([sys.executable, "-m", "ztnet.cli", "controller", "token", "create",
                              "--state", str(controller.state.root), "--host", HOST, "--json"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert created.returncode == 0, created.stderr
    return str(json.loads(created.stdout)["token"])


def test_a_hostname_grant_revoked_through_the_controller_refuses_denies_and_cuts(
        instance: Instance, tmp_path: Path) -> None:
    granted = policy()
    assert API_RULE in granted
    revoked = granted.replace(API_RULE, "", 1)  # bot loses api.lab.test; other keeps it
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(granted)
    state = tmp_path / "host"
    with ControllerProcess(init_controller(tmp_path / "ctl"), policy=policy_file) as controller:
        enroll_with_cli(controller, state, HOST, token(controller))
        with dns_lab(instance, controller=controller.address, state=state) as lab, \
                controller.admin() as admin:
            assert API_V4 in lab.dnsagent("resolve", "api.lab.test")["addresses"]
            assert lab.dnsagent("connect", API_V4, str(ECHO_PORT)) == {"result": "OK"}
            holder = lab.hold("api.lab.test")
            try:
                assert holder.stdout is not None and holder.stdin is not None
                assert json.loads(holder.stdout.readline()) == {"connected": API_V4}
                response = admin.apply_policy(revoked)
                assert [(r.host, r.outcome) for r in response.results] == [(HOST, "ack")]
                holder.stdin.write("after the revocation\n")
                holder.stdin.flush()
                reply = json.loads(holder.stdout.readline())
                assert "echo" not in reply, reply  # cut, not merely refused later
            finally:
                holder.kill()
                holder.wait()
            assert lab.dnsagent("query", "api.lab.test", "A", STUB)["rcode"] == "REFUSED"
            assert lab.dnsagent("connect", API_V4, str(ECHO_PORT)) == {"result": "EPERM"}
            # the same name stays granted to the agent that still holds its grant
            assert API_V4 in lab.dnsagent("resolve", "api.lab.test", agent="other")["addresses"]
            assert lab.dnsagent("connect", API_V4, str(ECHO_PORT), agent="other") == {
                "result": "OK"}
