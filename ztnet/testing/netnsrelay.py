"""A TCP relay from a loopback port inside a network namespace to an address of this
process's own namespace: for a daemon that must run inside an agents' namespace (its
resolver answers on their loopback) and still reach a controller on the host's loopback.

The listening socket is made by a thread that enters the namespace (setns(2) moves only
the calling thread) and comes back; every connection it accepts is relayed byte for byte
to ``target``, so TLS runs end to end between the two peers."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from contextlib import suppress
from types import TracebackType
from typing import Self

from ztnet.lab.netns import netns_path

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


def _listen_in(netns: str) -> socket.socket:
    """A listening socket on 127.0.0.1 inside ``netns``, made from a thread of its own."""
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        other = os.open(netns_path(netns), os.O_RDONLY)
        try:
            _setns(other)
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind(("127.0.0.1", 0))
                sock.listen(16)
                made.append(sock)
            finally:
                _setns(own)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            made.append(exc)
        finally:
            os.close(own)
            os.close(other)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


class NetnsRelay:
    """``address`` (127.0.0.1:PORT inside ``netns``) relays to ``target`` (host:port here)."""

    def __init__(self, netns: str, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self._listener = _listen_in(netns)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._closed = True
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._closed:
            try:
                inside, _ = self._listener.accept()
            except OSError:
                return
            try:
                outside = socket.create_connection(self.target, timeout=10)
                outside.settimeout(None)
            except OSError:
                inside.close()
                continue
            for source, sink in ((inside, outside), (outside, inside)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
        with suppress(OSError):
            source.shutdown(socket.SHUT_RD)
