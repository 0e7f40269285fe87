"""The filters benchmarks/headtohead.py compares, each in network namespaces of its own.

Every scenario gets a :class:`~ztnet.lab.netns.NetnsPair`: the client side ``a``
(10.199.N.1) where the load generator runs, and the server side ``b`` (10.199.N.2) with
``loadgen serve`` and ``iperf3 -s``. Filters act only in the client namespace: nftables and
iptables rules are loaded there with ``nsenter`` and disappear with it, and ztnet's programs
are attached to its own instance's cgroup, which only the scenario's client joins. Nothing is
ever loaded into the host's own network namespace.

The allowed traffic is the same everywhere: TCP to the server's port ``TCP_PORT`` (connect
rate), UDP to ``UDP_PORT`` (datagram rate) and TCP to ``IPERF_PORT`` (bulk). The denied
connect goes to ``DENIED_PORT`` on the same server, which nothing listens on: without a
filter the server refuses it with an RST. A scenario of size N holds the rule that allows the
workload plus N - 1 more for other destinations (/32s spread over 10.0.0.0/8 on
``TCP_PORT``, the deepest walk for ztnet's port-first LPM key); a lookup therefore has N
entries to search.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from benchmarks.flows import scrape
from ztnet.datapath import bpfsys
from ztnet.datapath.datapath import teardown
from ztnet.grants.bundle import sign_bundle
from ztnet.grants.keys import generate_keypair, load_private_key
from ztnet.identity import cgroups
from ztnet.instance import Instance, find_cgroup2_mount
from ztnet.lab.netns import NetnsPair, nsenter_argv
from ztnet.policy.document import parse_policy
from ztnet.policy.issue import issue_bundle
from ztnet.testing.agents import agent_argv
from ztnet.testing.daemon import HOST, DaemonProcess
from ztnet.testing.ports import free_port

TCP_PORT, UDP_PORT, IPERF_PORT = 5200, 5201, 5202
DENIED_PORT = 5300
AGENT = "bot"  # the agent of ztnet.testing.daemon's bundles
PLAIN_CGROUP_ROOT = "ztnet-h2h"  # cgroups of the scenarios without ztnet: <root>-<pid>/<name>
LOAD_TIMEOUT = 600.0
# The programs' attach types queried for kernel statistics (whatever names they carry).
ATTACH_TYPES = (bpfsys.AttachType.CGROUP_INET4_CONNECT, bpfsys.AttachType.CGROUP_UDP4_SENDMSG,
                bpfsys.AttachType.CGROUP_INET_EGRESS, bpfsys.AttachType.CGROUP_INET_INGRESS,
                bpfsys.AttachType.CGROUP_INET_SOCK_RELEASE)


class ScenarioError(RuntimeError):
    pass


def filler_addresses(server: str, count: int) -> list[str]:
    """``count`` /32s spread evenly over 10.0.0.0/8, never ``server`` itself."""
    if count <= 0:
        return []
    base, avoid = int(ipaddress.IPv4Address("10.0.0.0")), int(ipaddress.IPv4Address(server))
    step = (2**24 - 2) // (count + 1)
    out: list[str] = []
    for i in range(1, count + 2):
        value = base + i * step
        if value != avoid and len(out) < count:
            out.append(str(ipaddress.IPv4Address(value)))
    return out


def _remove_empty_cgroups(*paths: Path) -> None:
    """rmdir each cgroup that has no child cgroups left (its processes have all exited)."""
    for path in paths:
        if path.exists() and not any(child.is_dir() for child in path.iterdir()):
            path.rmdir()


def run_in(netns: str, argv: Sequence[str], stdin: str | None = None) -> str:
    proc = subprocess.run(nsenter_argv(netns, argv), input=stdin, capture_output=True,
                          text=True, timeout=LOAD_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise ScenarioError(f"{' '.join(argv)} in {netns} failed ({proc.returncode}): "
                            f"{proc.stderr.strip()[:2000]}")
    return proc.stdout


@dataclass
class Scenario:
    """One filter configuration. Subclasses load the filter in :meth:`start_filter`."""

    name: str
    kind: str  # none | ztnet | nftables | iptables | opensnitch
    size: int
    index: int
    pair: NetnsPair = field(init=False)
    entries: int = 0  # rules, set elements or grants the filter ended up holding
    load_seconds: float = 0.0
    # the share of each workload's calls this filter's client makes: a rate is calls per
    # second either way, and a filter a hundred times slower needs fewer calls to show it
    calls_scale: ClassVar[float] = 1.0

    def __post_init__(self) -> None:
        self.pair = NetnsPair(f"h2h{os.getpid():x}s{self.index}", index=self.index)

    @property
    def label(self) -> str:
        return "no filter" if self.kind == "none" else f"{self.kind}, {self.size:,}"

    @property
    def server(self) -> str:
        return self.pair.b.ipv4

    def start(self, stack: ExitStack, work: Path, loadgen: Path, cpu: int | None) -> None:
        """Namespaces, the servers (pinned to ``cpu``, away from the client), the filter."""
        stack.enter_context(self.pair)
        serve = subprocess.Popen(self.pair.b.argv([str(loadgen), "serve", self.server,
                                                   str(TCP_PORT), str(UDP_PORT)]),
                                 stdout=subprocess.PIPE, text=True,
                                 preexec_fn=child_setup(None, cpu))
        stack.callback(serve.wait)
        stack.callback(serve.kill)
        assert serve.stdout is not None
        if not serve.stdout.readline():
            raise ScenarioError(f"{self.name}: loadgen serve exited")
        iperf = subprocess.Popen(self.pair.b.argv(["iperf3", "-s", "-B", self.server,
                                                   "-p", str(IPERF_PORT)]),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 preexec_fn=child_setup(None, cpu))
        stack.callback(iperf.wait)
        stack.callback(iperf.kill)
        started = time.monotonic()
        self.start_filter(stack, work)
        self.load_seconds = time.monotonic() - started

    def start_filter(self, stack: ExitStack, work: Path) -> None:
        self._plain_cgroup(stack)

    # --- the client's confinement --------------------------------------------------------

    _cgroup: Path | None = field(default=None, init=False)

    def _plain_cgroup(self, stack: ExitStack) -> Path:
        root = find_cgroup2_mount() / f"{PLAIN_CGROUP_ROOT}-{os.getpid()}"
        path = root / self.name
        path.mkdir(parents=True, exist_ok=True)
        stack.callback(_remove_empty_cgroups, path, root)
        self._cgroup = path
        return path

    def client(self, argv: Sequence[str]) -> tuple[list[str], Path | None]:
        """(argv to run, cgroup to join before exec): ``argv`` in the client namespace."""
        return self.pair.a.argv(argv), self._cgroup

    # --- what the report reads ------------------------------------------------------------

    def daemon_pid(self) -> int | None:
        return None

    def program_stats(self) -> dict[str, tuple[int, int]]:
        """name -> (run_time_ns, run_cnt) of the BPF programs filtering this client."""
        return {}

    def counters(self) -> dict[str, float]:
        return {}

    def rss_bytes(self) -> int | None:
        pid = self.daemon_pid()
        return None if pid is None else int(psutil.Process(pid).memory_info().rss)


class NoFilter(Scenario):
    pass


class Nftables(Scenario):
    """``table inet`` with one output chain: established traffic first (what a user writes),
    then the client's cgroup (``socket cgroupv2``) with ``daddr . l4proto . dport`` in a hash
    set of N elements; what is not in the set is rejected (TCP with a reset, so a denied
    connect fails at once instead of hanging on a dropped SYN)."""

    def start_filter(self, stack: ExitStack, work: Path) -> None:
        cgroup = self._plain_cgroup(stack)
        mount = find_cgroup2_mount()
        level = len(cgroup.relative_to(mount).parts)
        # nft resolves the path under /sys/fs/cgroup; on a hybrid host the v2 tree is below
        # it (unified/), and the level counts from the v2 root
        path = str(cgroup.relative_to(Path("/sys/fs/cgroup")))
        match = f'socket cgroupv2 level {level} "{path}"'
        elements = [f"{self.server} . tcp . {TCP_PORT}", f"{self.server} . udp . {UDP_PORT}",
                    f"{self.server} . tcp . {IPERF_PORT}"]
        elements += [f"{a} . tcp . {TCP_PORT}" for a in filler_addresses(self.server,
                                                                         self.size - 1)]
        self.entries = len(elements)
        capacity = max(65536, 2 * len(elements))
        text = (
            "table inet ztbench {\n"
            "  set allowed { type ipv4_addr . inet_proto . inet_service; "
            f"size {capacity}; }}\n"
            "  chain output {\n"
            "    type filter hook output priority 0; policy accept;\n"
            "    ct state established,related accept\n"
            f"    {match} ip daddr . meta l4proto . th dport @allowed accept\n"
            f"    {match} meta l4proto tcp reject with tcp reset\n"
            f"    {match} drop\n"
            "  }\n}\n"
        )
        rules = work / f"{self.name}.nft"
        # elements in chunks: one huge element list makes nft parse slowly
        chunks = [elements[i:i + 10_000] for i in range(0, len(elements), 10_000)]
        rules.write_text(text + "".join(
            f"add element inet ztbench allowed {{ {', '.join(chunk)} }}\n" for chunk in chunks))
        run_in(self.pair.a.netns, ["nft", "-f", str(rules)])


class Iptables(Scenario):
    """The OUTPUT chain of the client namespace: established traffic first, then N linear
    rules matching the client's cgroup (``-m cgroup --path``) and a destination, the ones the
    workload needs last (a linear chain's worst case), then a reject (TCP reset) and a drop
    for the rest of the cgroup's traffic."""

    def start_filter(self, stack: ExitStack, work: Path) -> None:
        cgroup = self._plain_cgroup(stack)
        path = str(cgroup.relative_to(find_cgroup2_mount()))
        match = f"-m cgroup --path {path}"
        lines = ["*filter", ":OUTPUT ACCEPT [0:0]",
                 "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"]
        lines += [f"-A OUTPUT {match} -d {a}/32 -p tcp --dport {TCP_PORT} -j ACCEPT"
                  for a in filler_addresses(self.server, self.size - 1)]
        ports = f"{TCP_PORT}:{IPERF_PORT}"
        lines += [f"-A OUTPUT {match} -d {self.server}/32 -p tcp --dport {ports} -j ACCEPT",
                  f"-A OUTPUT {match} -d {self.server}/32 -p udp --dport {ports} -j ACCEPT",
                  f"-A OUTPUT {match} -p tcp -j REJECT --reject-with tcp-reset",
                  f"-A OUTPUT {match} -j DROP", "COMMIT", ""]
        self.entries = len(lines) - 6
        run_in(self.pair.a.netns, ["iptables-restore"], stdin="\n".join(lines))


# Debian's opensnitch package, unpacked (never installed: its postinst starts opensnitchd on
# the host, where it would queue every connection the host makes) by scripts/setup.sh.
OPENSNITCH_ROOT = Path(__file__).resolve().parents[1] / ".venv" / "opensnitch"
OPENSNITCH_READY_TIMEOUT = 30.0


def opensnitch_binary() -> Path:
    return OPENSNITCH_ROOT / "usr" / "bin" / "opensnitchd"


def opensnitch_library_path() -> str:
    """Where its libnetfilter_queue was unpacked (the multiarch directory of this host)."""
    return ":".join(str(p) for p in sorted(OPENSNITCH_ROOT.glob("usr/lib/*-linux-gnu")))


def _opensnitch_rule(name: str, operator: dict[str, object], action: str = "allow") -> str:
    # precedence: a matching allow rule decides at once (without it opensnitchd goes on
    # looking for a deny or reject rule that also matches, and the catch-all would win)
    return json.dumps({"created": "2026-01-01T00:00:00Z", "updated": "2026-01-01T00:00:00Z",
                       "name": name, "enabled": True, "precedence": True, "action": action,
                       "duration": "always", "operator": operator})


def _simple(operand: str, data: str, kind: str = "simple") -> dict[str, object]:
    return {"type": kind, "operand": operand, "sensitive": False, "data": data, "list": []}


class OpenSnitch(Scenario):
    """opensnitchd (Debian's 1.5 binary, unpacked by scripts/setup.sh) in the client
    namespace, with a private mount namespace whose /etc is an overlay (its configuration
    path is fixed at /etc/opensnitchd; the host's /etc stays untouched). It loads its own
    iptables rules there: every new connection (conntrack NEW) goes to its netfilter queue,
    where its rules decide in user space, process lookup by /proc included (its default
    method). N rules: N - 1 for other destinations, then the workload's (destination and
    ports), each in its own file as its UI writes them, tried in name order; then a rule
    that rejects everything else (its ``DefaultAction`` cannot: 1.5 drops for ``reject``
    there, and a denied connect would hang; a reject rule aborts the socket, ECONNABORTED).
    No UI is connected, so nothing is ever asked."""

    proc: subprocess.Popen[bytes] | None = None
    # it decides every new connection in user space (~400 connects a second here): a tenth
    # of the calls still takes seconds, the full count a minute and a half per round
    calls_scale: ClassVar[float] = 0.1

    def start_filter(self, stack: ExitStack, work: Path) -> None:
        self._plain_cgroup(stack)
        binary = opensnitch_binary()
        if not binary.exists():
            raise ScenarioError(f"{self.name}: {binary} is missing (scripts/setup.sh unpacks "
                                "Debian's opensnitch package there)")
        home = work / f"opensnitch-{self.name}"
        etc, rules = home / "etc", home / "rules"
        for path in (etc, rules, home / "upper", home / "overlay-work"):
            path.mkdir(parents=True)
        log = home / "daemon.log"
        (etc / "default-config.json").write_text(json.dumps({
            "Server": {"Address": f"unix://{home}/ui.sock", "LogFile": str(log)},
            "DefaultAction": "deny", "DefaultDuration": "always",
            "InterceptUnknown": False, "ProcMonitorMethod": "proc", "LogLevel": 2,
            "Firewall": "iptables", "Stats": {"MaxEvents": 150, "MaxStats": 25}}))
        (etc / "system-fw.json").write_text(json.dumps({"SystemRules": []}))
        for i, address in enumerate(filler_addresses(self.server, self.size - 1)):
            (rules / f"filler-{i:06}.json").write_text(
                _opensnitch_rule(f"filler-{i:06}", _simple("dest.ip", address)))
        # named to sort last: the workload's rule is the last one tried, as for iptables
        (rules / "zz-workload.json").write_text(_opensnitch_rule("zz-workload", {
            "type": "list", "operand": "list", "sensitive": False, "data": "",
            "list": [_simple("dest.ip", self.server),
                     _simple("dest.port", f"^({TCP_PORT}|{UDP_PORT}|{IPERF_PORT})$",
                             "regexp")]}))
        (rules / "zzz-reject-the-rest.json").write_text(
            _opensnitch_rule("zzz-reject-the-rest", _simple("dest.ip", ".*", "regexp"), "reject"))
        self.entries = self.size + 1  # and the reject rule
        script = (f'mount -t overlay overlay -o lowerdir=/etc,upperdir={home}/upper,'
                  f'workdir={home}/overlay-work /etc && mkdir -p /etc/opensnitchd && '
                  f'cp {etc}/*.json /etc/opensnitchd/ && '
                  f'LD_LIBRARY_PATH={opensnitch_library_path()} exec {binary} '
                  f'-rules-path {rules} -process-monitor-method proc -queue-num 0 '
                  f'-ui-socket unix://{home}/ui.sock -log-file {log} -no-live-reload')
        self.proc = subprocess.Popen(self.pair.a.argv(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(self._stop)
        deadline = time.monotonic() + OPENSNITCH_READY_TIMEOUT
        while "NFQUEUE" not in run_in(self.pair.a.netns, ["iptables-save"]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise ScenarioError(f"{self.name}: opensnitchd did not queue connections "
                                    f"(exit {self.proc.poll()}): {tail}")
            time.sleep(0.1)  # its rules appear in the namespace's ruleset: nothing to wait on

    def _stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def daemon_pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


def ztnet_policy(server: str, size: int) -> str:
    lines = ['trust_domain = "bench.example"', f"[agents.{AGENT}]",
             f'[[agents.{AGENT}.allow]]\nto = "{server}/32"\nports = "{TCP_PORT}-{IPERF_PORT + 1}"'
             '\nproto = "any"\nttl = "1h"']
    lines += [f'[[agents.{AGENT}.allow]]\nto = "{a}/32"\nports = "{TCP_PORT}"\nproto = "tcp"\n'
              'ttl = "1h"' for a in filler_addresses(server, size - 1)]
    return "\n".join(lines) + "\n"


class Ztnet(Scenario):
    """A real `ztnet daemon` (its own instance, standalone on a signed bundle, flows recorded
    to its state directory, metrics on loopback); the client is started with `ztnet run`."""

    daemon: DaemonProcess | None = None
    instance: Instance | None = None
    metrics_port: int = 0
    bundle_seconds: dict[str, float] | None = None

    def start_filter(self, stack: ExitStack, work: Path) -> None:
        key, pub = generate_keypair(work / f"keys-{self.name}")
        policy = parse_policy(ztnet_policy(self.server, self.size), f"{self.name}.toml")
        bundle = issue_bundle(policy, host=HOST, version=1, now=time.time(), issuer="bench",
                              default_ttl=3600)
        self.entries = len(bundle.grants)
        signing_key = load_private_key(key)
        assert isinstance(signing_key, Ed25519PrivateKey)
        path = work / f"bundle-{self.name}.json"
        path.write_bytes(sign_bundle(bundle, signing_key))
        self.instance = Instance.resolve(f"bench-{os.getpid()}-{self.name}")
        stack.callback(teardown, self.instance)
        self.metrics_port = free_port()
        self.daemon = DaemonProcess(self.instance, pub, path, work / f"state-{self.name}",
                                    extra_args=["--metrics", f"127.0.0.1:{self.metrics_port}"])
        stack.callback(self.daemon.kill)  # also if start-up is interrupted half-way
        stack.enter_context(self.daemon)
        applied = self.daemon.wait_event(lambda e: e.get("event") == "bundle applied",
                                         timeout=LOAD_TIMEOUT)
        self.bundle_seconds = {name: float(str(applied[key])) / 1000
                               for key, name in (("verify_ms", "verify"), ("apply_ms", "apply"))
                               if key in applied}

    def client(self, argv: Sequence[str]) -> tuple[list[str], Path | None]:
        assert self.instance is not None
        return agent_argv(self.instance, AGENT, argv, netns=self.pair.a.netns), None

    def daemon_pid(self) -> int | None:
        return None if self.daemon is None or self.daemon.proc is None else self.daemon.proc.pid

    def program_stats(self) -> dict[str, tuple[int, int]]:
        assert self.instance is not None
        stats: dict[str, tuple[int, int]] = {}
        fd = os.open(self.instance.cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for attach_type in ATTACH_TYPES:
                for prog_id in bpfsys.attached_prog_ids(fd, attach_type):
                    prog_fd = bpfsys.prog_fd_by_id(prog_id)
                    try:
                        info = bpfsys.prog_info(prog_fd)
                    finally:
                        os.close(prog_fd)
                    before = stats.get(info.name, (0, 0))
                    stats[info.name] = (before[0] + info.run_time_ns, before[1] + info.run_cnt)
        finally:
            os.close(fd)
        return stats

    def counters(self) -> dict[str, float]:
        """The daemon's own counters: kernel events lost, records dropped, flows written."""
        with suppress(OSError):
            return scrape(self.metrics_port)
        return {}


def make_scenarios(ztnet_sizes: Sequence[int], nft_sizes: Sequence[int],
                   iptables_sizes: Sequence[int],
                   opensnitch_sizes: Sequence[int] = ()) -> list[Scenario]:
    scenarios: list[Scenario] = [NoFilter("none", "none", 0, 1)]
    kinds: tuple[tuple[str, str, type[Scenario], Sequence[int]], ...] = (
        ("ztnet", "zt", Ztnet, ztnet_sizes), ("nftables", "nft", Nftables, nft_sizes),
        ("iptables", "ipt", Iptables, iptables_sizes),
        ("opensnitch", "osn", OpenSnitch, opensnitch_sizes))
    for kind, short, cls, sizes in kinds:
        for size in sizes:
            scenarios.append(cls(f"{short}{size}", kind, size, len(scenarios) + 1))
    return scenarios


def tool_versions() -> dict[str, str]:
    out = {}
    env = {**os.environ, "LD_LIBRARY_PATH": opensnitch_library_path()}
    for tool, argv in (("nft", ["nft", "--version"]), ("iptables", ["iptables", "--version"]),
                       ("iperf3", ["iperf3", "--version"]),
                       ("opensnitch", [str(opensnitch_binary()), "-version"])):
        with suppress(OSError, IndexError):
            proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
            version = (proc.stdout or proc.stderr).splitlines()[0].strip()
            out[tool] = f"opensnitchd {version}" if tool == "opensnitch" else version
    return out


def child_setup(cgroup: Path | None, cpu: int | None) -> Callable[[], None]:
    """Runs in the child before exec: confined and pinned before its first instruction."""
    def setup() -> None:
        if cgroup is not None:
            cgroups.join(cgroup)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
    return setup

