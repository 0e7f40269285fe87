"""A real PostgreSQL server for tests (re-exported by ztnet.testing.postgres) and the
lab's replicas (`ztnet lab up --database postgres`): the distribution's binaries
(postgresql-15), a cluster made by ``initdb`` in a temporary directory, run as an
unprivileged user (PostgreSQL refuses to run as root) on a free loopback port.

    with PostgresServer.start() as server:
        url = server.create_database()      # a fresh database per test
        server.stop()                       # the database goes away (same port) …
        server.restart()                    # … and comes back

``stop`` and ``close`` never leave the postmaster behind: ``close`` kills it if a fast
shutdown did not end it, and removes the directory. Trust authentication on
127.0.0.1 only: a test cluster, never a production one.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from ztnet.errors import LabError

PG_BIN_CANDIDATES = (Path("/usr/lib/postgresql/15/bin"), Path("/usr/lib/postgresql/16/bin"),
                     Path("/usr/lib/postgresql/17/bin"))
RUN_AS = "nobody"
START_TIMEOUT = 30.0


def pg_bin() -> Path | None:
    for candidate in PG_BIN_CANDIDATES:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    return None


def available() -> str | None:
    """None if a server can be started here, else why not (the skip reason)."""
    if pg_bin() is None:
        return ("PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin; "
                "scripts/setup.sh installs the postgresql package)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (scripts/setup.sh installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return f"no user {RUN_AS!r} to run PostgreSQL as (it refuses to run as root)"
    return None


class PostgresServer:
    def __init__(self, root: Path, port: int, binaries: Path) -> None:
        self.root = root
        self.port = port
        self.bin = binaries
        self.data = root / "data"
        self.log = root / "postgres.log"

    @classmethod
    def start(cls, root: Path | None = None) -> PostgresServer:
        """``root`` (default: a new directory in /tmp) must be reachable by the
        unprivileged user: pytest's own temporary directories are not."""
        binaries = pg_bin()
        if binaries is None:
            raise LabError(f"lab: {available()}")
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="ztnet-pg-", dir="/tmp"))
        server = cls.initdb(root, _free_port(), binaries)
        try:
            server.restart()
        except BaseException:
            server.close()
            raise
        return server

    @classmethod
    def initdb(cls, root: Path, port: int, binaries: Path | None = None) -> PostgresServer:
        """A new cluster in ``root``/data (not started): trust authentication, loopback
        only, no durability (a test or lab cluster)."""
        binaries = binaries or pg_bin()
        if binaries is None:
            raise LabError(f"lab: {available()}")
        root.mkdir(parents=True, exist_ok=True)
        server = cls(root, port, binaries)
        try:
            server._chown(root)
            server._run("initdb", "-D", str(server.data), "-U", "ztnet", "--auth=trust",
                        "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
            with (server.data / "postgresql.conf").open("a") as conf:
                conf.write(f"listen_addresses = '127.0.0.1'\nport = {server.port}\n"
                           "unix_socket_directories = ''\nfsync = off\n"
                           "synchronous_commit = off\nfull_page_writes = off\n"
                           "max_connections = 200\nshared_buffers = 32MB\n")
        except BaseException:
            server.close()
            raise
        return server

    def foreground_argv(self) -> list[str]:
        """The postmaster in the foreground, as the unprivileged user (for a supervisor
        such as the lab's process records)."""
        argv = [str(self.bin / "postgres"), "-D", str(self.data)]
        if os.geteuid() == 0:
            argv = ["setpriv", f"--reuid={RUN_AS}", f"--regid={pwd.getpwnam(RUN_AS).pw_gid}",
                    "--clear-groups", *argv]
        return argv

    @property
    def running(self) -> bool:
        pid_file = self.data / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, 0)
        except (ValueError, IndexError, OSError):
            return False
        return True

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://ztnet@127.0.0.1:{self.port}/{database}"

    def restart(self) -> None:
        """Start the server (again, on the same port) and wait until it accepts."""
        if self.running:
            return
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", str(int(START_TIMEOUT)), "-o", f"-p {self.port}", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as if it crashed); it can ``restart()``."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = name or f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop("immediate")
        except LabError:
            pass
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():  # pg_ctl failed: end it ourselves
            try:
                os.kill(int(pid_file.read_text().split()[0]), 9)
                time.sleep(0.2)
            except (ValueError, IndexError, OSError):
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _chown(self, path: Path) -> None:  # (the cluster's directory, for RUN_AS)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(RUN_AS)
            os.chown(path, entry.pw_uid, entry.pw_gid)
            os.chmod(path, 0o700)

    def _run(self, tool: str, *args: str) -> None:
        as_user = {"user": RUN_AS} if os.geteuid() == 0 else {}
        result = subprocess.run([str(self.bin / tool), *args], capture_output=True, text=True,
                                timeout=START_TIMEOUT + 30, cwd="/", check=False,
                                **as_user)  # type: ignore[call-overload]
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise LabError(f"lab: {tool} {' '.join(args[:3])} failed "
                           f"({result.returncode}): {result.stderr.strip()[-2000:]}\n{log}")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
