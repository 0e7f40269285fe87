"""The daemon's local grant-request socket: how the software driving an agent asks for a
just-in-time grant (`ztnet request-grant`), forwarded to the controller over the daemon's
authenticated channel (``NodeService.RequestGrant``).

    <state>/grant-requests.sock   (0660; the state directory itself is 0700: root only,
                                   unless --request-socket puts it elsewhere)

One JSON object per connection, one line, at most :data:`MAX_MESSAGE` bytes, answered with
one JSON line::

    {"op": "request", "agent": "bot", "to": "10.0.2.7", "ports": "443", "proto": "tcp",
     "ttl": 600, "reason": "TICKET-42"}
    {"op": "status", "request_id": "r-…"}
    → {"ok": true, "request_id": "r-…", "state": "pending", "grant_id": "", …}
    → {"ok": false, "error": "…"}

What the daemon checks before forwarding: the message shape and sizes, and who is asking
(``SO_PEERCRED``): a process inside an agent's cgroup may ask only for that agent (agents
started by `ztnet run` cannot open a unix socket at all: their seccomp filter refuses
AF_UNIX). The controller checks the rest: the host may ask only for agents its bundle
carries, and a host's request never decides anything an operator has not allowed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from ztnet import logs
from ztnet.daemon.channel import describe
from ztnet.errors import ConfigError
from ztnet.instance import Instance
from ztnet.v1 import node_pb2, node_pb2_grpc

MAX_MESSAGE = 8192
MAX_CLIENTS = 8
CLIENT_TIMEOUT = 5.0
RPC_TIMEOUT = 15.0
SOCKET_NAME = "grant-requests.sock"
_FIELDS = {"request": {"op", "agent", "to", "ports", "proto", "ttl", "reason"},
           "status": {"op", "request_id"}}

Call = Callable[[Callable[[node_pb2_grpc.NodeServiceStub], Any]], Any]


def agent_of_pid(instance: Instance, pid: int) -> str | None:
    """The agent whose cgroup holds ``pid``, or None (not an agent's process)."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    agents = "/" + str(instance.agents_dir.relative_to(instance.cgroup_mount)) + "/"
    for line in text.splitlines():
        if line.startswith("0::") and line[3:].startswith(agents):
            return line[3 + len(agents):].split("/", 1)[0] or None
    return None


class RequestSocket:
    """Serves the socket in threads of its own (the daemon's loop never waits on it)."""

    def __init__(self, path: Path, call: Call, *, instance: Instance) -> None:
        self.path = path
        self.call = call
        self.instance = instance
        self._listener: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            umask = os.umask(0o117)  # created 0660, never briefly wider
            try:
                listener.bind(str(self.path))
            finally:
                os.umask(umask)
            listener.listen(16)
        except OSError as exc:
            listener.close()
            raise ConfigError(f"daemon: cannot serve {self.path}: {exc.strerror}") from None
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, name="ztnet-grant-requests",
                                        daemon=True)
        self._thread.start()
        logs.event("grant request socket", path=str(self.path))

    def stop(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        if self._thread is not None:
            self._thread.join(5)
        self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while (listener := self._listener) is not None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                _reply(conn, {"ok": False, "error": "busy: too many requests at once"})
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(CLIENT_TIMEOUT)
            _reply(conn, self.handle(_read_message(conn), _peer_pid(conn)))
        except (OSError, ValueError) as exc:
            _reply(conn, {"ok": False, "error": str(exc)})
        except Exception as exc:  # a bug must not end the socket
            logs.event("grant request failed", logging.ERROR, error=repr(exc))
            _reply(conn, {"ok": False, "error": "internal error in the daemon (see its log)"})
        finally:
            conn.close()
            self._slots.release()

    def handle(self, message: dict[str, Any], pid: int) -> dict[str, Any]:
        """Check ``message`` (from process ``pid``) and forward it to the controller."""
        op = message.get("op")
        if op not in _FIELDS:
            raise ValueError('op: expected "request" or "status"')
        unknown = set(message) - _FIELDS[op]
        if unknown:
            raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
        for key, value in message.items():
            if key != "ttl" and not isinstance(value, str):
                raise ValueError(f"{key}: expected a string")
        if op == "status":
            rpc = node_pb2.GetGrantRequestRequest(request_id=message.get("request_id", ""))
            return self._forward(lambda stub: stub.GetGrantRequest(rpc, timeout=RPC_TIMEOUT))
        ttl = message.get("ttl")
        if not isinstance(ttl, int | float) or isinstance(ttl, bool):
            raise ValueError("ttl: expected a number of seconds")
        agent = message.get("agent", "")
        caller = agent_of_pid(self.instance, pid)
        if caller is not None and caller != agent:
            raise ValueError(f"agent: a process of agent {caller} may ask only for itself")
        request = node_pb2.RequestGrantRequest(
            agent=agent, to=message.get("to", ""), ports=message.get("ports", ""),
            proto=message.get("proto", ""), ttl_seconds=float(ttl),
            reason=message.get("reason", ""))
        logs.event("grant requested", agent=agent, to=request.to, ports=request.ports,
                   pid=pid, caller=caller or "host")
        return self._forward(lambda stub: stub.RequestGrant(request, timeout=RPC_TIMEOUT))

    def _forward(self, invoke: Callable[[node_pb2_grpc.NodeServiceStub], Any]) -> dict[str, Any]:
        try:
            answer: node_pb2.RequestGrantResponse = self.call(invoke)
        except grpc.RpcError as exc:
            return {"ok": False, "error": f"controller: {describe(exc)}"}
        return {"ok": True, "request_id": answer.request_id, "state": answer.state,
                "grant_id": answer.grant_id, "not_after": answer.not_after,
                "ttl": answer.ttl_seconds, "message": answer.message}


def ask(path: Path, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """The client side: send ``message`` to the daemon's socket at ``path``, return its
    answer (ConfigError when the daemon cannot be reached or answers nonsense)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(str(path))
            conn.sendall(json.dumps(message).encode() + b"\n")
            answer = _read_message(conn)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"request-grant: {path}: {exc}") from None
    return answer


def _read_message(conn: socket.socket) -> dict[str, Any]:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(MAX_MESSAGE + 1 - len(data))
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"message longer than {MAX_MESSAGE} bytes")
    try:
        message = json.loads(data.split(b"\n", 1)[0])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not one line of JSON") from None
    if not isinstance(message, dict):
        raise ValueError("expected a JSON object")
    return message


def _reply(conn: socket.socket, answer: dict[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(answer).encode() + b"\n")
    except OSError:
        pass


def _peer_pid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)
