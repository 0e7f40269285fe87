"""What the end-to-end tests with a real controller share: a veth pair with a TCP server on
its far side, an agent host's state directory, attempts by named agents, and `ztnet enroll`
of that host as an operator would run it. tests/kernel/conftest.py offers the ``lab``
fixture to every kernel test module; a module that defines its own keeps its own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair
from ztnet.lab.servers import ServerProcess
from ztnet.pki import fingerprint
from ztnet.testing.agents import run_traffic
from ztnet.testing.controller import ControllerProcess

PORTS = (8080, 7070, 9090)


@dataclass
class Lab:
    instance: Instance
    pair: NetnsPair
    state: Path

    def attempt(self, agent: str, port: int) -> str:
        """A TCP connect by ``agent`` (unprivileged) to the server: OK, EPERM, …"""
        return str(run_traffic(self.instance, agent, ["tcp", self.pair.b.ipv4, str(port)],
                               netns=self.pair.a.netns, user="nobody")["result"])


@pytest.fixture
def lab(instance: Instance, tmp_path: Path) -> Iterator[Lab]:
    with NetnsPair() as pair, ServerProcess(pair.b.netns, bind=[pair.b.ipv4], tcp=list(PORTS)):
        yield Lab(instance, pair, tmp_path / "state")


def ztnet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ztnet.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def enroll_with_cli(controller: ControllerProcess, state: Path, host: str, token: str) -> None:
    """`ztnet enroll` with ``token``, pinning the controller's CA by its fingerprint."""
    ca = fingerprint(x509.load_pem_x509_certificate(controller.state.ca_pem))
    done = ztnet("enroll", "--controller", controller.enroll_address, f"--token={token}",
                 "--ca-fingerprint", ca, "--state", str(state), "--host", host)
    assert done.returncode == 0, done.stderr
