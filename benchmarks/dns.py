"""What ztnet's resolver costs an agent's DNS (hostname grants, docs/performance.md).

    sudo nice -n 10 .venv/bin/python -m benchmarks.dns [--queries 2000] [--threads 8]

One real `ztnet daemon --dns` in a veth pair (ztnet.testing.dnslab), the lab's upstream
resolver on the other side. Measured in the same run:

* latency of one A query, p50/p99: the agent's query through the redirect and ztnet's
  resolver (which asks the upstream, installs the kernel entries, then answers), against the
  same client outside any agent asking the upstream directly;
* queries per second sustained by ``--threads`` concurrent clients through the resolver (and
  directly, for the ratio);
* time from the upstream's answer to every entry in the kernel (the resolver's own
  ``install_ms`` in its `dns query` traces), p50/p99.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence

from ztnet.datapath.datapath import teardown
from ztnet.instance import Instance
from ztnet.testing.dnslab import dns_lab

STUB = "10.255.255.53"  # any address: the agent's port 53 goes to ztnet's resolver


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dns")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    instance = Instance.resolve("bench-dns")
    teardown(instance)
    client = [sys.executable, "-m", "ztnet.testing.dnsagent", "bench", "api.lab.test"]
    try:
        with dns_lab(instance, daemon_args=("--dns-floor", "5")) as lab:
            def direct(*extra: str) -> dict[str, float]:
                out = subprocess.run(lab.pair.a.argv([*client, lab.pair.b.ipv4, *extra]),
                                     capture_output=True, text=True, check=True).stdout
                return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]

            mark = lab.daemon.mark()
            via = lab.agent([*client, STUB, str(args.queries)])
            base = direct(str(args.queries))
            via_par = lab.agent([*client, STUB, str(args.queries // args.threads),
                                 "--threads", str(args.threads)])
            base_par = direct(str(args.queries // args.threads), "--threads", str(args.threads))
            installs = [float(e["install_ms"]) for e in lab.dns_events(mark)
                        if e.get("verdict") == "answered"]
        result = {
            "latency_ms": {"via_ztnet": {"p50": round(via["p50_ms"], 3),
                                         "p99": round(via["p99_ms"], 3)},
                           "upstream_direct": {"p50": round(base["p50_ms"], 3),
                                               "p99": round(base["p99_ms"], 3)},
                           "added_p50": round(via["p50_ms"] - base["p50_ms"], 3)},
            "qps": {"via_ztnet": via_par["qps"], "upstream_direct": base_par["qps"],
                    "threads": args.threads, "failures": via_par["failures"]},
            "answer_to_kernel_ms": {"p50": round(_percentile(installs, 0.5), 3),
                                    "p99": round(_percentile(installs, 0.99), 3),
                                    "answers": len(installs)},
        }
        print(json.dumps(result, indent=2))
    finally:
        teardown(instance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
