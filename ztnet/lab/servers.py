"""Helper processes inside lab namespaces: a readiness-announcing runner and an echo server.

:class:`NetnsProcess` runs any argv inside a namespace (via nsenter) and returns from
``start()`` only once the child printed ``READY`` -- callers await readiness instead of sleeping.
:mod:`ztnet.lab.sniff` builds its capture process on it.

``python -m ztnet.lab.servers --tcp PORT --udp PORT --bind ADDR...`` listens on every
(address, port) pair, echoes TCP bytes and UDP datagrams back, prints one JSON line per event
(``listen``, ``accept``, ``data``, ``close``, ``udp``), prints ``READY`` once every socket
listens, and exits 0 on SIGTERM. :class:`ServerProcess` starts it and parses the events, so a
test can assert what the peer really received rather than only what the client saw.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from ztnet.errors import LabError
from ztnet.lab.netns import nsenter_argv
from ztnet.lab.procs import selector_until_terminated

READY = "READY"
_MAX_RECORDED = 4096  # bytes of payload per event kept in the event stream


class NetnsProcess:
    """A subprocess inside a namespace that prints ``READY`` on stdout once it can serve.

    ``start()`` returns only after that line, or raises LabError carrying the child's stderr
    when it exits first or ``ready_timeout`` passes. Later stdout lines are collected by a
    reader thread (:meth:`lines`, :meth:`wait_line`). ``stop()`` sends SIGTERM so the child can
    flush what it holds, and SIGKILLs only after ``stop_timeout``. ``netns=None`` runs the
    child in the caller's namespace.
    """

    def __init__(
        self,
        netns: str | None,
        argv: Sequence[str],
        *,
        ready_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.netns = netns
        self.argv = list(argv) if netns is None else nsenter_argv(netns, argv)
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.returncode: int | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._errfile: IO[str] | None = None
        self._errtext = ""
        self._lines: list[str] = []
        self._ready = False
        self._eof = False
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise LabError("lab: process not started")
        return self._proc.pid

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Do not mask the body's exception with a complaint about the child's exit status.
        self.stop(check=exc_type is None)

    def start(self) -> Self:
        self._errfile = tempfile.TemporaryFile("w+")  # a file, not a pipe: it never fills up
        env = dict(os.environ)
        # Children run "python -m ztnet.lab..." from any cwd, whether ztnet is installed or not.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._errfile,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, name=f"lab-{self.pid}", daemon=True)
        self._reader.start()
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._eof, self.ready_timeout)
            ready, exited = self._ready, self._eof
        if not ready:
            self.stop(check=False)
            why = "exited" if exited else f"was not ready after {self.ready_timeout:g}s"
            raise LabError(f"lab: {self._name()} {why}: {self.stderr().strip()}")
        return self

    def _name(self) -> str:
        return " ".join(self.argv)

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.rstrip("\n")
            with self._cond:
                if not self._ready and line == READY:
                    self._ready = True
                else:
                    self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def lines(self) -> list[str]:
        """Stdout lines seen so far, READY excluded."""
        with self._cond:
            return list(self._lines)

    def wait_line(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """The first stdout line satisfying ``predicate``, waiting up to ``timeout`` seconds."""
        found: list[str] = []

        def check() -> bool:
            found[:] = [line for line in self._lines if predicate(line)][:1]
            return bool(found) or self._eof

        with self._cond:
            self._cond.wait_for(check, timeout)
        if not found:
            raise LabError(f"lab: no matching output from {self._name()} within {timeout:g}s")
        return found[0]

    def stderr(self) -> str:
        if self._errfile is None:
            return self._errtext
        self._errfile.seek(0)
        return self._errfile.read()

    def stop(self, *, check: bool = True) -> int:
        """Terminate (SIGTERM, then SIGKILL) and reap; idempotent. Returns the exit status.

        With ``check``, a status other than 0 raises LabError with stderr, so a helper that
        crashed mid-test is reported instead of quietly returning no data.
        """
        proc = self._proc
        if proc is None:
            return 0
        if self.returncode is None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if self._reader is not None:
                self._reader.join(self.stop_timeout)
            # A grandchild could still hold the pipe open; leave it to the reader then.
            if proc.stdout is not None and not (self._reader and self._reader.is_alive()):
                proc.stdout.close()
            self.returncode = proc.returncode
            self._errtext = self.stderr()
            if self._errfile is not None:
                self._errfile.close()
                self._errfile = None
        if check and self.returncode != 0:
            raise LabError(f"lab: {self._name()} exited {self.returncode}: {self._errtext.strip()}")
        return self.returncode


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """One thing the echo server saw. ``peer`` is None for ``listen`` events."""

    kind: str  # listen | accept | data | close | udp
    proto: str  # tcp | udp
    local: tuple[str, int]
    peer: tuple[str, int] | None
    data: bytes = b""

    @classmethod
    def from_json(cls, line: str) -> ServerEvent:
        obj = json.loads(line)
        peer = obj.get("peer")
        return cls(
            kind=obj["event"],
            proto=obj["proto"],
            local=(obj["local"][0], int(obj["local"][1])),
            peer=None if peer is None else (peer[0], int(peer[1])),
            data=bytes.fromhex(obj.get("data", "")),
        )


class ServerProcess(NetnsProcess):
    """The echo server (this module's ``__main__``) running inside ``netns``."""

    def __init__(
        self,
        netns: str | None,
        *,
        bind: Sequence[str],
        tcp: Sequence[int] = (),
        udp: Sequence[int] = (),
        ready_timeout: float = 30.0,
    ) -> None:
        argv = [sys.executable, "-m", "ztnet.lab.servers", "--bind", *bind]
        if tcp:
            argv += ["--tcp", *map(str, tcp)]
        if udp:
            argv += ["--udp", *map(str, udp)]
        super().__init__(netns, argv, ready_timeout=ready_timeout)

    def events(self) -> list[ServerEvent]:
        return [ServerEvent.from_json(line) for line in self.lines() if line.startswith("{")]

    def wait_event(
        self, predicate: Callable[[ServerEvent], bool], timeout: float = 10.0
    ) -> ServerEvent:
        def match(line: str) -> bool:
            return line.startswith("{") and predicate(ServerEvent.from_json(line))

        return ServerEvent.from_json(self.wait_line(match, timeout))

    def listening(self) -> list[tuple[str, str, int]]:
        """(proto, address, port) of every listening socket; resolves port 0 requests."""
        return [(e.proto, *e.local) for e in self.events() if e.kind == "listen"]


# --- the server process itself -------------------------------------------------------------


def _emit(kind: str, proto: str, local: Any, peer: Any = None, data: bytes = b"") -> None:
    event: dict[str, Any] = {"event": kind, "proto": proto, "local": list(local[:2])}
    if peer is not None:
        event["peer"] = list(peer[:2])
    if data:
        event["data"] = data[:_MAX_RECORDED].hex()
    print(json.dumps(event), flush=True)


def _listen(addr: str, port: int, kind: socket.SocketKind) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # "::" must not also claim IPv4, so "--bind 0.0.0.0 ::" works on the same port.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((addr, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    sock.setblocking(False)
    return sock


def serve(bind: Sequence[str], tcp: Sequence[int], udp: Sequence[int]) -> None:
    """Run the echo server until SIGTERM/SIGINT (single-threaded, selector based)."""
    pending: dict[socket.socket, bytes] = {}  # unsent echo bytes per TCP connection
    with selector_until_terminated() as sel:
        for addr in bind:
            for port in tcp:
                sock = _listen(addr, port, socket.SOCK_STREAM)
                sel.register(sock, selectors.EVENT_READ, "listen")
                _emit("listen", "tcp", sock.getsockname())
            for port in udp:
                sock = _listen(addr, port, socket.SOCK_DGRAM)
                sel.register(sock, selectors.EVENT_READ, "udp")
                _emit("listen", "udp", sock.getsockname())
        print(READY, flush=True)
        while True:
            for key, mask in sel.select():
                sock = key.fileobj  # type: ignore[assignment]
                if key.data == "listen":
                    conn, peer = sock.accept()
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
                    _emit("accept", "tcp", conn.getsockname(), peer)
                elif key.data == "udp":
                    data, peer = sock.recvfrom(65535)
                    _emit("udp", "udp", sock.getsockname(), peer, data)
                    sock.sendto(data, peer)
                else:
                    _serve_conn(sel, sock, mask, pending)


def _serve_conn(
    sel: selectors.BaseSelector, conn: socket.socket, mask: int, pending: dict[socket.socket, bytes]
) -> None:
    try:
        local, peer = conn.getsockname(), conn.getpeername()
    except OSError:  # reset by the peer before we looked (ENOTCONN): it is gone
        sel.unregister(conn)
        pending.pop(conn, None)
        conn.close()
        return
    if mask & selectors.EVENT_READ:
        try:
            data = conn.recv(65536)
        except ConnectionError:
            data = b""
        if not data:
            _emit("close", "tcp", local, peer)
            sel.unregister(conn)
            pending.pop(conn, None)
            conn.close()
            return
        _emit("data", "tcp", local, peer, data)
        pending[conn] = pending.get(conn, b"") + data
    if pending.get(conn):
        try:
            sent = conn.send(pending[conn])
        except BlockingIOError:
            sent = 0
        pending[conn] = pending[conn][sent:]
    # Ask for writability only while echo bytes are queued, to avoid a busy loop.
    want = selectors.EVENT_READ | (selectors.EVENT_WRITE if pending.get(conn) else 0)
    sel.modify(conn, want, "conn")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztnet.lab.servers", description=__doc__)
    parser.add_argument("--bind", nargs="+", action="extend", required=True, metavar="ADDR")
    parser.add_argument("--tcp", nargs="+", action="extend", type=int, default=[], metavar="PORT")
    parser.add_argument("--udp", nargs="+", action="extend", type=int, default=[], metavar="PORT")
    args = parser.parse_args(argv)
    if not args.tcp and not args.udp:
        parser.error("give at least one --tcp or --udp port")
    serve(args.bind, args.tcp, args.udp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
