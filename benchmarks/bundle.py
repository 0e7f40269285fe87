"""Control-plane benchmark: what it costs a real daemon to verify and apply a
signed bundle of 1, 1,000 and 100,000 grants, its RSS, start, resync and
single-grant changes.

    sudo .venv/bin/python -m benchmarks.bundle [--sizes 1,1000,100000] [--out FILE]

For each size a policy of that many rules (10 agents, distinct /32s in
10.0.0.0/8, TCP 443) is compiled, signed, written to a file, and a real
`ztnet daemon` is started on it with a private instance (its programs not
yet pinned: the first start compiles them in a child process). The daemon's
log lines report the times: "datapath ready" (``open_ms``: programs compiled
or found pinned, attached), "bundle applied" (``verify_ms``: signature and
parsing; ``apply_ms``: the atomic datapath swap; ``total_ms``: the whole
apply, audit trail and flow metadata included; ``cpu_ms``: the CPU time of
the daemon's main thread over that whole apply, which a loaded machine
stretches less than the wall times). RSS and whether a compiler
library (libLLVM, libbcc, libclang) is mapped are read from /proc once the
bundle is applied. Signing and issuing happen here, outside the timings.

For the largest size it then measures, on the running daemon:

* one grant revoked (bundle version 2: the same grants but the last) and
  the same grant added again (version 3), each from the file change to
  "bundle applied";
* the same as signed deltas (ztnet.grants.delta): one revoking the last grant
  (version 4), one adding a grant (version 5), each from the file change to
  "delta applied", with ``enforce_ms`` (the daemon read the file → the kernel
  enforces the change) beside the whole apply;
* the daemon's CPU per resync when nothing changed (``--resync 1`` for 10 s,
  user+system time of the process divided by the resyncs);
* a restart with the programs pinned: process start to "datapath ready"
  (adopted, enforcing) and to "daemon ready" (the persisted bundle verified
  and re-installed), and whether it compiled anything.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from ztnet.datapath.datapath import teardown
from ztnet.fsutil import replace_atomic
from ztnet.grants.bundle import sign_bundle, verify_bundle
from ztnet.grants.keys import generate_keypair, load_private_key
from ztnet.instance import Instance
from ztnet.policy.document import parse_policy
from ztnet.policy.issue import issue_bundle
from ztnet.testing.daemon import make_delta, tcp_grant

AGENTS = 10
COMPILER_LIBRARIES = ("libLLVM", "libbcc", "libclang")
RESYNC_WINDOW = 10.0


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


def signed(rules: int, version: int, key_path: Path) -> bytes:
    policy = parse_policy(policy_text(rules), f"bench-{rules}.toml")
    bundle = issue_bundle(policy, host="bench", version=version, now=time.time(),
                          issuer="bench", default_ttl=3600)
    return sign_bundle(bundle, load_private_key(key_path))


class Daemon:
    """A `ztnet daemon` whose JSON log lines are collected by a thread."""

    def __init__(self, argv: list[str]) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append((time.monotonic(), event))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait(self, predicate: Callable[[dict[str, Any]], bool], start: int = 0,
             timeout: float = 300) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for when, event in self.events[start:]:
                    if event.get("event") == "bundle rejected":
                        raise SystemExit(f"bench: bundle rejected: {event}")
                    if predicate(event):
                        return when, event
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"bench: daemon gone or silent ({self.proc.poll()})")
                self._cond.wait(1.0)

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def named(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event.get("event") == name


def applied(version: int) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event.get("event") == "bundle applied" and event.get("version") == version


def compiler_mapped(pid: int) -> bool:
    text = Path(f"/proc/{pid}/maps").read_text()
    return any(name in text for name in COMPILER_LIBRARIES)


def rss_mib(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def change(daemon: Daemon, bundle_path: Path, envelope: bytes, version: int) -> dict[str, float]:
    mark = daemon.mark()
    started = time.monotonic()
    replace_atomic(bundle_path, envelope)
    when, event = daemon.wait(applied(version), mark)
    return {"file_to_applied_ms": round((when - started) * 1000, 1),
            "verify_ms": float(event["verify_ms"]), "apply_ms": float(event["apply_ms"]),
            "total_ms": float(event["total_ms"]), "cpu_ms": float(event["cpu_ms"])}


def change_by_delta(daemon: Daemon, bundle_path: Path, envelope: bytes,
                    version: int) -> dict[str, float]:
    """A delta from the file change to "delta applied": ``enforce_ms`` ends when the
    kernel enforces it, ``total_ms`` includes audit trail, flow metadata and state."""
    mark = daemon.mark()
    started = time.monotonic()
    replace_atomic(bundle_path, envelope)
    when, event = daemon.wait(lambda e: e.get("event") == "delta applied"
                              and e.get("version") == version, mark)
    return {"file_to_applied_ms": round((when - started) * 1000, 1),
            "verify_ms": float(event["verify_ms"]), "enforce_ms": float(event["enforce_ms"]),
            "apply_ms": float(event["kernel_ms"]),
            "total_ms": float(event["total_ms"]), "cpu_ms": float(event["cpu_ms"])}


def delta_changes(daemon: Daemon, bundle_path: Path, base: bytes,
                  key_path: Path) -> dict[str, dict[str, float]]:
    """On the running daemon holding ``base`` (version 3): a signed delta revoking its last
    grant (version 4), then one adding a grant to a new address (version 5)."""
    key = load_private_key(key_path)
    held = verify_bundle(base, trusted=[key.public_key()], host=None, min_version=0,
                         now=time.time())
    last = held.grants[-1]
    revoke, revoke_delta = make_delta(key, base, 4, revoke=[last.grant_id], host="bench")
    add, _ = make_delta(key, revoke_delta, 5, host="bench", add=[tcp_grant(
        (1 << 62) + 1, "11.0.0.1/32", 443, agent=last.agent)])
    return {"delta_revoke_one_grant": change_by_delta(daemon, bundle_path, revoke, 4),
            "delta_add_one_grant": change_by_delta(daemon, bundle_path, add, 5)}


def resync_cpu(pid: int, window: float = RESYNC_WINDOW) -> dict[str, float]:
    process = psutil.Process(pid)
    before = process.cpu_times()
    time.sleep(window)  # a measuring window, not synchronisation
    after = process.cpu_times()
    cpu = (after.user - before.user) + (after.system - before.system)
    return {"resync_cpu_ms": round(cpu * 1000 / window, 1), "resync_window_s": window}


def run_size(rules: int, work: Path, full: bool,
             resync_window: float = RESYNC_WINDOW) -> dict[str, Any]:
    """One size on a daemon of its own; with ``full`` also the one-grant changes, resync and
    restart. benchmarks/headtohead.py reports every ``*_one_grant`` entry (the shape of
    :func:`change`) this returns, so a further way of changing one grant shows up there once
    it is measured here."""
    key_path, pub = generate_keypair(work / f"keys-{rules}")
    started = time.monotonic()
    envelope = signed(rules, 1, key_path)
    issue_seconds = time.monotonic() - started
    bundle_path = work / f"bundle-{rules}.json"
    bundle_path.write_bytes(envelope)
    instance = Instance.resolve(f"bench-{os.getpid()}-{rules}")
    argv = [sys.executable, "-m", "ztnet.cli", "daemon", "--instance", instance.name,
            "--trust", str(pub), "--bundle", str(bundle_path), "--state",
            str(work / f"state-{rules}"), "--host", "bench", "--log-format", "json",
            "--resync", "1" if full else "3600"]
    daemon = Daemon(argv)
    try:
        ready_at, ready = daemon.wait(named("datapath ready"))
        _, event = daemon.wait(applied(1))
        result: dict[str, Any] = {
            "grants": rules, "bundle_bytes": len(envelope),
            "issue_and_sign_s": round(issue_seconds, 3),
            "start_to_datapath_ready_ms": round((ready_at - daemon.started) * 1000, 1),
            "open_ms": float(ready["open_ms"]), "compiled": ready["compiled"],
            "verify_ms": float(event["verify_ms"]), "apply_ms": float(event["apply_ms"]),
            "total_ms": float(event["total_ms"]), "cpu_ms": float(event["cpu_ms"]),
            "kernel_entries": int(event["entries"]),
            "daemon_rss_mib": rss_mib(daemon.proc.pid),
            "compiler_mapped": compiler_mapped(daemon.proc.pid),
        }
        # `bundle applied` is the transient (the verify's garbage not yet collected);
        # `daemon ready` follows the collection and freeze after it: the steady state
        daemon.wait(named("daemon ready"))
        result["daemon_rss_mib_ready"] = rss_mib(daemon.proc.pid)
        if full:
            result["resync_unchanged"] = resync_cpu(daemon.proc.pid, resync_window)
            # (a bundle carries at most 100,000 grants: revoke the last one, then add it back)
            result["revoke_one_grant"] = change(daemon, bundle_path, signed(rules - 1, 2, key_path),
                                                2)
            whole = signed(rules, 3, key_path)
            result["add_one_grant"] = change(daemon, bundle_path, whole, 3)
            result.update(delta_changes(daemon, bundle_path, whole, key_path))
            result["daemon_rss_mib_after_changes"] = rss_mib(daemon.proc.pid)
            daemon.stop()
            daemon = Daemon(argv)
            ready_at, ready = daemon.wait(named("datapath ready"))
            daemon_ready_at, _ = daemon.wait(named("daemon ready"))
            result["restart_pinned"] = {
                "compiled": ready["compiled"], "open_ms": float(ready["open_ms"]),
                "start_to_datapath_ready_ms": round((ready_at - daemon.started) * 1000, 1),
                "start_to_daemon_ready_ms": round((daemon_ready_at - daemon.started) * 1000, 1),
                "daemon_rss_mib": rss_mib(daemon.proc.pid),
            }
        return result
    finally:
        daemon.stop()
        teardown(instance)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bundle")
    parser.add_argument("--sizes", default="1,1000,100000")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="ztnet-bench-") as tmp:
        for size in sizes:
            results.append(run_size(size, Path(tmp), full=size == max(sizes)))
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{'grants':>8} {'verify ms':>10} {'apply ms':>10} {'total ms':>10} {'CPU ms':>8}"
          f" {'RSS MiB':>8} {'ready MiB':>9} {'start ms':>9} {'LLVM':>5}")
    for r in results:
        print(f"{r['grants']:>8} {r['verify_ms']:>10.1f} {r['apply_ms']:>10.1f} "
              f"{r['total_ms']:>10.1f} {r['cpu_ms']:>8.1f} {r['daemon_rss_mib']:>8.1f} "
              f"{r['daemon_rss_mib_ready']:>9.1f} "
              f"{r['start_to_datapath_ready_ms']:>9.1f} {str(r['compiler_mapped']):>5}")
    last = results[-1]
    if "add_one_grant" in last:
        for what in ("revoke_one_grant", "add_one_grant", "delta_revoke_one_grant",
                     "delta_add_one_grant"):
            change_ = last[what]
            enforced = f", enforcing after {change_['enforce_ms']} ms" \
                if "enforce_ms" in change_ else ""
            print(f"{what}: file→applied {change_['file_to_applied_ms']} ms (verify "
                  f"{change_['verify_ms']}, kernel apply {change_['apply_ms']}{enforced}, "
                  f"total {change_['total_ms']} ms, CPU {change_['cpu_ms']} ms)")
        print(f"RSS after the changes and resyncs: {last['daemon_rss_mib_after_changes']} MiB")
        print(f"resync, nothing changed: {last['resync_unchanged']['resync_cpu_ms']} ms CPU "
              "per resync")
        restart = last["restart_pinned"]
        print("restart with programs pinned: datapath ready "
              f"{restart['start_to_datapath_ready_ms']} ms (open {restart['open_ms']} ms, "
              f"compiled {restart['compiled']}), daemon ready "
              f"{restart['start_to_daemon_ready_ms']} ms, RSS then {restart['daemon_rss_mib']} MiB")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
