"""The `ztnet controller …` and operator commands as real processes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509

from ztnet import cli, pki
from ztnet.cli import run
from ztnet.testing.controller import ROOT, ControllerProcess, ControllerState, write_policy
from ztnet.testing.nodes import FakeNode, enroll


def ztnet(*args: str | Path, env: dict[str, str] | None = None,
          stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ztnet.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, input=stdin,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def ztnet_background(*args: str | Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ztnet.cli", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_init_creates_a_private_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = ztnet("controller", "init", "--state", state, "--trust-domain", "example.org",
                   "--san", "ctl.example.org", "--san", "192.0.2.10")
    assert result.returncode == 0, result.stderr
    assert mode(state) == 0o700
    for name in ("ca.key", "signing.key", "server.key", "ztnet.db"):
        assert mode(state / name) == 0o600, name
    for name in ("ca.pem", "signing.pub", "server.pem"):
        assert mode(state / name) == 0o644, name
    ca_cert = x509.load_pem_x509_certificate((state / "ca.pem").read_bytes())
    assert f"CA fingerprint (SHA-256): {pki.fingerprint(ca_cert)}" in result.stdout
    server = x509.load_pem_x509_certificate((state / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "ctl.example.org"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == \
        {"127.0.0.1", "::1", "192.0.2.10"}
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == \
        ["spiffe://example.org/controller"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_init_never_overwrites(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert ztnet("controller", "init", "--state", state, "--trust-domain", "a.org").returncode == 0
    key = (state / "ca.key").read_bytes()
    again = ztnet("controller", "init", "--state", state, "--trust-domain", "a.org")
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    assert (state / "ca.key").read_bytes() == key
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    assert ztnet("controller", "init", "--state", empty, "--trust-domain", "a.org").returncode == 0
    assert mode(empty) == 0o700


def test_init_refuses_a_bad_trust_domain(tmp_path: Path) -> None:
    result = ztnet("controller", "init", "--state", tmp_path / "s", "--trust-domain", "Not Ok")
    assert result.returncode == 2 and "trust domain" in result.stderr
    assert not (tmp_path / "s").exists()


def test_token_create_json(state: ControllerState) -> None:
    result = ztnet("controller", "token", "create", "--state", state.root, "--host", "web-json",
                   "--ttl", "1h", "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert set(printed) == {"token", "ca_fingerprint"}
    assert printed["ca_fingerprint"] == pki.fingerprint(
        x509.load_pem_x509_certificate(state.ca_pem))
    bad = ztnet("controller", "token", "create", "--state", state.root, "--host", "x",
                "--ttl", "0s")
    assert bad.returncode == 2 and "greater than zero" in bad.stderr


def test_admin_cert_writes_a_credential_directory(state: ControllerState,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "alice"
    result = ztnet("controller", "admin-cert", "--state", state.root, "--out", out,
                   "--name", "alice")
    assert result.returncode == 0, result.stderr
    assert mode(out) == 0o700 and mode(out / "admin.key") == 0o600
    assert (out / "ca.pem").read_bytes() == state.ca_pem
    cert = x509.load_pem_x509_certificate((out / "admin.pem").read_bytes())
    assert pki.certificate_identity(cert).uri == "spiffe://test.example/admin/alice"
    again = ztnet("controller", "admin-cert", "--state", state.root, "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_agents_stays_local_unless_controller_is_given() -> None:
    parser = cli.build_parser()
    local = parser.parse_args(["agents", "--credentials", "/x"])
    assert local.handler is run.handle_agents and local.controller is None
    remote = parser.parse_args(["agents", "--controller", "ctl:7443"])
    assert remote.handler is run.handle_agents and remote.controller == "ctl:7443"
    assert parser.parse_args(["agents", "--controller"]).controller == ""  # $ZTNET_CONTROLLER
    assert parser.parse_args(["policy", "check", "p.toml"]).policy == "p.toml"
    assert parser.parse_args(["policy", "apply", "p.toml"]).policy == Path("p.toml")


def test_agents_controller_without_address_uses_the_environment() -> None:
    clean = {key: "" for key in ("ZTNET_CONTROLLER", "ZTNET_CREDENTIALS")}
    bare = ztnet("agents", "--controller", env=clean)
    assert bare.returncode == 2 and "no controller address" in bare.stderr
    from_env = ztnet("agents", "--controller", env={**clean, "ZTNET_CONTROLLER": "127.0.0.1:1"})
    assert from_env.returncode == 2 and "no admin credentials" in from_env.stderr


def test_each_command_module_registers_on_its_own_in_any_order() -> None:
    for module in cli.COMMANDS:
        module.register(argparse.ArgumentParser().add_subparsers(dest="command"))
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    for module in reversed(cli.COMMANDS):
        module.register(sub)
    assert parser.parse_args(["policy", "apply", "p.toml"]).policy == Path("p.toml")
    assert parser.parse_args(["agents", "--controller", "x:1"]).controller == "x:1"


def operator_env(controller: ControllerProcess) -> dict[str, str]:
    return {"ZTNET_CONTROLLER": controller.address,
            "ZTNET_CREDENTIALS": str(controller.admin_dir)}


def test_operator_commands(controller: ControllerProcess, workdir: Path) -> None:
    env = operator_env(controller)
    hosts = ztnet("hosts", env=env)
    assert hosts.returncode == 0, hosts.stderr
    assert hosts.stdout.split()[:6] == ["HOST", "APPLIED", "IN", "SYNC", "CONNECTED", "LAST"]
    agents = ztnet("agents", "--controller", env=env)
    assert agents.returncode == 0, agents.stderr
    assert "spiffe://test.example/agent/bot" in agents.stdout
    show = ztnet("policy", "show", env=env)
    assert show.returncode == 0 and 'trust_domain = "test.example"' in show.stdout
    unknown = ztnet("revoke", "--agent", "ghost", env=env)
    assert unknown.returncode == 6
    assert unknown.stderr.startswith(f"ztnet: controller: {controller.address}: NOT_FOUND")


@pytest.mark.parametrize("answer, code", [("ack", 0), ("nack", 6)])
def test_policy_apply_prints_each_hosts_answer(controller: ControllerProcess, workdir: Path,
                                               answer: str, code: int) -> None:
    policy = write_policy(workdir, {"bot": [("10.0.0.1", "443"), ("10.0.0.2", "80")],
                                    "other": [("10.9.0.0/16", "22")]}, name="cli.toml")
    with FakeNode(controller, enroll(controller, f"cli-{answer}")) as node:
        node.ack(node.next_push())
        apply = ztnet_background("policy", "apply", policy, "--wait", "20s",
                                 env=operator_env(controller))
        push = node.next_push(timeout=20)
        if answer == "ack":
            node.ack(push)
        else:
            # a host's reason is its own words: shown, but never as terminal controls
            node.nack(push, "bundle: refused in test\x1b]0;owned\x07")
        stdout, stderr = apply.communicate(timeout=30)
    assert apply.returncode == code, stderr
    row = next(line.split() for line in stdout.splitlines() if line.startswith(f"cli-{answer}"))
    assert row[:3] == [f"cli-{answer}", answer, str(push.version)]
    if answer == "nack":
        assert "refused in test\\x1b]0;owned\\x07" in stdout and "\x1b" not in stdout
        assert "was not applied by 1 of" in stderr
        hosts = ztnet("hosts", env=operator_env(controller))
        assert "refused in test\\x1b]0;owned\\x07" in hosts.stdout
        assert "\x1b" not in hosts.stdout


@pytest.mark.parametrize("args, env, message", [
    (["hosts"], {}, "no controller address"),
    (["hosts", "--controller", "127.0.0.1:1"], {}, "no admin credentials"),
    (["hosts", "--controller", "127.0.0.1:1", "--credentials", "/nonexistent"], {},
     "cannot read /nonexistent/ca.pem"),
])
def test_operator_commands_explain_missing_settings(args: Sequence[str], env: dict[str, str],
                                                    message: str) -> None:
    clean = {key: "" for key in ("ZTNET_CONTROLLER", "ZTNET_CREDENTIALS")}
    result = ztnet(*args, env={**clean, **env})
    assert result.returncode == 2 and message in result.stderr


def test_revoke_admin_and_raise_version(tmp_path: Path) -> None:
    from ztnet.testing.controller import admin_credentials, init_controller

    state = init_controller(tmp_path / "state")
    admin_credentials(state, tmp_path / "alice", name="alice")
    revoked = ztnet("controller", "revoke-admin", "--state", state.root, "--name", "alice")
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked 1 certificate(s) of spiffe://test.example/admin/alice" in revoked.stdout
    again = ztnet("controller", "revoke-admin", "--state", state.root, "--name", "alice")
    assert again.returncode == 2
    assert again.stderr == "ztnet: controller: admin alice has no certificate to revoke\n"

    raised = ztnet("controller", "raise-version", "--state", state.root, "--above", "41")
    assert raised.returncode == 0, raised.stderr
    assert "raised the version counter from 0 to 42" in raised.stdout
    same = ztnet("controller", "raise-version", "--state", state.root, "--above", "10")
    assert same.returncode == 0 and "already above 10" in same.stdout
    bad = ztnet("controller", "raise-version", "--state", state.root, "--above", "-1")
    assert bad.returncode == 2 and "--above must be between 0 and" in bad.stderr


def test_serve_refuses_a_bad_rate(tmp_path: Path) -> None:
    result = ztnet("controller", "serve", "--state", tmp_path, "--listen", "127.0.0.1:0",
                   "--host-subscribe-rate", "fast")
    assert result.returncode == 2
    assert "--host-subscribe-rate: 'fast' is not a rate (want N/s, N/m, N/h or N/10s" \
        in result.stderr


def test_labels_from_token_to_hosts_and_label(controller: ControllerProcess) -> None:
    made = ztnet("controller", "token", "create", "--state", controller.state.root, "--host",
                 "lab-cli", "--label", "env=prod", "--label", "role=gpu", "--json")
    assert made.returncode == 0, made.stderr
    printed = json.loads(made.stdout)
    assert printed["labels"] == {"env": "prod", "role": "gpu"}
    enroll(controller, "lab-cli", token=printed["token"])
    for bad, problem in ((["--label", "Env=prod"], "label key 'Env'"),
                         (["--label", "env"], "expected KEY=VALUE"),
                         (["--label", "env=a", "--label", "env=b"], "given twice")):
        refused = ztnet("controller", "token", "create", "--state", controller.state.root,
                        "--host", "x-1", *bad)
        assert refused.returncode == 2 and problem in refused.stderr, refused.stderr

    env = operator_env(controller)
    changed = ztnet("label", "lab-cli", "zone=b", "role-", env=env)
    assert changed.returncode == 0, changed.stderr
    assert "host lab-cli: labels env=prod,zone=b" in changed.stdout
    again = ztnet("label", "lab-cli", "zone=b", env=env)
    assert "labels unchanged (env=prod,zone=b)" in again.stdout
    refused = ztnet("label", "lab-cli", "zone=b c", env=env)
    assert refused.returncode == 2 and "value 'b c'" in refused.stderr
    hosts = ztnet("hosts", env=env)
    row = next(line for line in hosts.stdout.splitlines() if line.startswith("lab-cli "))
    assert "env=prod,zone=b" in row
