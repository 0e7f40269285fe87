"""The lab's controller replicas (`ztnet lab up --replicas 2 --database postgres`): a
PostgreSQL cluster in the controller's namespace, and where each replica listens.

PostgreSQL runs in the foreground as an unprivileged user (a recorded lab process, so
`lab down` stops it like the others), from the distribution's binaries, with its data in
the lab's run directory (made traversable, 0711, for that user; the controller's state
directory inside stays 0700). Replica N (from 0) listens on the controller's address at
ports 7443+10N (mutual TLS) and 7444+10N (enrollment); every replica has its own copy of
the state directory (ztnet.testing.controller.replica_state does the same for tests).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ztnet.lab.netns import poll_until
from ztnet.lab.postgres import PostgresServer
from ztnet.lab.topology import CONTROLLER_PORT, ENROLL_PORT, Topology

DATABASES = ("sqlite", "postgres")
MAX_REPLICAS = 4
PG_PORT = 5432
PORT_STEP = 10


def database_url() -> str:
    """Inside the controller's namespace."""
    return f"postgresql://ztnet@127.0.0.1:{PG_PORT}/postgres"


def listen_addresses(topology: Topology, replica: int) -> tuple[str, str]:
    """(mutual TLS, enrollment) of replica ``replica``."""
    ip = topology.controller.ipv4
    return (f"{ip}:{CONTROLLER_PORT + PORT_STEP * replica}",
            f"{ip}:{ENROLL_PORT + PORT_STEP * replica}")


def controller_list(topology: Topology, replicas: int) -> str:
    """What the daemons get as --controller: every replica, in turn."""
    return ",".join(listen_addresses(topology, i)[0] for i in range(replicas))


def prepare_database(run_dir: Path) -> PostgresServer:
    """A new cluster under ``run_dir`` (not started: run ``foreground_argv()``)."""
    run_dir.chmod(0o711)
    return PostgresServer.initdb(run_dir / "postgres", PG_PORT)


def wait_database(server: PostgresServer, netns: str, alive: object, timeout: float) -> None:
    """Until the cluster accepts connections inside ``netns`` (``alive()``: the
    postmaster is still running)."""
    from ztnet.lab import procs

    ready = [str(server.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(PG_PORT)]

    def accepting() -> bool | None:
        assert callable(alive)
        if not alive():
            from ztnet.errors import LabError

            raise LabError(f"lab: PostgreSQL exited; see {server.log} and the lab's logs")
        return True if procs.run(ready, netns=netns, timeout=10).returncode == 0 else None

    poll_until(accepting, timeout, "PostgreSQL to accept connections")


def replica_state(state: Path, replica: int) -> Path:
    """Replica ``replica``'s state directory: a copy of the first's (modes kept)."""
    if replica == 0:
        return state
    copy = state.with_name(f"{state.name}-{replica}")
    if not copy.exists():
        shutil.copytree(state, copy)
    return copy
