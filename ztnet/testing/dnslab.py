"""A hostname-grant world for tests and benchmarks: a veth pair whose side b is "the
internet" (an upstream resolver, ztnet.lab.upstream, and echo servers on public-looking
documentation addresses), and a real `ztnet daemon --dns` on side a, where the agents run.

The agents' /etc/resolv.conf is the host's; its name server need not exist in side a at
all: the socket hooks send every DNS attempt to the daemon's resolver anyway.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ztnet.fsutil import replace_atomic
from ztnet.grants.bundle import sign_bundle
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair, nsenter_argv
from ztnet.lab.servers import NetnsProcess, ServerProcess
from ztnet.policy.document import parse_policy
from ztnet.policy.issue import issue_bundle
from ztnet.testing.agents import agent_argv
from ztnet.testing.daemon import HOST, DaemonProcess, bundle_applied
from ztnet.testing.netnsrelay import NetnsRelay

ECHO_PORT = 8080
API_V4, API_V6 = "203.0.113.10", "2001:db8::10"
EDGE = "203.0.113.11"
PUBLIC = "203.0.113.12"
SHORT, ZERO, BRIEF = "203.0.113.21", "203.0.113.22", "203.0.113.23"
EVIL = "203.0.113.66"
CDN = ("198.51.100.1", "198.51.100.2", "198.51.100.3")
SERVED_V4 = (API_V4, EDGE, PUBLIC, SHORT, ZERO, BRIEF, EVIL, *CDN)
SERVED_V6 = (API_V6,)


def zone(private: str) -> dict[str, dict[str, Any]]:
    """The upstream's names; ``private`` is a private address that really serves (side b)."""
    return {
        "api.lab.test": {"A": [API_V4], "AAAA": [API_V6], "ttl": 60},
        "cdn.lab.test": {"A": list(CDN), "ttl": 1, "rotate": 1},
        "short.lab.test": {"A": [SHORT], "ttl": 1},
        "zero.lab.test": {"A": [ZERO], "ttl": 0},
        "www.lab.test": {"CNAME": "alias.lab.test", "ttl": 30,
                         "extra": [["evil.lab.test", "A", EVIL]]},
        "alias.lab.test": {"CNAME": "edge.lab.test", "ttl": 20},
        "edge.lab.test": {"A": [EDGE], "ttl": 40},
        "loop.lab.test": {"CNAME": "loop2.lab.test"},
        "loop2.lab.test": {"CNAME": "loop.lab.test"},
        "mixed.lab.test": {"A": [private, "169.254.169.254", "127.0.0.1", PUBLIC], "ttl": 60},
        "inside.lab.test": {"A": [private], "ttl": 60},
        "big.lab.test": {"A": [f"203.0.113.{i}" for i in range(100, 140)], "ttl": 60,
                         "tc": True},
        "evil.lab.test": {"A": [EVIL], "ttl": 60},
        "brief.lab.test": {"A": [BRIEF], "ttl": 300},
    }


BRIEF_TTL = 'ttl = "6s"'


def policy(extra_rules: str = "") -> str:
    """Agent ``bot``'s hostname grants, agent ``other`` with api only."""
    rules = "".join(
        f'[[agents.bot.allow]]\nto = "{name}"\nports = "{ECHO_PORT}"\n'
        for name in ("api.lab.test", "cdn.lab.test", "short.lab.test", "zero.lab.test",
                     "www.lab.test", "loop.lab.test", "mixed.lab.test", "big.lab.test"))
    rules += (f'[[agents.bot.allow]]\nto = "inside.lab.test"\nports = "{ECHO_PORT}"\n'
              "allow_private = true\n")
    rules += f'[[agents.bot.allow]]\nto = "brief.lab.test"\nports = "{ECHO_PORT}"\n{BRIEF_TTL}\n'
    # loopback UDP, so that a reply the agent forges to itself really arrives
    rules += '[[agents.bot.allow]]\nto = "127.0.0.1/32"\nproto = "udp"\nports = "any"\n'
    other = f'[[agents.other.allow]]\nto = "api.lab.test"\nports = "{ECHO_PORT}"\n'
    return (f'trust_domain = "test.example"\n[agents.bot]\n{rules}{extra_rules}'
            f"[agents.other]\n{other}")


@dataclass
class DnsLab:
    instance: Instance
    pair: NetnsPair
    workdir: Path
    key: Ed25519PrivateKey
    upstream: NetnsProcess
    servers: ServerProcess
    daemon: DaemonProcess
    daemon_args: tuple[str, ...] = ()
    version: int = 1

    @property
    def bundle(self) -> Path:
        return self.workdir / "bundle.json"

    def publish(self, text: str, *, bundle_ttl: float | None = 3600.0) -> None:
        """Sign ``text`` as the next version and wait until the daemon applies it."""
        self.version += 1
        _write_bundle(self.key, self.bundle, text, self.version, bundle_ttl)
        mark = self.daemon.mark()
        self.daemon.signal(1)  # SIGHUP: reload now
        self.daemon.wait_event(bundle_applied(self.version), start=mark)

    def run(self, argv: Sequence[str], agent: str = "bot", *,
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as ``agent`` (unprivileged) in side a."""
        return subprocess.run(agent_argv(self.instance, agent, argv, netns=self.pair.a.netns,
                                         user="nobody"),
                              capture_output=True, text=True, timeout=timeout, check=False)

    def publish_file(self, text: str) -> None:
        """Sign ``text`` as the next version into the bundle file, telling no daemon."""
        self.version += 1
        _write_bundle(self.key, self.bundle, text, self.version, 3600.0)

    def restart_daemon(self) -> None:
        """SIGKILL the daemon (no goodbye) and start a new one on the same state."""
        self.daemon.kill()
        self.daemon.__exit__(None, None, None)
        self.daemon = DaemonProcess(
            self.instance, self.workdir / "signing.pub", self.bundle, self.workdir / "state",
            netns=self.pair.a.netns, extra_args=self.daemon_args).__enter__()
        self.daemon.wait_event(bundle_applied(self.version))

    def agent(self, argv: Sequence[str], agent: str = "bot", *,
              timeout: float = 120.0) -> dict[str, Any]:
        """Run ``argv`` as ``agent`` (unprivileged) in side a; its last JSON line."""
        proc = self.run(argv, agent, timeout=timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert proc.returncode == 0 and lines, \
            f"agent {argv} failed ({proc.returncode}): {proc.stdout} {proc.stderr}"
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def dnsagent(self, *args: str, agent: str = "bot") -> dict[str, Any]:
        return self.agent([sys.executable, "-m", "ztnet.testing.dnsagent", *args], agent)

    def hold(self, name: str, agent: str = "bot") -> subprocess.Popen[str]:
        """An agent holding one connection to ``name`` open (ztnet.testing.dnsagent hold)."""
        return subprocess.Popen(
            agent_argv(self.instance, agent, [sys.executable, "-m", "ztnet.testing.dnsagent",
                                              "hold", name, str(ECHO_PORT)],
                       netns=self.pair.a.netns, user="nobody"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def upstream_queries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.upstream.lines() if line.startswith("{")]

    def dns_events(self, start: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.daemon.events[start:] if e.get("event") == "dns query"]


def _write_bundle(key: Ed25519PrivateKey, path: Path, text: str, version: int,
                  bundle_ttl: float | None) -> None:
    bundle = issue_bundle(parse_policy(text, "dns-test-policy.toml"), host=HOST, version=version,
                          now=time.time(), issuer="tests", default_ttl=3600,
                          bundle_ttl=bundle_ttl)
    replace_atomic(path, sign_bundle(bundle, key))


def add_public_addresses(pair: NetnsPair) -> None:
    """The documentation addresses live on side b; side a routes them over the veth."""
    def ip(netns: str, *args: str) -> None:
        subprocess.run(nsenter_argv(netns, ["ip", *args]), check=True, capture_output=True)

    for address in SERVED_V4:
        ip(pair.b.netns, "addr", "add", f"{address}/32", "dev", pair.b.iface)
    for address in SERVED_V6:
        ip(pair.b.netns, "-6", "addr", "add", f"{address}/128", "dev", pair.b.iface, "nodad")
    ip(pair.a.netns, "route", "add", "203.0.113.0/24", "dev", pair.a.iface)
    ip(pair.a.netns, "route", "add", "198.51.100.0/24", "dev", pair.a.iface)
    ip(pair.a.netns, "-6", "route", "add", "2001:db8::/64", "dev", pair.a.iface)


@contextmanager
def dns_lab(instance: Instance, *, daemon_args: Sequence[str] = ("--dns-floor", "2"),
            policy_text: str | None = None,
            zone_override: Mapping[str, dict[str, Any]] | None = None,
            controller: str | None = None, state: Path | None = None) -> Iterator[DnsLab]:
    """The upstream, the servers and a daemon with --dns. Standalone on a signed bundle
    file by default; with ``controller`` (its address) the daemon follows that controller
    instead, from ``state``, a host state directory enrolled with it."""
    with ExitStack() as stack:
        pair = stack.enter_context(NetnsPair())
        add_public_addresses(pair)
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ztnet-dns-")))
        records = {**zone(pair.b.ipv4), **(zone_override or {})}
        (workdir / "zone.json").write_text(json.dumps(records))
        upstream = stack.enter_context(NetnsProcess(pair.b.netns, [
            sys.executable, "-m", "ztnet.lab.upstream", "--bind", pair.b.ipv4,
            "--zone", str(workdir / "zone.json")]))
        servers = stack.enter_context(ServerProcess(
            pair.b.netns, bind=[*SERVED_V4, *SERVED_V6, pair.b.ipv4], tcp=[ECHO_PORT]))
        key = Ed25519PrivateKey.generate()
        pub = workdir / "signing.pub"
        pub.write_bytes(key.public_key().public_bytes(Encoding.PEM,
                                                     PublicFormat.SubjectPublicKeyInfo))
        bundle = workdir / "bundle.json"
        # brief.lab.test's 6 s grant would lapse before a slow first start (the programs
        # compile) applies the bundle, and a lapsed grant rejects it whole: the first bundle
        # gives it an hour; the test about its expiry publishes policy() itself
        first = policy_text or policy().replace(BRIEF_TTL, 'ttl = "1h"')
        _write_bundle(key, bundle, first, 1, 3600.0)
        args = ("--dns-upstream", pair.b.ipv4, *daemon_args)
        if controller is None:
            daemon = DaemonProcess(instance, pub, bundle, workdir / "state", netns=pair.a.netns,
                                   extra_args=args)
        else:
            assert state is not None, "a daemon following a controller needs its enrolled state"
            # the daemon runs in the agents' namespace (its resolver answers on their
            # loopback); the controller listens on the host's
            relay = stack.enter_context(NetnsRelay(pair.a.netns, controller))
            daemon = DaemonProcess(instance, None, None, state, controller=relay.address,
                                   netns=pair.a.netns, extra_args=args)
        lab = DnsLab(instance, pair, workdir, key, upstream, servers, daemon.__enter__(), args)
        stack.callback(lambda: lab.daemon.__exit__(None, None, None))
        lab.daemon.wait_event(bundle_applied(1) if controller is None
                              else lambda e: e.get("event") == "bundle applied")
        yield lab
