"""A controller for tests and benchmarks: a state directory, policies, admin credentials
and enrollment tokens, and a real `ztnet controller serve` process on loopback (real
mutual TLS, ephemeral ports). Hosts that enroll with it are in ztnet.testing.nodes.

    state = init_controller(tmp_path / "ctl")
    with ControllerProcess(state, policy=write_policy(tmp_path, {"bot": [("10.0.0.1", "443")]})) \
            as controller:
        identity = enroll(controller, "web-1")
        with controller.admin() as admin:
            admin.list_hosts()

Replicas: ``init_controller(…, database=url)`` keeps the state in PostgreSQL
(ztnet.testing.postgres), and ``replica_state`` copies the state directory for a
second `serve` on the same database.

Nothing here needs root or BPF. Readiness is awaited by polling (the ready
file, then the health RPC over mutual TLS) against a deadline, never by
sleeping a fixed time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ztnet.controller.admin_client import AdminClient, AdminCredentials
from ztnet.controller.enrollment import create_token as store_token
from ztnet.controller.statedir import (
    StatePaths,
    init_state,
    issue_admin_credentials,
    open_store,
)

TRUST_DOMAIN = "test.example"
# the directory that holds the ztnet package (the checkout, or site-packages): the
# controller runs from there, so it imports this very ztnet
ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


# --- state, policies, credentials ------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControllerState:
    root: Path
    trust_domain: str
    database: str | None = None  # postgresql://… (None: the directory's ztnet.db)

    @property
    def paths(self) -> StatePaths:
        return StatePaths(self.root)

    @property
    def ca_pem(self) -> bytes:
        return self.paths.ca_cert.read_bytes()


def init_controller(root: Path, trust_domain: str = TRUST_DOMAIN,
                    sans: tuple[str, ...] = (), *,
                    database: str | None = None) -> ControllerState:
    """A fresh state directory (in-process, like `ztnet controller init`)."""
    init_state(root, trust_domain, sans=sans, now=time.time(), database=database)
    return ControllerState(root, trust_domain, database)


def replica_state(state: ControllerState, root: Path) -> ControllerState:
    """Another replica's state directory: a copy of the keys and certificates (modes
    kept), serving the same database."""
    assert state.database is not None, "replicas share a PostgreSQL database"
    shutil.copytree(state.root, root)
    return ControllerState(root, state.trust_domain, state.database)


def policy_toml(agents: Mapping[str, Sequence[tuple[str, str]]], *,
                trust_domain: str = TRUST_DOMAIN, proto: str = "tcp") -> str:
    """A policy: agent name → [(destination, ports), …]."""
    lines = [f'trust_domain = "{trust_domain}"']
    for agent, rules in agents.items():
        lines.append(f"[agents.{agent}]")
        for to, ports in rules:
            lines += [f"[[agents.{agent}.allow]]", f'to = "{to}"', f'ports = "{ports}"',
                      f'proto = "{proto}"']
    return "\n".join(lines) + "\n"


def write_policy(directory: Path, agents: Mapping[str, Sequence[tuple[str, str]]],
                 name: str = "policy.toml", **options: str) -> Path:
    path = directory / name
    path.write_text(policy_toml(agents, **options))
    return path


def admin_credentials(state: ControllerState, out: Path, name: str = "ops",
                      lifetime: float = 86400.0) -> Path:
    """An admin credential directory (admin.key, admin.pem, ca.pem)."""
    issue_admin_credentials(state.paths, out, name, lifetime=lifetime, now=time.time(),
                            database=state.database)
    return out


def create_token(state: ControllerState, host: str, ttl: float = 900.0, *,
                 require_tpm: bool = False, labels: Mapping[str, str] | None = None) -> str:
    store = open_store(state.paths, state.database)
    try:
        return store_token(store, host, ttl=ttl, now=time.time(), require_tpm=require_tpm,
                           labels=labels)
    finally:
        store.close()


# --- the controller process --------------------------------------------------------


class ControllerProcess:
    """`python -m ztnet.cli controller serve` on 127.0.0.1 with ephemeral ports.

    ``address`` is the mutual-TLS listener (node and admin APIs),
    ``enroll_address`` the server-authenticated one (Enroll). ``extra_args``
    are appended to the command line (e.g. ``["--grant-ttl", "2s"]``)."""

    def __init__(self, state: ControllerState, *, policy: Path | None = None,
                 extra_args: Sequence[str] = (), admin: Path | None = None,
                 listen: str = "127.0.0.1:0") -> None:
        self.state = state
        # beside the state (a test's tmp_path), so pytest cleans it up
        self._dir = Path(tempfile.mkdtemp(prefix="controller-", dir=state.root.parent))
        self.ready_file = self._dir / "ready.json"
        self.log_path = self._dir / "controller.log"
        self.admin_dir = admin or admin_credentials(state, self._dir / "admin")
        self.argv = [sys.executable, "-m", "ztnet.cli", "controller", "serve",
                     "--state", str(state.root), "--listen", listen,
                     "--enroll-listen", "127.0.0.1:0", "--ready-file", str(self.ready_file),
                     *(["--policy", str(policy)] if policy else []),
                     *(["--database", state.database] if state.database else []), *extra_args]
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.enroll_address = ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not self.ready_file.exists():
                self._check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"controller not ready after {START_TIMEOUT}s:\n"
                                       f"{self.log()}")
                time.sleep(0.02)
            ready = json.loads(self.ready_file.read_text())
            self.address, self.enroll_address = ready["listen"], ready["enroll_listen"]
            self.wait_serving(deadline)
        except BaseException:
            self.stop(signal.SIGKILL)  # never leave a half-started controller behind
            raise

    def wait_serving(self, deadline: float) -> None:
        """Poll the health RPC over mutual TLS until SERVING."""
        with self.channel(self.admin_dir) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"controller not SERVING in time:\n{self.log()}")
                time.sleep(0.02)

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"controller exited with {self.process.returncode}:\n"
                               f"{self.log()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the controller and wait; returns its exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def channel(self, credentials: Path | None = None, *, enroll: bool = False,
                key_pem: bytes | None = None, cert_pem: bytes | None = None,
                options: Sequence[tuple[str, int]] = ()) -> grpc.Channel:
        """A channel verified against the controller's CA: with an admin
        credential directory, with a key and certificate, or with neither
        (then ``enroll`` picks the enrollment listener)."""
        if credentials is not None:
            creds = AdminCredentials.load(credentials)
            key_pem, cert_pem = creds.key_pem, creds.cert_pem
        tls = grpc.ssl_channel_credentials(self.state.ca_pem, key_pem, cert_pem)
        return grpc.secure_channel(self.enroll_address if enroll else self.address, tls,
                                   options=list(options))

    def admin(self, credentials: Path | None = None) -> AdminClient:
        return AdminClient(self.address, AdminCredentials.load(credentials or self.admin_dir))

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged within {timeout}s:\n{log}")
            time.sleep(0.02)
        return log
