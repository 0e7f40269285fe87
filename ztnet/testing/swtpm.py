"""Software TPMs for tests and benchmarks: `swtpm` (the distribution's libtpms-based
emulator) manufactured with an EK certificate from a local CA of the test's own, served
on free loopback ports.

    ca = EkAuthority.create(tmp_path / "ek-ca")          # a test trust anchor only
    with SoftwareTpm.manufacture(tmp_path / "tpm", ca) as tpm:
        tpm.tcti            # "swtpm:host=127.0.0.1,port=P" for ztnet.identity.tpm
        tpm.address         # "127.0.0.1:P" for `ztnet enroll --tpm --tpm-swtpm`

Manufacturing (swtpm_setup: EK, EK certificate in NV) takes about a second, the first
one under a new CA a little more (swtpm_localca creates the CA on first use). The
process is stopped (SIGTERM, then SIGKILL) on exit, also when the test failed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from ztnet.errors import TpmError
from ztnet.identity.tpm import bindings

START_TIMEOUT = 10.0
LOCALCA_OPTIONS = "/etc/swtpm-localca.options"


def available() -> str | None:
    """Why software TPM tests cannot run here, or None if they can."""
    for tool in ("swtpm", "swtpm_setup", "swtpm_localca"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install swtpm swtpm-tools)"
    try:
        bindings()
    except TpmError as exc:
        return str(exc)
    return None


@dataclass(frozen=True, slots=True)
class EkAuthority:
    """A swtpm_localca CA directory: the configuration swtpm_setup is pointed at. Its
    certificates (root and issuer) exist after the first TPM is manufactured."""

    root: Path

    @classmethod
    def create(cls, root: Path) -> EkAuthority:
        root.mkdir(parents=True, exist_ok=True)
        (root / "localca.conf").write_text(
            f"statedir = {root}\nsigningkey = {root}/signkey.pem\n"
            f"issuercert = {root}/issuercert.pem\ncertserial = {root}/certserial\n")
        options = Path(LOCALCA_OPTIONS)
        (root / "setup.conf").write_text(
            "create_certs_tool = /usr/bin/swtpm_localca\n"
            f"create_certs_tool_config = {root}/localca.conf\n"
            + (f"create_certs_tool_options = {options}\n" if options.exists() else "")
            + "active_pcr_banks = sha256\n")
        return cls(root)

    @property
    def setup_config(self) -> Path:
        return self.root / "setup.conf"

    @property
    def bundle(self) -> Path:
        """The issuing CA and its root, in one PEM file (for --tpm-ek-ca)."""
        path = self.root / "ek-ca-bundle.pem"
        if not path.exists():
            path.write_bytes((self.root / "issuercert.pem").read_bytes()
                             + (self.root / "swtpm-localca-rootca-cert.pem").read_bytes())
        return path


def _free_port_pair() -> int:
    """P with P and P + 1 both free on loopback a moment ago (swtpm's server and ctrl)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("swtpm: no two consecutive free loopback ports")


class SoftwareTpm:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = state.parent / f"{state.name}.log"

    @classmethod
    def manufacture(cls, state: Path, authority: EkAuthority | None) -> SoftwareTpm:
        """A new TPM (new EK); ``authority`` None: no EK certificate."""
        state.mkdir(parents=True)
        argv = ["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--overwrite",
                "--logfile", str(state.parent / f"{state.name}.setup.log")]
        if authority is not None:
            argv += ["--create-ek-cert", "--config", str(authority.setup_config)]
        done = subprocess.run(argv, capture_output=True, timeout=60)
        if done.returncode != 0:
            log = (state.parent / f"{state.name}.setup.log").read_text(errors="replace")
            raise RuntimeError(f"swtpm_setup failed ({done.returncode}): {log}"
                               f"{done.stderr.decode(errors='replace')}")
        return cls(state)

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self.port = _free_port_pair()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state}",
                 "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                 "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                 "--flags", "not-need-init,startup-clear"],
                stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_listening(time.monotonic() + START_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self, deadline: float) -> None:
        # the control port: a connection there does not occupy the TPM's command channel
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"swtpm exited with {self.process.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.port + 1), timeout=1.0).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"swtpm not listening after {START_TIMEOUT}s") from None
                time.sleep(0.01)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
