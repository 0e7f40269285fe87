"""Many simulated hosts on the grant stream, in one helper process: each enrolled with its
own token and certificate, holding one mutual-TLS stream to its replica and ACKing every
push as it arrives (benchmarks/replicas.py and tests/controller/test_replicas.py).

    identities = enroll_hosts(state, replicas, 1000)     # host i follows replica i % 2
    with Simulator(work / "hosts.json", replicas, identities) as simulator:
        times = simulator.wait(version)      # every host read version or later: host → t
        held = simulator.held()              # host → (version, envelope) last pushed

A host whose stream is lost tries the next replica after the daemon's first backoff step
(0.25-0.5 s), subscribing with the version it holds. Times are CLOCK_MONOTONIC, shared by
the processes. No BPF is involved: this is the control plane only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc

from ztnet.controller.enrollment import create_token
from ztnet.controller.pgstore import PgStore
from ztnet.testing.controller import ROOT, ControllerProcess, ControllerState
from ztnet.testing.nodes import HostIdentity, enroll
from ztnet.v1 import node_pb2, node_pb2_grpc


def enroll_hosts(state: ControllerState, replicas: Sequence[ControllerProcess],
                 count: int, prefix: str = "sim") -> list[HostIdentity]:
    """``count`` hosts named ``{prefix}-0000``…, host i enrolled through replica
    ``i % len(replicas)`` (and later following it)."""
    assert state.database is not None, "simulated hosts need a PostgreSQL-backed controller"
    store = PgStore.open(str(state.database))
    try:
        tokens = [create_token(store, f"{prefix}-{i:04d}", ttl=3600, now=time.time())
                  for i in range(count)]
    finally:
        store.close()
    return [enroll(replicas[i % len(replicas)], f"{prefix}-{i:04d}", token=token)
            for i, token in enumerate(tokens)]


# --- the helper process ---------------------------------------------------------------


class _Hosts:
    def __init__(self) -> None:
        self.seen: dict[int, dict[str, float]] = {}  # version → host → first read
        self.held: dict[str, tuple[int, bytes]] = {}  # host → last push (version, envelope)
        self.changed = asyncio.Event()

    def version(self, host: str) -> int:
        return self.held.get(host, (0, b""))[0]


async def _host(host: dict[str, str], addresses: list[str], ca: bytes, hosts: _Hosts) -> None:
    """One host: subscribe with the version held, ACK each push, on a lost stream try the
    next replica after the daemon's first backoff step."""
    turn = int(host["replica"])
    name = host["host"]
    credentials = grpc.ssl_channel_credentials(ca, host["key"].encode(), host["cert"].encode())
    while True:
        address = addresses[turn % len(addresses)]
        try:
            async with grpc.aio.secure_channel(address, credentials) as channel:
                call = node_pb2_grpc.NodeServiceStub(channel).StreamGrants()
                await call.write(node_pb2.GrantStreamRequest(subscribe=node_pb2.Subscribe(
                    host=name, version_held=hosts.version(name))))
                while True:
                    push = await call.read()
                    if push is grpc.aio.EOF:
                        break
                    now = time.monotonic()
                    await call.write(node_pb2.GrantStreamRequest(
                        ack=node_pb2.Ack(version=push.version, nonce=push.nonce)))
                    hosts.held[name] = (push.version, push.envelope)
                    hosts.seen.setdefault(push.version, {}).setdefault(name, now)
                    hosts.changed.set()
        except grpc.RpcError:
            pass
        turn += 1
        await asyncio.sleep(0.25 + 0.25 * (hash(name) % 100) / 100)


async def _wait(hosts: _Hosts, count: int, version: int) -> dict[str, float]:
    while True:
        times: dict[str, float] = {}
        for v, at in hosts.seen.items():
            if v >= version:
                for name, t in at.items():
                    times[name] = min(t, times.get(name, t))
        if len(times) == count:
            return times
        hosts.changed.clear()
        await hosts.changed.wait()


async def simulate(spec_path: Path) -> int:
    """stdin: ``wait V`` → {"version": V, "times": {host: t}} once every host has
    version V or later; ``held`` → {"held": {host: [version, envelope base64]}}."""
    spec = json.loads(spec_path.read_text())
    specs: list[dict[str, str]] = spec["hosts"]
    hosts = _Hosts()
    tasks = [asyncio.create_task(_host(h, spec["addresses"], spec["ca"].encode(), hosts))
             for h in specs]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"started": len(tasks)}), flush=True)
    while line := (await reader.readline()).decode().strip():
        if line == "held":
            print(json.dumps({"held": {name: [v, base64.b64encode(envelope).decode()]
                                       for name, (v, envelope) in hosts.held.items()}}),
                  flush=True)
            continue
        version = int(line.split()[1])
        times = await _wait(hosts, len(specs), version)
        print(json.dumps({"version": version, "times": times}), flush=True)
    for task in tasks:
        task.cancel()
    return 0


# --- the test/benchmark side ------------------------------------------------------------


class Simulator:
    """The helper process for ``identities`` (host i follows ``replicas[i % n]``); the
    spec (keys included) is written to ``spec``."""

    def __init__(self, spec: Path, replicas: Sequence[ControllerProcess],
                 identities: Sequence[HostIdentity]) -> None:
        spec.write_text(json.dumps({
            "addresses": [r.address for r in replicas],
            "ca": identities[0].ca_pem.decode() if identities else "",
            "hosts": [{"host": h.host, "key": h.key_pem.decode(), "cert": h.cert_pem.decode(),
                       "replica": str(i % len(replicas))} for i, h in enumerate(identities)]}))
        spec.chmod(0o600)
        self.proc = subprocess.Popen([sys.executable, "-m", "ztnet.testing.simhosts",
                                      str(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        try:
            self._read()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the host simulator exited")
        message: dict[str, Any] = json.loads(line)
        return message

    def _ask(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def wait(self, version: int) -> dict[str, float]:
        """Blocks until every host has read ``version`` or later: host → when (monotonic).
        No timeout of its own: a caller wanting one uses :meth:`wait_within`."""
        times: dict[str, float] = self._ask(f"wait {version}")["times"]
        return times

    def wait_within(self, version: int, timeout: float) -> dict[str, float]:
        """:meth:`wait`, failing (and killing the helper) after ``timeout`` seconds."""
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            self.proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            return self.wait(version)
        except RuntimeError:
            if fired.is_set():
                raise TimeoutError(f"not every simulated host had version {version} within "
                                   f"{timeout:g} s") from None
            raise
        finally:
            timer.cancel()

    def held(self) -> dict[str, tuple[int, bytes]]:
        """host → (version, envelope) of the last push each host read."""
        held: dict[str, list[Any]] = self._ask("held")["held"]
        return {name: (int(v), base64.b64decode(envelope)) for name, (v, envelope) in held.items()}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(simulate(Path(sys.argv[1]))))
