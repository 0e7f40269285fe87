"""Flow traces end to end through a real daemon: kernel events become
records in the flow log (read back with `ztnet observe --json`), metrics
pass promtool, and the audit trail detects tampering."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kernel.conftest import require
from ztnet.datapath.datapath import Datapath
from ztnet.fsutil import replace_atomic
from ztnet.grants.keys import generate_keypair, load_private_key
from ztnet.identity.cgroups import ensure_agent_cgroup
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair, poll_until
from ztnet.lab.servers import ServerProcess
from ztnet.testing.agents import LineProcess, agent_argv, run_traffic, traffic_argv
from ztnet.testing.daemon import DaemonProcess, make_bundle, make_delta, tcp_grant
from ztnet.testing.ports import free_port

ALLOWED, DENIED = 8080, 9090
AGENT = "bot"


class Setup:
    def __init__(self, instance: Instance, pair: NetnsPair, state: Path, daemon: DaemonProcess,
                 metrics_port: int, key_path: Path, bundle: Path) -> None:
        self.instance, self.pair, self.state = instance, pair, state
        self.daemon, self.metrics_port = daemon, metrics_port
        self.key_path, self.bundle = key_path, bundle

    def metric(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """One metric's samples from the daemon's endpoint, by their labels."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                      timeout=5).read().decode()
        return {tuple(sorted(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(text) if family.name == name
                for sample in family.samples}

    def observe(self, *args: str) -> list[dict[str, object]]:
        out = subprocess.run([sys.executable, "-m", "ztnet.cli", "observe", "--state",
                              str(self.state), "--json", *args],
                             capture_output=True, text=True, check=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_record(self, predicate: Callable[[dict[str, object]], bool],
                    what: str) -> dict[str, object]:
        return poll_until(lambda: next((r for r in self.observe() if predicate(r)), None),
                          15.0, what)


@pytest.fixture
def setup(instance: Instance, tmp_path: Path) -> Iterator[Setup]:
    key_path, pub = generate_keypair(tmp_path / "keys")
    bundle = tmp_path / "bundle.json"
    state = tmp_path / "state"
    with NetnsPair() as pair, ServerProcess(pair.b.netns, bind=[pair.b.ipv4],
                                            tcp=[ALLOWED, DENIED]):
        ensure_agent_cgroup(instance, AGENT)  # so the first bundle's grants count as live
        bundle.write_bytes(make_bundle(load_private_key(key_path), 1, f"{pair.b.ipv4}/32",
                                       [str(ALLOWED)]))
        port = free_port()
        with DaemonProcess(instance, pub, bundle, state,
                           extra_args=["--metrics", f"127.0.0.1:{port}"]) as daemon:
            daemon.wait_event(lambda e: e.get("event") == "bundle applied")
            yield Setup(instance, pair, state, daemon, port, key_path, bundle)


def test_allowed_and_denied_flows_are_recorded_with_process_agent_grant_and_bytes(
        setup: Setup) -> None:
    payload = "y" * 3000
    allowed = run_traffic(setup.instance, AGENT, ["tcp", setup.pair.b.ipv4, str(ALLOWED),
                          "--payload", payload], netns=setup.pair.a.netns, user="nobody")
    denied = run_traffic(setup.instance, AGENT, ["tcp", setup.pair.b.ipv4, str(DENIED)],
                         netns=setup.pair.a.netns, user="nobody")
    end = setup.wait_record(lambda r: r["event_type"] == "flow_end"
                            and r["process"]["pid"] == allowed["pid"], "the flow_end record")
    connect = setup.wait_record(lambda r: r["event_type"] == "connect"
                                and r["process"]["pid"] == allowed["pid"], "the connect record")
    refused = setup.wait_record(lambda r: r["process"]["pid"] == denied["pid"],
                                "the denied record")
    assert connect["verdict"] == "ALLOWED" and connect["agent"]["name"] == AGENT
    assert connect["process"]["comm"] == allowed["comm"]
    assert connect["process"]["exe"].endswith(("python3", "python3.11")) or \
        connect["process"]["exe"] == ""
    assert str(connect["grant"]["id"]).startswith("g-")
    assert connect["grant"]["policy_version"] == 1
    assert end["flow"]["bytes_out"] >= len(payload) and end["flow"]["bytes_in"] >= len(payload)
    assert end["grant"]["id"] == connect["grant"]["id"]
    assert refused["verdict"] == "DENIED" and refused["drop_reason"] == "NO_GRANT"
    assert refused["grant"] is None
    only_denied = setup.observe("--verdict", "denied", "--agent", AGENT)
    assert only_denied and all(r["verdict"] == "DENIED" for r in only_denied)


def test_a_flood_is_rate_limited_and_the_suppressed_count_reported(setup: Setup) -> None:
    flood = LineProcess.start(agent_argv(setup.instance, AGENT, traffic_argv(
        "loop", setup.pair.b.ipv4, str(DENIED), "--count", "5000"),
        netns=setup.pair.a.netns, user="nobody"))
    try:
        assert flood.read()["event"] == "started"
        assert flood.read()["outcomes"] == {"EPERM": 5000}
    finally:
        flood.kill()

    def suppressed_reported() -> bool | None:
        if any(int(str(r["suppressed"])) > 0 for r in setup.observe("--verdict", "denied")):
            return True
        # the count rides on the agent's next deny event the budget lets through
        run_traffic(setup.instance, AGENT, ["tcp", setup.pair.b.ipv4, str(DENIED)],
                    netns=setup.pair.a.netns, user="nobody")
        return None

    poll_until(suppressed_reported, 20.0, "a record reporting suppressed deny events")
    denied = setup.observe("--verdict", "denied")
    assert len(denied) < 5000


def test_metrics_are_valid_prometheus_text(setup: Setup) -> None:
    promtool = shutil.which("promtool")
    require(promtool is not None, "needs promtool (Debian package prometheus; make setup)")
    run_traffic(setup.instance, AGENT, ["tcp", setup.pair.b.ipv4, str(DENIED)],
                netns=setup.pair.a.netns, user="nobody")
    url = f"http://127.0.0.1:{setup.metrics_port}/metrics"

    def scrape() -> str | None:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return text if "DENIED" in text or "denied" in text else None

    text = poll_until(scrape, 15.0, "metrics with the denied flow")
    assert promtool is not None
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ztnet" in text


def test_a_modified_audit_log_fails_verification(setup: Setup) -> None:
    audit = setup.state / "audit.jsonl"
    ok = subprocess.run([sys.executable, "-m", "ztnet.cli", "audit", "verify", str(audit)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = audit.read_text().splitlines()
    assert any("bundle.applied" in line for line in lines)
    tampered = [line.replace('"version":1', '"version":2') if "bundle.applied" in line
                else line for line in lines]
    assert tampered != lines
    audit.write_text("\n".join(tampered) + "\n")
    bad = subprocess.run([sys.executable, "-m", "ztnet.cli", "audit", "verify", str(audit)],
                         capture_output=True, text=True)
    assert bad.returncode != 0


def test_the_active_grants_gauge_is_what_the_kernel_holds_after_a_bundle_and_a_delta(
        setup: Setup) -> None:
    def gauge_and_kernel() -> tuple[dict[str, float], dict[str, int]]:
        gauge = {dict(labels)["agent"]: value
                 for labels, value in setup.metric("ztnet_active_grants").items()}
        with Datapath.open(setup.instance) as datapath:
            return gauge, datapath.live_grant_counts()

    gauge, kernel = gauge_and_kernel()
    assert kernel == {AGENT: 1} and gauge == {AGENT: 1.0}
    key = load_private_key(setup.key_path)
    # two grants of the same agent in one delta move the gauge by two
    delta, _ = make_delta(key, setup.bundle.read_bytes(), 2, add=[
        tcp_grant(0x5EED_0000_0000_0001, f"{setup.pair.b.ipv4}/32", DENIED),
        tcp_grant(0x5EED_0000_0000_0002, f"{setup.pair.b.ipv4}/32", DENIED + 1)])
    mark = setup.daemon.mark()
    replace_atomic(setup.bundle, delta)
    event = setup.daemon.wait_event(lambda e: str(e.get("event")).startswith("delta "),
                                    start=mark)
    assert event["event"] == "delta applied", event
    gauge, kernel = gauge_and_kernel()
    assert kernel == {AGENT: 3} and gauge == {AGENT: 3.0}
