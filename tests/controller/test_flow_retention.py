"""Flow retention and the controller's metrics, each with a controller
process of its own (they need other `serve` options than the shared one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.controller.flow_support import NS, make_record, query, uuids
from ztnet.observe.records import Verdict
from ztnet.testing.controller import ControllerProcess, init_controller, write_policy
from ztnet.testing.flows import report
from ztnet.testing.nodes import FakeNode, enroll

REQUIRE_ENV = "ZTNET_REQUIRE_BPF"


def test_retention_deletes_old_flows_then_the_oldest_beyond_the_row_limit(
        tmp_path: Path) -> None:
    state = init_controller(tmp_path / "state")
    options = ["--flow-retention", "1h", "--flow-max-rows", "4", "--flow-prune-interval", "1s"]
    with ControllerProcess(state, extra_args=options) as controller:
        identity = enroll(controller, "keeper")
        now = time.time_ns() // 1000 * 1000
        # dated two hours ago, received now: age counts from receipt (a host's
        # clock decides nothing), so only the row limit removes them
        dated_old = [make_record("keeper", time_ns=now - (7200 + i) * NS) for i in range(3)]
        recent = [make_record("keeper", time_ns=now - (60 - i) * NS) for i in range(6)]
        assert report(controller, identity, [(1, recent[:3] + dated_old), (2, recent[3:])]) \
            .acks == [1, 2]
        deadline = time.monotonic() + 15
        while len(kept := uuids(query(controller, host="keeper"))) > 4:
            assert time.monotonic() < deadline, f"not pruned: {len(kept)} left"
            time.sleep(0.1)
        # the oldest received went first (within a batch, the oldest dated)
        assert kept == [r.uuid for r in reversed(recent[2:])]
        controller.wait_for_log("flows pruned")
    options[1] = "1s"  # the same database, a shorter retention: everything received is old
    with ControllerProcess(state, extra_args=options) as controller:
        deadline = time.monotonic() + 15
        while uuids(query(controller, host="keeper")):
            assert time.monotonic() < deadline, "not pruned by age"
            time.sleep(0.1)


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text: str = reply.read().decode()
    return text


def _samples(text: str) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_metrics_count_hosts_pushes_flows_and_queries(tmp_path: Path) -> None:
    state = init_controller(tmp_path / "state")
    policy = write_policy(tmp_path, {"bot": [("10.0.0.1", "443")]})
    with ControllerProcess(state, policy=policy,
                           extra_args=["--metrics", "127.0.0.1:0"]) as controller:
        address = json.loads(controller.ready_file.read_text())["metrics"]
        identity = enroll(controller, "measured")
        with FakeNode(controller, identity) as node:
            node.ack(node.next_push())
            records = [make_record("measured", verdict=Verdict.DENIED) for _ in range(5)]
            assert report(controller, identity, [(1, records), (1, records)]).acks == [1, 1]
            assert len(query(controller, host="measured").records) == 5
            deadline = time.monotonic() + 10
            while (values := _samples(text := _scrape(address))).get(
                    "ztnet_controller_push_answers_total{answer=ack}") != 1:
                assert time.monotonic() < deadline, text
                time.sleep(0.05)
    assert values["ztnet_controller_hosts_connected"] == 1
    assert values["ztnet_controller_pushes_total"] >= 1
    assert values["ztnet_controller_push_answers_total{answer=nack}"] == 0
    assert values["ztnet_controller_policy_version"] >= 1
    assert values["ztnet_controller_bundle_version"] >= values["ztnet_controller_policy_version"]
    assert values["ztnet_controller_flow_batches_total{outcome=stored}"] == 1
    assert values["ztnet_controller_flow_batches_total{outcome=duplicate}"] == 1
    assert values["ztnet_controller_flow_records_total{outcome=stored}"] == 5
    assert values["ztnet_controller_flows_stored"] == 5
    assert values["ztnet_controller_flow_query_seconds_count"] == 1

    promtool = shutil.which("promtool")
    if promtool is None:
        reason = "needs promtool (Debian package prometheus) on PATH"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} (a prerequisite, and {REQUIRE_ENV}=1 is set)", pytrace=False)
        pytest.skip(reason)
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                           capture_output=True, timeout=60, check=False)
    assert check.returncode == 0, (check.stdout + check.stderr).decode()
