"""Signed-bundle benchmark: what it costs the daemon to verify and apply a
bundle of 1, 1,000 and 100,000 grants, and the daemon's RSS at 100,000.

    sudo .venv/bin/python -m benchmarks.bundle [--sizes 1,1000,100000]

For each size a policy of that many rules (10 agents, distinct /32s in
10.0.0.0/8, TCP 443) is compiled, signed, written to a file, and a real
`ztnet daemon` is started on it with a private instance. The daemon's own
log line "bundle applied" reports verify_ms and apply_ms (verification and
parsing vs. the atomic datapath swap); RSS is read from /proc once it has
applied. Signing and issuing happen here, outside the daemon's timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from ztnet.datapath.datapath import teardown
from ztnet.grants.bundle import sign_bundle
from ztnet.grants.keys import generate_keypair, load_private_key
from ztnet.instance import Instance
from ztnet.policy.document import parse_policy
from ztnet.policy.issue import issue_bundle

AGENTS = 10


def policy_text(rules: int) -> str:
    lines = ['trust_domain = "bench.example"']
    per_agent = max(1, rules // AGENTS)
    made = 0
    for agent in range(AGENTS):
        if made >= rules:
            break
        lines.append(f"[agents.bot-{agent}]")
        for _ in range(min(per_agent, rules - made) if agent < AGENTS - 1 else rules - made):
            address = (10 << 24) + 1 + made
            lines.append(f'[[agents.bot-{agent}.allow]]\nto = "{address >> 24}.'
                         f'{(address >> 16) & 255}.{(address >> 8) & 255}.{address & 255}/32"\n'
                         'ports = "443"\nproto = "tcp"\nttl = "1h"')
            made += 1
    return "\n".join(lines) + "\n"


def run_size(rules: int, work: Path) -> dict[str, float]:
    key_path, pub = generate_keypair(work / f"keys-{rules}")
    started = time.monotonic()
    policy = parse_policy(policy_text(rules), f"bench-{rules}.toml")
    bundle = issue_bundle(policy, host="bench", version=1, now=time.time(), issuer="bench",
                          default_ttl=3600)
    envelope = sign_bundle(bundle, load_private_key(key_path))
    issue_seconds = time.monotonic() - started
    bundle_path = work / f"bundle-{rules}.json"
    bundle_path.write_bytes(envelope)
    instance = Instance.resolve(f"bench-{os.getpid()}-{rules}")
    argv = [sys.executable, "-m", "ztnet.cli", "daemon", "--instance", instance.name,
            "--trust", str(pub), "--bundle", str(bundle_path), "--state",
            str(work / f"state-{rules}"), "--host", "bench", "--log-format", "json",
            "--resync", "3600"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            event = json.loads(line)
            if event.get("event") == "bundle applied":
                break
            if event.get("event") == "bundle rejected":
                raise SystemExit(f"bench: bundle rejected: {event}")
        else:
            raise SystemExit(f"bench: daemon exited ({proc.wait()})")
        rss = psutil.Process(proc.pid).memory_info().rss
        return {"grants": rules, "bundle_bytes": len(envelope),
                "issue_and_sign_s": round(issue_seconds, 3),
                "verify_ms": float(event["verify_ms"]), "apply_ms": float(event["apply_ms"]),
                "kernel_entries": float(event["entries"]), "daemon_rss_mib": round(rss / 2**20, 1)}
    finally:
        proc.kill()
        proc.wait()
        teardown(instance)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bundle")
    parser.add_argument("--sizes", default="1,1000,100000")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="ztnet-bench-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            results.append(run_size(size, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{'grants':>8} {'verify ms':>10} {'apply ms':>10} {'total ms':>10} {'RSS MiB':>8}")
    for r in results:
        print(f"{int(r['grants']):>8} {r['verify_ms']:>10.1f} {r['apply_ms']:>10.1f} "
              f"{r['verify_ms'] + r['apply_ms']:>10.1f} {r['daemon_rss_mib']:>8.1f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
