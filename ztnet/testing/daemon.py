"""A real `ztnet daemon` process for tests and benchmarks: readiness through a real
NOTIFY_SOCKET, progress through its JSON log lines; and signed bundles for its agent ``bot``
on host ``HOST``, for a daemon run without a controller."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ztnet.fsutil import replace_atomic
from ztnet.grants.bundle import sign_bundle, verify_bundle
from ztnet.grants.delta import BundleDelta, encode_delta, sign_delta
from ztnet.grants.model import Grant, PortRange, Proto
from ztnet.grants.payload import GrantRecord, Quarantine, floor_ms
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair, nsenter_argv
from ztnet.policy.document import parse_policy
from ztnet.policy.issue import SERIALS_PER_VERSION, issue_bundle
from ztnet.testing.agents import run_traffic

HOST = "testhost"
POLICY = """trust_domain = "test.example"
[agents.bot]
{rules}
"""
RULE = """[[agents.bot.allow]]
to = "{to}"
ports = "{ports}"
proto = "tcp"
ttl = "{ttl}"
{extra}"""


def make_bundle(key: Ed25519PrivateKey, version: int, to: str, ports: list[str], *,
                host: str = HOST, ttl: str = "1h", now: float | None = None,
                bundle_ttl: float | None = None, quarantine: Sequence[Quarantine] = (),
                extra: str = "") -> bytes:
    """``extra``: more TOML lines for every rule (e.g. a byte budget)."""
    rules = "".join(RULE.format(to=to, ports=p, ttl=ttl, extra=extra) for p in ports)
    policy = parse_policy(POLICY.format(rules=rules), "test-policy.toml")
    bundle = issue_bundle(policy, host=host, version=version,
                          now=time.time() if now is None else now, issuer="tests",
                          default_ttl=3600, bundle_ttl=bundle_ttl, quarantine=tuple(quarantine))
    return sign_bundle(bundle, key)


def tcp_grant(grant_id: int, to: str, port: int, *, agent: str = "bot",
              ttl: float = 3600, now: float | None = None) -> Grant:
    """A grant as a delta adds it: TCP ``port`` on ``to``, from now for ``ttl`` seconds."""
    start = floor_ms(time.time() if now is None else now)
    return Grant(grant_id, agent, Proto.TCP, ipaddress.ip_network(to), PortRange(port, port),
                 start, floor_ms(start + ttl))


def make_delta(key: Ed25519PrivateKey, base: bytes | BundleDelta, version: int, *,
               add: Sequence[Grant] = (), revoke: Sequence[int] = (), host: str = HOST,
               base_version: int | None = None, base_sha256: str | None = None,
               now: float | None = None, sign_with: Ed25519PrivateKey | None = None,
               ) -> tuple[bytes, BundleDelta]:
    """A signed delta to ``version`` against ``base``: a bundle envelope or the previous
    delta (its version and payload digest are the base). ``base_version`` and
    ``base_sha256`` override what the base says (for tests of a wrong base);
    ``sign_with``: another key than the base's ``key``."""
    when = floor_ms(time.time() if now is None else now)
    if isinstance(base, bytes):
        held = verify_bundle(base, trusted=[key.public_key()], host=None, min_version=0,
                             now=when)
        version_of, sha_of = held.version, held.payload_sha256
        trust_domain, issuer = held.bundle.trust_domain, held.bundle.issuer
    else:
        version_of, sha_of = base.version, hashlib.sha256(encode_delta(base)).hexdigest()
        trust_domain, issuer = base.trust_domain, base.issuer
    delta = BundleDelta(
        trust_domain=trust_domain, issuer=issuer, audience=host,
        base_version=version_of if base_version is None else base_version,
        base_sha256=sha_of if base_sha256 is None else base_sha256,
        version=version, issued_at=when,
        add=tuple(GrantRecord(grant, version * SERIALS_PER_VERSION + index)
                  for index, grant in enumerate(add)),
        revoke=tuple(sorted(revoke)))
    return sign_delta(delta, sign_with or key), delta


class DaemonProcess:
    def __init__(self, instance: Instance, trust: Path | None, bundle: Path | None,
                 state: Path, *, controller: str | None = None,
                 capabilities: Sequence[str] | None = None,
                 extra_args: Sequence[str] = (), netns: str | None = None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="ztnet-notify-"))
        self.notify_path = self._dir / "notify"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.argv = [sys.executable, "-m", "ztnet.cli", "daemon", "--instance", instance.name,
                     "--state", str(state), "--log-format", "json", "--resync", "3600"]
        if controller is not None:
            # trust, host and credentials come from the enrolled state directory; tests
            # restart controllers, so reconnect within a second rather than 30
            self.argv += ["--controller", controller, "--backoff-max", "1"]
        else:
            assert trust is not None and bundle is not None
            self.argv += ["--trust", str(trust), "--bundle", str(bundle), "--host", HOST]
        self.argv += list(extra_args)
        if capabilities is not None:
            # as systemd would start it: root, but only these capabilities (and no way to
            # gain others); names as in capabilities(7), without the CAP_ prefix
            bounding = ",".join(["-all", *(f"+{c.lower()}" for c in capabilities)])
            self.argv = ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all",
                         "--no-new-privs", *self.argv]
        if netns is not None:  # e.g. beside its agents, whose loopback its resolver serves
            self.argv = nsenter_argv(netns, self.argv)
        self.events: list[dict[str, object]] = []
        self.stderr_text: list[str] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Self:
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path))
        self.proc = subprocess.Popen(self.argv, stderr=subprocess.PIPE, text=True, env=env)
        threading.Thread(target=self._read, daemon=True).start()
        # wait for READY, but notice at once a daemon that exits instead
        self.notify.settimeout(0.2)
        deadline = time.monotonic() + 60
        while True:
            try:
                message = self.notify.recv(4096).decode()
                break
            except TimeoutError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    self.proc.wait()
                    raise AssertionError(f"daemon never said READY: {self.stderr()}") from None
        assert "READY=1" in message, message
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()
        self.notify.close()
        self.notify_path.unlink(missing_ok=True)
        self._dir.rmdir()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.stderr_text.append(line)
                try:
                    self.events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
                self._cond.notify_all()

    def stderr(self) -> str:
        return "".join(self.stderr_text)

    def wait_event(self, predicate: Callable[[dict[str, object]], bool], timeout: float = 30.0,
                   start: int = 0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[start:]:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no matching daemon event; log:\n{self.stderr()}")
                self._cond.wait(remaining)

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def bundle_applied(version: int) -> Callable[[dict[str, object]], bool]:
    """Matches the daemon's event for bundle `version` being in force."""
    return lambda e: e.get("event") == "bundle applied" and e.get("version") == version


@dataclass
class BundleFileHost:
    """A daemon fed from a signed bundle file, its agent in side a of a veth pair, servers on b."""
    instance: Instance
    pair: NetnsPair
    key: Ed25519PrivateKey
    pub: Path
    bundle: Path
    state: Path

    def daemon(self, *extra_args: str) -> DaemonProcess:
        return DaemonProcess(self.instance, self.pub, self.bundle, self.state,
                             extra_args=extra_args)

    def attempt(self, port: int, agent: str = "bot") -> str:
        """One TCP connect from the agent to side b, as nobody: "OK", "EPERM", ..."""
        return str(run_traffic(self.instance, agent, ["tcp", self.pair.b.ipv4, str(port)],
                               netns=self.pair.a.netns, user="nobody")["result"])

    def publish(self, version: int, ports: list[int], **kwargs: object) -> None:
        """Signs and writes bundle `version` granting TCP `ports` on side b."""
        replace_atomic(self.bundle, make_bundle(self.key, version, f"{self.pair.b.ipv4}/32",
                                              [str(p) for p in ports], **kwargs))  # type: ignore[arg-type]
