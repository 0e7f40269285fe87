"""Controller benchmark: from `ApplyPolicy` to a connect the host's kernel admits.

    sudo .venv/bin/python -m benchmarks.controller [--applies 100] [--hosts 50] [--out FILE]

Everything is real except 49 of the 50 hosts: a `ztnet controller serve` process
(mutual TLS on loopback), one `ztnet daemon --controller` enrolled with a token over
the enrollment listener and enforcing with its own instance (``bench-<pid>-ctl``: BPF
programs, maps, cgroups), and an agent process started with `ztnet run` in that
instance (benchmarks/apply_probe.py). The other hosts are simulated: one helper
process (this module with ``--simulate``) holds one grant stream per host over its
own mutual-TLS channel, with a host certificate enrolled like any other, and ACKs
every push as soon as it arrives (it does not verify the bundles: a real daemon's
verification happens on its own host, not on the controller).

Measured:

1. **apply → enforced**, with the real host alone and then with all hosts connected.
   Each apply moves the agent's second grant to a new loopback port (the policy is
   always two rules: a fixed port and the moving one, so every apply is the same size
   of change: one grant added, one removed). Before the apply the probe checks that a
   connect() to the new port is refused with EPERM; then it retries a non-blocking
   connect() in a tight loop. The clock starts just before the ApplyPolicy call and
   stops at the probe's own CLOCK_MONOTONIC reading after its first connect() that was
   not EPERM. The listeners are sockets of this process, outside every agent cgroup.
   Also reported: the ApplyPolicy RPC's latency (it returns once every connected host
   has ACKed), and the daemon's verify/apply times from its "bundle applied" log line.
2. **the controller's CPU and memory**: user+system CPU seconds of the controller
   process (psutil, all threads) over each series of applies, per apply and as a
   share of one CPU; the same idle, with every host connected; RSS at each stage and
   the peak (VmHWM).

A few warm-up applies before each series are not counted. Everything (processes,
instance, listeners, state) is torn down at the end, also on errors.

See docs/performance.md for the method and the figures of a reference run.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from cryptography import x509

from benchmarks.datapath import machine_facts, remove_stale_instances
from ztnet.daemon.enroll import enroll as enroll_daemon
from ztnet.datapath.datapath import teardown
from ztnet.instance import Instance
from ztnet.pki import fingerprint
from ztnet.testing.agents import agent_argv
from ztnet.testing.controller import ControllerProcess, create_token, init_controller, policy_toml
from ztnet.testing.daemon import DaemonProcess
from ztnet.testing.nodes import enroll
from ztnet.v1 import node_pb2, node_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
TRUST_DOMAIN = "bench.example"
AGENT = "bot"
REAL_HOST = "bench-real"
LOOPBACK = "127.0.0.1"
PORT_POOL = 16  # listeners the moving grant cycles through
WARMUP = 3
READY_TIMEOUT = 120.0
PROBE_LIMIT = 30.0  # an apply that is not enforced within this is an error


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Settings:
    applies: int
    hosts: int
    warmup: int
    idle_seconds: float
    probe_pause_us: float


# --- child processes spoken to in JSON lines ------------------------------------------


class Child:
    """A subprocess whose stdout lines (JSON) are read by a thread into a queue,
    so every read has a deadline."""

    def __init__(self, name: str, argv: Sequence[str], **popen: Any) -> None:
        self.name = name
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1, **popen)
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._lines.put(json.loads(line))
            except json.JSONDecodeError:
                self._stderr.append(line)
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict[str, Any]:
        try:
            message = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"{self.name}: no answer within {timeout:.0f}s; stderr:\n"
                             f"{''.join(self._stderr)}") from None
        if message is None:
            raise BenchError(f"{self.name} exited ({self.proc.wait()}); stderr:\n"
                             f"{''.join(self._stderr)}")
        return message

    def finish(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Close stdin, wait for the exit, return what it printed last."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        out = []
        while True:
            try:
                message = self._lines.get(timeout=1.0)
            except queue.Empty:
                break
            if message is None:
                break
            out.append(message)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


# --- simulated hosts (the --simulate helper process) ----------------------------------


async def _simulated_host(address: str, ca: bytes, host: dict[str, str],
                          acked: dict[str, int], first: asyncio.Event, total: int) -> None:
    credentials = grpc.ssl_channel_credentials(ca, host["key"].encode(), host["cert"].encode())
    async with grpc.aio.secure_channel(address, credentials) as channel:
        call = node_pb2_grpc.NodeServiceStub(channel).StreamGrants()
        await call.write(node_pb2.GrantStreamRequest(
            subscribe=node_pb2.Subscribe(host=host["host"], version_held=0)))
        while True:
            push = await call.read()
            if push is grpc.aio.EOF:
                raise BenchError(f"{host['host']}: the controller ended the grant stream")
            await call.write(node_pb2.GrantStreamRequest(
                ack=node_pb2.Ack(version=push.version, nonce=push.nonce)))
            acked[host["host"]] += 1
            if acked[host["host"]] == 1 and sum(1 for n in acked.values() if n) == total:
                first.set()


async def simulate(spec_path: Path) -> int:
    """Hold one grant stream per host of the spec and ACK every push at once.
    Prints {"ready": N} when every host has ACKed its first push; on stdin EOF
    prints {"acks": …} and exits."""
    spec = json.loads(spec_path.read_text())
    hosts: list[dict[str, str]] = spec["hosts"]
    acked = {host["host"]: 0 for host in hosts}
    first = asyncio.Event()
    loop = asyncio.get_running_loop()

    def failed(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            print(json.dumps({"error": repr(task.exception())}), flush=True)

    tasks = []
    for host in hosts:
        task = asyncio.create_task(_simulated_host(spec["address"], spec["ca"].encode(), host,
                                                   acked, first, len(hosts)))
        task.add_done_callback(failed)
        tasks.append(task)
    eof = loop.run_in_executor(None, sys.stdin.read)
    ready = asyncio.create_task(first.wait())
    await asyncio.wait([ready, eof], return_when=asyncio.FIRST_COMPLETED)
    if first.is_set():
        print(json.dumps({"ready": len(hosts)}), flush=True)
    await eof
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"acks": sum(acked.values()), "per_host_min": min(acked.values()),
                      "per_host_max": max(acked.values())}), flush=True)
    return 0


# --- set-up ----------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything the run created, so that ``cleanup`` can remove it."""

    work: Path
    instance: Instance = field(
        default_factory=lambda: Instance.resolve(f"bench-{os.getpid()}-ctl"))
    listeners: list[socket.socket] = field(default_factory=list)
    controller: ControllerProcess | None = None
    daemon: DaemonProcess | None = None
    probe: Child | None = None
    simulator: Child | None = None

    def listen(self) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((LOOPBACK, 0))
        sock.listen(4096)  # never accepted: a few probe connects per port
        self.listeners.append(sock)
        return int(sock.getsockname()[1])

    def cleanup(self) -> None:
        failures = []
        # the agent first: its cgroup must be empty before the instance goes
        for child in (self.probe, self.simulator):
            if child is not None:
                child.kill()
        if self.daemon is not None:
            self.daemon.__exit__(None, None, None)
        if self.controller is not None:
            try:
                self.controller.stop()
            except Exception as exc:
                failures.append(f"controller: {exc}")
        for sock in self.listeners:
            sock.close()
        try:
            teardown(self.instance)
        except Exception as exc:
            failures.append(f"{self.instance.name}: {exc}")
        if failures:
            raise BenchError("teardown failed: " + "; ".join(failures))


def policy_text(anchor: int, port: int) -> str:
    return policy_toml({AGENT: [(f"{LOOPBACK}/32", str(anchor)), (f"{LOOPBACK}/32", str(port))]},
                       trust_domain=TRUST_DOMAIN)


def start_controller(setup: Setup, anchor: int) -> ControllerProcess:
    state = init_controller(setup.work / "controller", trust_domain=TRUST_DOMAIN)
    policy = setup.work / "policy.toml"
    # at first only the fixed port: every pool port is denied
    policy.write_text(policy_toml({AGENT: [(f"{LOOPBACK}/32", str(anchor))]},
                                  trust_domain=TRUST_DOMAIN))
    setup.controller = ControllerProcess(state, policy=policy)
    setup.controller.start()
    return setup.controller


def start_daemon(setup: Setup, controller: ControllerProcess) -> DaemonProcess:
    """Enroll the real host (token, CA pinned by fingerprint, CSR) and start its daemon."""
    state = setup.work / "host"
    ca_fingerprint = fingerprint(x509.load_pem_x509_certificate(controller.state.ca_pem))
    enroll_daemon(controller.enroll_address, create_token(controller.state, REAL_HOST),
                  ca_fingerprint, state, host=REAL_HOST)
    daemon = DaemonProcess(setup.instance, None, None, state, controller=controller.address)
    daemon.__enter__()
    setup.daemon = daemon
    daemon.wait_event(lambda e: e.get("event") == "bundle applied", timeout=READY_TIMEOUT)
    return daemon


def start_probe(setup: Setup, settings: Settings, anchor: int, denied: int) -> Child:
    """The agent: `ztnet run` as user nobody, in the daemon's instance."""
    argv = agent_argv(setup.instance, AGENT,
                      [sys.executable, "-m", "benchmarks.apply_probe",
                       "--pause-us", str(settings.probe_pause_us), "--limit", str(PROBE_LIMIT)],
                      user="nobody")
    probe = Child("probe", argv, cwd=REPO)
    setup.probe = probe
    probe.read(READY_TIMEOUT)
    for port, allowed in ((anchor, True), (denied, False)):
        probe.send(f"check {port}")
        result = int(probe.read(10.0)["errno"])
        if (result != errno.EPERM) != allowed:
            raise BenchError(f"probe: connect to port {port} gave "
                             f"{errno.errorcode.get(result, result)}; the agent is not "
                             "confined as expected")
    return probe


def start_simulator(setup: Setup, controller: ControllerProcess, count: int) -> Child:
    """Enroll ``count`` simulated hosts and open their grant streams in a helper."""
    hosts = []
    for number in range(count):
        identity = enroll(controller, f"sim-{number:03d}")
        hosts.append({"host": identity.host, "key": identity.key_pem.decode(),
                      "cert": identity.cert_pem.decode()})
    spec = setup.work / "simulated.json"
    spec.write_text(json.dumps({"address": controller.address,
                                "ca": controller.state.ca_pem.decode(), "hosts": hosts}))
    spec.chmod(0o600)
    simulator = Child("simulator", [sys.executable, "-m", "benchmarks.controller",
                                    "--simulate", str(spec)], cwd=REPO)
    setup.simulator = simulator
    message = simulator.read(READY_TIMEOUT)
    if message.get("ready") != count:
        raise BenchError(f"simulator: {message}")
    return simulator


# --- measuring ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values),
            "min": min(values), "mean": statistics.fmean(values)}


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def memory(pid: int) -> dict[str, int]:
    """RSS now and its peak (VmHWM), in bytes."""
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return {"rss": int(psutil.Process(pid).memory_info().rss), "peak": peak}


class Applier:
    """Applies policies that move the agent's grant to the next pool port, and
    times each until the probe is admitted."""

    def __init__(self, setup: Setup, anchor: int, pool: Sequence[int]) -> None:
        assert setup.controller is not None and setup.daemon is not None
        assert setup.probe is not None
        self.controller, self.daemon, self.probe = setup.controller, setup.daemon, setup.probe
        self.admin = self.controller.admin()
        self.anchor, self.pool = anchor, pool
        self.turn = 0

    def close(self) -> None:
        self.admin.close()

    def apply_once(self, hosts: int) -> dict[str, Any]:
        port = self.pool[self.turn % len(self.pool)]
        self.turn += 1
        text = policy_text(self.anchor, port)
        self.probe.send(f"wait {port}")
        armed = self.probe.read(10.0)
        if armed.get("armed") != port:
            raise BenchError(f"probe: {armed}")
        mark = self.daemon.mark()

        started_wall = time.time()  # the daemon's log stamps (ms) are wall-clock
        started = time.monotonic()
        response = self.admin.apply_policy(text)
        returned = time.monotonic()

        admitted = self.probe.read(PROBE_LIMIT + 5)
        if "admitted_at" not in admitted:
            raise BenchError(f"probe: port {port} never admitted: {admitted}")
        outcomes = [r.outcome for r in response.results]
        if len(outcomes) != hosts or any(o != "ack" for o in outcomes):
            raise BenchError(f"version {response.version}: expected {hosts} ACKs, got "
                             f"{sorted(outcomes)}")
        event = self.daemon.wait_event(
            lambda e: e.get("event") == "bundle applied" and e.get("version") == response.version,
            start=mark)
        ack = self.daemon.wait_event(
            lambda e: e.get("event") == "controller ack" and e.get("version") == response.version,
            start=mark)
        return {"version": response.version, "port": port,
                "enforced_ms": (float(admitted["admitted_at"]) - started) * 1e3,
                "rpc_ms": (returned - started) * 1e3,
                "attempts": int(admitted["attempts"]),
                "verify_ms": float(str(event["verify_ms"])),
                "apply_ms": float(str(event["apply_ms"])),
                "daemon_logged_applied_ms": (float(str(event["ts"])) - started_wall) * 1e3,
                "daemon_logged_ack_ms": (float(str(ack["ts"])) - started_wall) * 1e3}

    def series(self, label: str, hosts: int, settings: Settings) -> dict[str, Any]:
        print(f"{label}: {settings.warmup} warm-up + {settings.applies} applies …",
              file=sys.stderr)
        for _ in range(settings.warmup):
            self.apply_once(hosts)
        controller_pid, daemon_pid = self.controller.pid, self.daemon_pid()
        cpu0, daemon_cpu0, wall0 = cpu_seconds(controller_pid), cpu_seconds(daemon_pid), \
            time.monotonic()
        samples = [self.apply_once(hosts) for _ in range(settings.applies)]
        wall = time.monotonic() - wall0
        cpu, daemon_cpu = cpu_seconds(controller_pid) - cpu0, cpu_seconds(daemon_pid) - daemon_cpu0
        return {
            "hosts": hosts,
            "applies": settings.applies,
            "enforced_ms": spread([s["enforced_ms"] for s in samples]),
            "rpc_ms": spread([s["rpc_ms"] for s in samples]),
            "daemon_verify_ms": spread([s["verify_ms"] for s in samples]),
            "daemon_apply_ms": spread([s["apply_ms"] for s in samples]),
            "enforced_before_rpc_returned": sum(s["enforced_ms"] <= s["rpc_ms"]
                                                for s in samples),
            "wall_seconds": wall,
            "controller_cpu_seconds": cpu,
            "controller_cpu_ms_per_apply": cpu / settings.applies * 1e3,
            "controller_cpu_percent": cpu / wall * 100,
            "daemon_cpu_ms_per_apply": daemon_cpu / settings.applies * 1e3,
            "controller_memory_after": memory(controller_pid),
            "samples": samples,
        }

    def daemon_pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def hosts_in_sync(self) -> tuple[int, int]:
        listed = self.admin.list_hosts().hosts
        return (sum(h.connected for h in listed), sum(h.connected and h.in_sync for h in listed))


def idle_cpu(pid: int, seconds: float) -> dict[str, float]:
    before, wall0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    cpu, wall = cpu_seconds(pid) - before, time.monotonic() - wall0
    return {"seconds": wall, "cpu_seconds": cpu, "cpu_percent": cpu / wall * 100}


def run(settings: Settings, setup: Setup) -> dict[str, Any]:
    anchor = setup.listen()
    pool = [setup.listen() for _ in range(PORT_POOL)]
    print("starting the controller, enrolling and starting the daemon …", file=sys.stderr)
    controller = start_controller(setup, anchor)
    memory_start = memory(controller.pid)
    start_daemon(setup, controller)
    start_probe(setup, settings, anchor, pool[0])
    applier = Applier(setup, anchor, pool)
    try:
        one = applier.series("1 host", 1, settings)
        results: dict[str, Any] = {"series": {"1": one}}
        if settings.hosts > 1:
            print(f"enrolling and connecting {settings.hosts - 1} simulated hosts …",
                  file=sys.stderr)
            simulator = start_simulator(setup, controller, settings.hosts - 1)
            connected, in_sync = applier.hosts_in_sync()
            if (connected, in_sync) != (settings.hosts, settings.hosts):
                raise BenchError(f"{connected} hosts connected, {in_sync} in sync; expected "
                                 f"{settings.hosts}")
            time.sleep(1.0)  # let the connection burst settle before the idle figure
            idle_memory = memory(controller.pid)
            idle = idle_cpu(controller.pid, settings.idle_seconds)
            many = applier.series(f"{settings.hosts} hosts", settings.hosts, settings)
            results["series"][str(settings.hosts)] = many
            results["idle"] = {**idle, "hosts": settings.hosts, "memory": idle_memory}
            simulator_pid = simulator.proc.pid
            results["simulator_cpu_seconds"] = cpu_seconds(simulator_pid)
            final = simulator.finish()
            results["simulator"] = final
            errors = [m for m in final if "error" in m]
            if errors:
                raise BenchError(f"simulated hosts failed: {errors}")
    finally:
        applier.close()
    results["controller_memory"] = {"start": memory_start, "end": memory(controller.pid)}
    lifetime = time.time() - psutil.Process(controller.pid).create_time()
    total = cpu_seconds(controller.pid)
    results["controller_cpu_overall"] = {"seconds": lifetime, "cpu_seconds": total,
                                         "cpu_percent": total / lifetime * 100}
    return {"machine": machine_facts(), "settings": asdict(settings), **results}


# --- report ---------------------------------------------------------------------------


def print_report(results: dict[str, Any]) -> None:
    facts, settings = results["machine"], results["settings"]
    print(f"\nztnet controller benchmark — {facts['date']}, kernel {facts['kernel']}, "
          f"{facts['nproc']} CPUs, {settings['applies']} applies per row "
          f"(+{settings['warmup']} warm-up)")
    print(f"\n{'':38}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'mean ms':>9}")
    rows = (("apply → enforced (agent admitted)", "enforced_ms"),
            ("ApplyPolicy RPC (all hosts ACKed)", "rpc_ms"),
            ("  daemon: verify bundle", "daemon_verify_ms"),
            ("  daemon: apply to the kernel", "daemon_apply_ms"))
    for key, series in results["series"].items():
        print(f"{key} host{'s' if key != '1' else ''} connected")
        for title, metric in rows:
            s = series[metric]
            print(f"  {title:36}{s['p50']:9.1f}{s['p99']:9.1f}{s['max']:9.1f}{s['mean']:9.1f}")
    print("\ncontroller CPU (user+sys)")
    for key, series in results["series"].items():
        print(f"  {key:>3} host(s), applying back to back   "
              f"{series['controller_cpu_ms_per_apply']:7.1f} ms per apply   "
              f"{series['controller_cpu_percent']:5.1f} % of one CPU over "
              f"{series['wall_seconds']:.1f} s")
    if "idle" in results:
        idle = results["idle"]
        print(f"  {idle['hosts']:>3} hosts, idle                     "
              f"{'':>17}   {idle['cpu_percent']:5.1f} % of one CPU over "
              f"{idle['seconds']:.1f} s")
    overall = results["controller_cpu_overall"]
    print(f"  whole run (start, enrollments, every apply)  {overall['cpu_seconds']:6.2f} s       "
          f"{overall['cpu_percent']:5.1f} % of one CPU over {overall['seconds']:.1f} s")
    mib = 2**20
    memory_rows = [("start, no host", results["controller_memory"]["start"]["rss"])]
    for key, series in results["series"].items():
        memory_rows.append((f"after the applies, {key} host(s)",
                            series["controller_memory_after"]["rss"]))
    if "idle" in results:
        memory_rows.insert(2, (f"{results['idle']['hosts']} hosts connected, idle",
                               results["idle"]["memory"]["rss"]))
    print("controller RSS")
    for title, value in memory_rows:
        print(f"  {title:38}{value / mib:7.1f} MiB")
    print(f"  {'peak (VmHWM)':38}{results['controller_memory']['end']['peak'] / mib:7.1f} MiB")


# --- main -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.controller",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--applies", type=int, default=100,
                        help="measured applies per number of hosts (default 100)")
    parser.add_argument("--hosts", type=int, default=50,
                        help="hosts in the second series: 1 real + N-1 simulated (default 50)")
    parser.add_argument("--warmup", type=int, default=WARMUP,
                        help=f"uncounted applies before each series (default {WARMUP})")
    parser.add_argument("--idle", type=float, default=10.0, metavar="SECONDS",
                        help="how long to measure the idle controller with all hosts "
                             "(default 10)")
    parser.add_argument("--probe-pause-us", type=float, default=0.0, metavar="US",
                        help="pause between the probe's connect attempts (default 0: a tight "
                             "loop)")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--simulate", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.applies < 1 or args.hosts < 1 or args.warmup < 0 or args.idle <= 0:
        parser.error("--applies and --hosts must be positive, --warmup not negative")
    settings = Settings(args.applies, args.hosts, args.warmup, args.idle, args.probe_pause_us)
    return settings, args


def main(argv: Sequence[str] | None = None) -> int:
    settings, args = parse_args(argv)
    if args.simulate is not None:
        return asyncio.run(simulate(args.simulate))
    if os.geteuid() != 0:
        print("benchmarks.controller: needs root (BPF programs, cgroups)", file=sys.stderr)
        return 2
    remove_stale_instances()
    with tempfile.TemporaryDirectory(prefix="ztnet-bench-ctl-") as work:
        setup = Setup(Path(work))
        try:
            results = run(settings, setup)
        finally:
            setup.cleanup()
    print_report(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
