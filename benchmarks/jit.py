"""How long an operator waits for a just-in-time grant (`ztnet grant`) and a label change
(`ztnet label`) to be in force: from the admin call to every connected host's ACK of the
new bundle, with a real `controller serve` and N hosts on the real grant stream (each
verifies its bundle's signature before it answers, as a daemon does; no kernel).

    nice -n 10 .venv/bin/python -m benchmarks.jit [--hosts 20] [--rounds 30]

Prints p50/p99/max in milliseconds for IssueGrant and LabelHost, and the bundle bytes a
selected and an unselected host receive.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from ztnet.testing.controller import TRUST_DOMAIN, ControllerProcess, create_token, init_controller
from ztnet.testing.nodes import FakeNode, enroll

POLICY = f"""trust_domain = "{TRUST_DOMAIN}"
[agents.bot]
[[agents.bot.allow]]
to = "10.0.0.1"
ports = "443"
[agents.trainer]
hosts = {{ role = "gpu" }}
[[agents.trainer.allow]]
to = "10.0.0.2"
ports = "443"
"""


class AckingNode:
    """A host that verifies and acknowledges every push, recording its size."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.sizes: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = False
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                push = self.node.next_push(timeout=0.5)
            except Exception:  # queue.Empty (idle) or the stream ended
                continue
            self.node.verify(push)
            self.sizes.append(len(push.envelope))
            self.node.ack(push)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.node.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        state = init_controller(root / "state")
        (root / "policy.toml").write_text(POLICY)
        with ControllerProcess(state, policy=root / "policy.toml") as controller:
            nodes = []
            for i in range(args.hosts):
                name = f"h-{i}"
                labels = {"role": "gpu"} if i % 2 == 0 else {}
                identity = enroll(controller, name, token=create_token(state, name,
                                                                       labels=labels))
                nodes.append(AckingNode(FakeNode(controller, identity)))
            try:
                with controller.admin() as admin:
                    grants, relabels = [], []
                    for round_ in range(args.rounds):
                        started = time.perf_counter()
                        done = admin.issue_grant("bot", f"10.1.{round_ % 250}.1", "443",
                                                 ttl=600, reason=f"bench {round_}", wait=30)
                        grants.append((time.perf_counter() - started) * 1000)
                        assert {r.outcome for r in done.results} == {"ack"}, done.results
                        started = time.perf_counter()
                        labels = {"zone": f"z{round_}"}
                        done_label = admin.label_host("h-1", labels, [], wait=30)
                        relabels.append((time.perf_counter() - started) * 1000)
                        assert {r.outcome for r in done_label.results} == {"ack"}
                for name, values in (("IssueGrant", grants), ("LabelHost", relabels)):
                    print(f"{name:10} to {args.hosts} hosts acked: p50 "
                          f"{statistics.median(values):.1f} ms, p99 "
                          f"{percentile(values, 0.99):.1f} ms, max {max(values):.1f} ms "
                          f"({len(values)} rounds)")
                print(f"last bundle: {nodes[0].sizes[-1]} bytes on a gpu host, "
                      f"{nodes[1].sizes[-1]} on another ({args.rounds} JIT grants live)")
            finally:
                for node in nodes:
                    node.close()


if __name__ == "__main__":
    main()
