"""The wire protocol is not Python-bound: a Node.js client (@grpc/grpc-js, the protocol
loaded from proto/ at run time) calls the health and admin APIs of a real controller over
mutual TLS with an admin credential directory.

Skips when node or the client's packages are missing (`make setup` runs `npm ci` when npm
is installed); ZTNET_REQUIRE_NODE=1 turns that skip into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ztnet.testing.controller import ControllerProcess, init_controller, policy_toml, write_policy
from ztnet.testing.nodes import enroll

CLIENT_DIR = Path(__file__).resolve().parent / "node_client"
REQUIRE_ENV = "ZTNET_REQUIRE_NODE"


def node_or_skip() -> str:
    node = shutil.which("node")
    reason = None
    if node is None:
        reason = "needs node (Node.js) on PATH"
    elif not (CLIENT_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        reason = f"needs the client's packages: run `npm ci` in {CLIENT_DIR} (make setup does)"
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_ENV}=1 is set)", pytrace=False)
        pytest.skip(reason)
    assert node is not None
    return node


def run_client(node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([node, str(CLIENT_DIR / "client.js"), *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_node_client_calls_health_and_admin_apis_over_mutual_tls(tmp_path: Path) -> None:
    node = node_or_skip()
    state = init_controller(tmp_path / "ctl")
    rules = {"bot": [("10.0.0.1", "443")]}
    with ControllerProcess(state, policy=write_policy(tmp_path, rules)) as controller:
        host = enroll(controller, "web-1")
        done = run_client(node, "--controller", controller.address,
                          "--credentials", str(controller.admin_dir))
        assert done.returncode == 0, done.stderr
        output = json.loads(done.stdout)
        assert output["health"] == "SERVING"
        assert [entry["name"] for entry in output["hosts"]] == ["web-1"]
        assert output["hosts"][0]["spiffe_id"] == "spiffe://test.example/host/web-1"
        assert output["policy"]["version"] >= 1
        assert output["policy"]["policy_toml"] == policy_toml(rules)

        # a host certificate gets through mutual TLS, but not into the admin API
        as_host = tmp_path / "host-creds"
        as_host.mkdir()
        (as_host / "ca.pem").write_bytes(host.ca_pem)
        (as_host / "admin.key").write_bytes(host.key_pem)
        (as_host / "admin.pem").write_bytes(host.cert_pem)
        refused = run_client(node, "--controller", controller.address,
                             "--credentials", str(as_host))
        assert refused.returncode == 1 and refused.stdout == ""
        # (node may print warnings first: the error is the last line)
        error = json.loads(refused.stderr.strip().splitlines()[-1])
        assert error["error"] == "PERMISSION_DENIED", refused.stderr
        assert "host certificate" in error["details"]
