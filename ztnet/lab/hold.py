"""An agent holding a TCP connection open in the lab (`ztnet.lab.traffic hold`): for the
demo and the tests that watch an established connection being cut (revocation, quarantine).
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from typing import Any, Self

from ztnet.identity.launch import DYNAMIC_USER
from ztnet.lab.cluster import Lab
from ztnet.lab.procs import child_env
from ztnet.lab.topology import LabHost


class HeldConnection:
    """``with HeldConnection(lab, host, agent, address, port) as held:`` — ``event()`` is the
    traffic agent's next JSON line (``connected``, then ``broken`` with its errno)."""

    def __init__(self, lab: Lab, host: LabHost, agent: str, address: str, port: int, *,
                 limit: float = 30.0, user: str | None = DYNAMIC_USER) -> None:
        self.argv = lab.agent_argv(host, agent, [
            sys.executable, "-m", "ztnet.lab.traffic", "hold", address, str(port),
            "--limit", str(limit)], user=user)
        self._lines: queue.Queue[str] = queue.Queue()
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Self:
        self._process = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True, env=child_env())
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            if line.startswith("{"):
                self._lines.put(line)

    def event(self, timeout: float = 20.0) -> dict[str, Any]:
        """The next thing the traffic agent said ({} if it said nothing in time)."""
        try:
            result: dict[str, Any] = json.loads(self._lines.get(timeout=timeout))
            return result
        except queue.Empty:
            return {}
