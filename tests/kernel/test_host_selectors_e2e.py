"""Host selectors end to end: a real controller, a host enrolled with labels (`controller
token create --label`), its real daemon and agents in a network namespace. An agent whose
selector does not match the host has no network there, and its grants are not even in the
bundle the host holds; relabelling the host (`ztnet label`) opens the path at once, and
relabelling it back cuts the established connection."""

from __future__ import annotations

import json
from pathlib import Path

from tests.kernel.controller_lab import PORTS, Lab, enroll_with_cli, ztnet
from ztnet.testing.agents import LineProcess, agent_argv, traffic_argv
from ztnet.testing.controller import TRUST_DOMAIN, ControllerProcess, init_controller
from ztnet.testing.daemon import DaemonProcess

HOST = "selhost"
A, B = PORTS[:2]


def applied_agents(state: Path) -> set[str]:
    """The agents named anywhere in the signed payload the host holds on disk."""
    import base64

    envelope = json.loads((state / "applied-bundle.json").read_bytes())
    payload = base64.b64decode(envelope["payload"]).decode()
    return {agent for agent in ("trainer", "ops")
            if f"spiffe://{TRUST_DOMAIN}/agent/{agent}" in payload}


def test_labels_select_the_hosts_grants_and_relabelling_takes_effect_at_once(
        lab: Lab, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""trust_domain = "{TRUST_DOMAIN}"
[agents.trainer]
hosts = {{ env = "prod", role = "gpu" }}
[[agents.trainer.allow]]
to = "{lab.pair.b.ipv4}"
ports = "{A}"

[agents.ops]
[[agents.ops.allow]]
to = "{lab.pair.b.ipv4}"
ports = "{B}"
""")
    state = init_controller(tmp_path / "ctl")
    with ControllerProcess(state, policy=policy) as controller:
        created = ztnet("controller", "token", "create", "--state", str(state.root), "--host",
                        HOST, "--label", "env=dev", "--label", "role=gpu", "--json")
        assert created.returncode == 0, created.stderr
        enroll_with_cli(controller, lab.state, HOST, json.loads(created.stdout)["token"])
        with DaemonProcess(lab.instance, None, None, lab.state,
                           controller=controller.address) as daemon, \
                controller.admin() as admin:
            daemon.wait_event(lambda e: e.get("event") == "bundle applied")
            assert (lab.attempt("trainer", A), lab.attempt("ops", B)) == ("EPERM", "OK")
            assert applied_agents(lab.state) == {"ops"}

            changed = admin.label_host(HOST, {"env": "prod"}, [], wait=10)
            assert [(r.host, r.outcome) for r in changed.results] == [(HOST, "ack")]
            assert (lab.attempt("trainer", A), lab.attempt("ops", B)) == ("OK", "OK")
            assert applied_agents(lab.state) == {"trainer", "ops"}

            holder = LineProcess.start(agent_argv(lab.instance, "trainer", traffic_argv(
                "hold", lab.pair.b.ipv4, str(A), "--limit", "30"),
                netns=lab.pair.a.netns, user="nobody"))
            try:
                assert holder.read()["event"] == "connected"
                back = admin.label_host(HOST, {}, ["role"], wait=10)
                assert [r.outcome for r in back.results] == ["ack"]
                broken = holder.read()
            finally:
                holder.kill()
            assert (broken["event"], broken["result"]) == ("broken", "ECONNABORTED"), broken
            assert (lab.attempt("trainer", A), lab.attempt("ops", B)) == ("EPERM", "OK")
            assert applied_agents(lab.state) == {"ops"}
