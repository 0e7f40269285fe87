"""Connected hosts: one grant-stream session per host, the push waiting for
each, and who is waiting for their answers.

Everything here runs on the server's event loop (no locks needed). A session
holds at most one unsent push: a newer version replaces an older one that
was not sent yet, since a host only ever needs the latest. ``expect()``
registers interest in a host's answer to a version *or a later one* (an ACK
of a renewal that overtook the version also applies what it carried), and
``collect()`` waits for all of them with one deadline.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from dataclasses import dataclass

import grpc

from ztnet.controller.authz import Peer
from ztnet.errors import RpcFailure

# Nonces of the last few pushes per session: an answer to anything older is stale.
_REMEMBERED_NONCES = 16


@dataclass(frozen=True, slots=True)
class Push:
    version: int
    nonce: str
    envelope: bytes


@dataclass(frozen=True, slots=True)
class Answer:
    version: int
    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class HostResult:
    """``outcome``: "ack", "nack", "timeout" or "disconnected"."""

    host: str
    outcome: str
    version: int
    reason: str = ""


def new_push(version: int, envelope: bytes) -> Push:
    return Push(version, secrets.token_hex(8), envelope)


class Session:
    """One host's StreamGrants call."""

    def __init__(self, host: str, peer: Peer) -> None:
        self.host = host
        self.peer = peer
        self._pending: Push | None = None
        self._wake = asyncio.Event()
        self._sent: OrderedDict[str, int] = OrderedDict()
        self.closed = False
        self.failure: RpcFailure | None = None

    def offer(self, push: Push) -> None:
        self._pending = push
        self._wake.set()

    def close(self, failure: RpcFailure | None = None) -> None:
        if not self.closed:
            self.closed, self.failure = True, failure
        self._wake.set()

    async def next_push(self, timeout: float) -> Push | None:
        """The next push to send; None when closed or after ``timeout`` seconds."""
        if self._pending is None and not self.closed:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                return None
        self._wake.clear()
        if self.closed:
            return None
        push, self._pending = self._pending, None
        if push is not None:
            self._sent[push.nonce] = push.version
            while len(self._sent) > _REMEMBERED_NONCES:
                self._sent.popitem(last=False)
        return push

    def sent_version(self, nonce: str) -> int | None:
        """The version pushed with ``nonce`` on this stream (None: not ours, or too old)."""
        return self._sent.get(nonce)


class Hub:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._waiters: dict[str, list[tuple[int, asyncio.Future[Answer | None]]]] = {}

    def attach(self, session: Session) -> None:
        """Make ``session`` the host's stream; an older one of the same host is
        ended (a daemon that reconnected has abandoned it)."""
        old = self._sessions.get(session.host)
        self._sessions[session.host] = session
        if old is not None:
            old.close(RpcFailure(grpc.StatusCode.ABORTED,
                                 f"replaced by a newer grant stream from host {session.host}"))

    def detach(self, session: Session) -> None:
        session.close()
        if self._sessions.get(session.host) is session:
            del self._sessions[session.host]
            for _, future in self._waiters.pop(session.host, []):
                if not future.done():
                    future.set_result(None)  # disconnected

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def is_connected(self, host: str) -> bool:
        return host in self._sessions

    def answer(self, host: str, answer: Answer) -> None:
        waiting = self._waiters.get(host, [])
        remaining = []
        for version, future in waiting:
            if future.done():
                continue
            if answer.version >= version:
                future.set_result(answer)
            else:
                remaining.append((version, future))
        if remaining:
            self._waiters[host] = remaining
        else:
            self._waiters.pop(host, None)

    def expect(self, hosts: list[str], version: int) -> dict[str, asyncio.Future[Answer | None]]:
        """Futures for each host's answer to ``version`` (or later); register
        them in the same step as the push, before any answer can arrive."""
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[Answer | None]] = {}
        for host in hosts:
            future: asyncio.Future[Answer | None] = loop.create_future()
            self._waiters.setdefault(host, []).append((version, future))
            futures[host] = future
        return futures

    async def collect(self, futures: dict[str, asyncio.Future[Answer | None]], version: int,
                      timeout: float) -> list[HostResult]:
        if futures:
            await asyncio.wait(futures.values(), timeout=timeout)
        results = []
        for host, future in sorted(futures.items()):
            if not future.done():
                future.cancel()
                results.append(HostResult(host, "timeout", version))
                continue
            answer = future.result()
            if answer is None:
                results.append(HostResult(host, "disconnected", version))
            else:
                outcome = "ack" if answer.ok else "nack"
                results.append(HostResult(host, outcome, answer.version, answer.reason))
        return results
