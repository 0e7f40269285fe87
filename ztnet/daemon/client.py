"""The controller client: the grant stream and certificate renewal, off the main thread.

The daemon's main loop must never wait on the network (signals, resync and applying are
its job), so the client runs two threads and talks to the loop through a queue and a
wake-up pipe the loop's selector watches:

    stream thread   connect (mutual TLS) → Subscribe{host, version_held} → every pushed
                    bundle goes on the queue and one byte into the pipe; reconnects with
                    exponential backoff and jitter, reset after a healthy stream, to the
                    next controller replica of ``--controller A,B,…`` (channel.Replicas)
    renewal thread  past half the host certificate's lifetime: RenewCertificate over the
                    authenticated channel, store the checked certificate, then recycle the
                    stream so it presents the new one
    main thread     ``pushes()`` drains the queue; the daemon verifies and applies each
                    bundle and answers with ``answer()`` (Ack or Nack with the reason)

Nothing the client receives is trusted: it only carries envelopes to the daemon, which
verifies their signatures. An answer for a stream that has since been replaced is dropped;
the new stream's Subscribe says what the daemon holds.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc

from ztnet import logs
from ztnet.daemon import renewal
from ztnet.daemon.backoff import Backoff
from ztnet.daemon.channel import CallScope, Replicas, controller_channel, describe, wait_ready
from ztnet.daemon.credentials import HostCredentials
from ztnet.v1 import node_pb2, node_pb2_grpc

T = TypeVar("T")
CONNECT_TIMEOUT = 10.0
RPC_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class Push:
    """One bundle as the controller pushed it; ``stream`` says which stream to answer on."""

    version: int
    nonce: str
    envelope: bytes
    stream: int


class _Stream(CallScope):
    """One connection attempt and its StreamGrants call: the outgoing requests, and what
    to cancel when it must end."""

    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number
        self.outgoing: queue.Queue[node_pb2.GrantStreamRequest | None] = queue.Queue()

    def requests(self) -> Iterator[node_pb2.GrantStreamRequest]:
        while (item := self.outgoing.get()) is not None:
            yield item

    def _closing(self) -> None:
        self.outgoing.put(None)  # ends requests(), so gRPC's sender thread can exit


class ControllerClient:
    def __init__(self, credentials: HostCredentials, address: str,
                 version_held: Callable[[], int], *, backoff_cap: float = 30.0,
                 healthy_after: float = 10.0) -> None:
        self.credentials = credentials
        self.replicas = Replicas(address)
        self.version_held = version_held
        self.backoff = Backoff(cap=backoff_cap)
        self.healthy_after = healthy_after
        self._inbox: queue.Queue[Push] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._kick = threading.Event()  # cut a backoff wait short (stop, SIGHUP, renewal)
        self._stream: _Stream | None = None
        self._streams = 0
        self._threads = [threading.Thread(target=self._stream_loop, name="ztnet-stream",
                                          daemon=True),
                         threading.Thread(target=self._renew_loop, name="ztnet-renew",
                                          daemon=True)]

    # --- the main thread's side --------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def fileno(self) -> int:
        return self._wake_r

    def pushes(self) -> list[Push]:
        """Every push received since the last call (drains the wake-up pipe)."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        items: list[Push] = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def answer(self, push: Push, ok: bool, reason: str = "") -> None:
        """Ack (``ok``) or Nack ``push`` on the stream it came from, if that still exists."""
        with self._lock:
            stream = self._stream if self._stream and self._stream.number == push.stream \
                else None
        if stream is None:
            logs.event("controller answer dropped", logging.WARNING, version=push.version,
                       reason="the stream it came on is gone")
            return
        if ok:
            request = node_pb2.GrantStreamRequest(
                ack=node_pb2.Ack(version=push.version, nonce=push.nonce))
        else:
            request = node_pb2.GrantStreamRequest(
                nack=node_pb2.Nack(version=push.version, nonce=push.nonce, reason=reason))
        stream.outgoing.put(request)
        logs.event("controller ack" if ok else "controller nack",
                   logging.INFO if ok else logging.WARNING, version=push.version,
                   nonce=push.nonce, **({} if ok else {"reason": reason}))

    def reconnect(self) -> None:
        """Drop the stream and connect again at once (SIGHUP, a renewed certificate)."""
        self.backoff.reset()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()
        self._kick.set()

    def stop(self) -> None:
        self._stopping.set()
        self._kick.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)
        if not any(thread.is_alive() for thread in self._threads):
            # a thread still running might write the pipe: leave it open then (exit closes it)
            os.close(self._wake_r)
            os.close(self._wake_w)

    # --- the stream thread -------------------------------------------------------------

    def _stream_loop(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                received = self._stream_once()
            except Exception as exc:  # a bug here must not end reconnecting for good
                logs.event("controller client failed", logging.ERROR, error=repr(exc))
                received = 0
            if self._stopping.is_set():
                return
            if received or time.monotonic() - started >= self.healthy_after:
                self.backoff.reset()
            delay = 0.0 if self._kick.is_set() else self.backoff.next_delay()
            self._kick.clear()
            logs.event("controller reconnect scheduled", delay_s=round(delay, 2))
            self._kick.wait(delay)
            self._kick.clear()

    def _stream_once(self) -> int:
        """One connection and its stream until either ends; returns how many pushes came."""
        with self._lock:
            # Registered before connecting, and with the credentials it will present: a
            # reconnect() (say, after renewal) from now on ends this attempt, wherever it is.
            key_pem, cert_pem = self.credentials.key_pem, self.credentials.cert_pem
            self._streams += 1
            stream = self._stream = _Stream(self._streams)
            if self._stopping.is_set():  # stop() ran since the loop checked
                return 0
        identity = self.credentials.identity
        address = self.replicas.current
        channel = controller_channel(address, self.credentials.ca_pem,
                                     identity.server_name, key_pem=key_pem, cert_pem=cert_pem)
        received = 0
        try:
            timeout = self.replicas.connect_timeout(CONNECT_TIMEOUT)
            connected = wait_ready(channel, stream, timeout)
            if connected == "timeout":
                logs.event("controller unreachable", logging.WARNING, controller=address,
                           timeout_s=timeout)
            if connected != "ready":
                return 0
            held = self.version_held()
            stream.outgoing.put(node_pb2.GrantStreamRequest(
                subscribe=node_pb2.Subscribe(host=identity.host, version_held=held)))
            call = node_pb2_grpc.NodeServiceStub(channel).StreamGrants(stream.requests())
            if not stream.attach(call.cancel):
                return 0
            logs.event("controller connected", controller=address, stream=stream.number,
                       version_held=held)
            for response in call:
                received += 1
                logs.event("bundle pushed", version=response.version, nonce=response.nonce,
                           bytes=len(response.envelope))
                self._inbox.put(Push(response.version, response.nonce, response.envelope,
                                     stream.number))
                os.write(self._wake_w, b"!")
            logs.event("controller disconnected", logging.WARNING, controller=address,
                       reason="stream ended by the controller")
        except grpc.RpcError as exc:
            if not self._stopping.is_set():
                logs.event("controller disconnected", logging.WARNING, controller=address,
                           reason=describe(exc), pushes=received)
        finally:
            with self._lock:
                if self._stream is stream:
                    self._stream = None
            stream.close()
            channel.close()
            self.replicas.advance()  # the stream ended or never began: next time the next one
        return received

    def call(self, invoke: Callable[[node_pb2_grpc.NodeServiceStub], T]) -> T:
        """One unary call on a channel of its own with the current credentials (for the
        grant-request socket's threads); grpc.RpcError when it fails."""
        with self._lock:
            key_pem, cert_pem = self.credentials.key_pem, self.credentials.cert_pem
        channel = controller_channel(self.replicas.current, self.credentials.ca_pem,
                                     self.credentials.identity.server_name,
                                     key_pem=key_pem, cert_pem=cert_pem)
        try:
            return invoke(node_pb2_grpc.NodeServiceStub(channel))
        finally:
            channel.close()

    # --- the renewal thread ------------------------------------------------------------

    def _renew_loop(self) -> None:
        retry = Backoff(initial=5.0, cap=300.0)
        while not self._stopping.is_set():
            wait = self.credentials.renew_at() - time.time()
            if wait > 0 and self._stopping.wait(wait):
                return
            try:
                self._renew()
            except Exception as exc:  # RPC, refused certificate, disk: retry later, never die
                reason = describe(exc) if isinstance(exc, grpc.RpcError) else str(exc)
                expired = self.credentials.not_after <= time.time()
                logs.event("certificate renewal failed", logging.ERROR if expired
                           else logging.WARNING, reason=reason, expired=expired,
                           not_after=round(self.credentials.not_after))
                self._stopping.wait(retry.next_delay())
                continue
            retry.reset()
            self.reconnect()  # present the new certificate from now on

    def _renew(self) -> None:
        certificate_pem = self.call(
            lambda stub: renewal.renew(stub, self.credentials, RPC_TIMEOUT))
        with self._lock:
            self.credentials.store_certificate(certificate_pem)
        logs.event("certificate renewed", not_after=round(self.credentials.not_after),
                   serial=format(self.credentials.cert.serial_number, "x"))
