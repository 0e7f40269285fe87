"""gRPC channels to the controller, always verified against the pinned CA, and the
controller replicas to dial (``Replicas``).

There is no insecure channel here: the only unverified connection a host ever makes is the
chain read in ``pinning`` (nothing is sent on it). With a key and certificate the channel is
mutual TLS (the host's identity); without, it is server-authenticated TLS (enrollment).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal

import grpc

from ztnet.grants.limits import MAX_BUNDLE_MESSAGE_BYTES

# The largest message the daemon accepts: a pushed bundle of the largest size (limits.py).
MAX_MESSAGE_BYTES = MAX_BUNDLE_MESSAGE_BYTES
# Keepalive pings notice a controller that vanished without closing the connection (power
# loss, a partition); 20 s apart, 10 s to answer.
_KEEPALIVE = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
              ("grpc.keepalive_permit_without_calls", 1),
              ("grpc.http2.max_pings_without_data", 0)]


# With several replicas, give up on an unreachable one sooner and try the next.
FAILOVER_CONNECT_TIMEOUT = 3.0


def parse_addresses(spec: str) -> tuple[str, ...]:
    """``HOST:PORT[,HOST:PORT…]`` → the addresses; ValueError naming the bad one."""
    addresses = tuple(part.strip() for part in spec.split(","))
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{address!r} is not HOST:PORT (in {spec!r})")
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"an address is listed twice in {spec!r}")
    return addresses


class Replicas:
    """The controller replicas a daemon follows, dialled in turn: after a stream ends or
    an attempt fails, the next attempt goes to the next address (with the caller's
    backoff in between), so the hosts of a replica that died move to the others, and
    resume there from the version they hold. One DNS name with several addresses needs
    no list: gRPC's resolver tries each address of the name on every attempt."""

    def __init__(self, spec: str) -> None:
        self.all = parse_addresses(spec)
        self._next = 0
        self._lock = threading.Lock()

    @property
    def current(self) -> str:
        return self.all[self._next]

    def connect_timeout(self, alone: float) -> float:
        """``alone``: the timeout with one address to dial."""
        return alone if len(self.all) == 1 else min(alone, FAILOVER_CONNECT_TIMEOUT)

    def advance(self) -> None:
        with self._lock:
            self._next = (self._next + 1) % len(self.all)


def controller_channel(address: str, ca_pem: bytes, server_name: str = "", *,
                       key_pem: bytes | None = None, cert_pem: bytes | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem,
                                               certificate_chain=cert_pem)
    options: list[tuple[str, str | int]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # A fresh channel per connection attempt: our own backoff decides when to retry,
        # not the channel's hidden reconnect timer.
        ("grpc.use_local_subchannel_pool", 1),
        # Within one attempt, retry the TCP/TLS connection quickly (the default starts at
        # 1 s and grows to 120 s), so a controller that just came back is found at once.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        *_KEEPALIVE,
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, credentials, options=options)


def describe(exc: grpc.RpcError) -> str:
    """``CODE: details`` of a failed call, for one-line messages and logs."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details or 'no details'}"


class CallScope:
    """One connection attempt and its calls: what to cancel when it must end. Closing may
    race with the thread still setting the attempt up, so whatever is attached after
    close() is cancelled at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._cancels: list[Callable[[], object]] = []

    @property
    def closed(self) -> bool:
        return self._closed

    def attach(self, cancel: Callable[[], object]) -> bool:
        """Cancel with the scope; False (and cancelled now) if it is already closed."""
        with self._lock:
            if not self._closed:
                self._cancels.append(cancel)
                return True
        cancel()
        return False

    def close(self) -> None:
        """Cancel everything attached (once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            cancels = list(self._cancels)
        self._closing()
        for cancel in cancels:
            cancel()

    def _closing(self) -> None:
        """Runs once, before the cancels (for subclasses)."""


def wait_ready(channel: grpc.Channel, scope: CallScope,
               timeout: float) -> Literal["ready", "closed", "timeout"]:
    """Connect (TLS handshake included) within ``timeout``; closing ``scope`` ends the
    wait early."""
    ready = grpc.channel_ready_future(channel)
    if not scope.attach(ready.cancel):
        return "closed"
    try:
        ready.result(timeout=timeout)
    except grpc.FutureCancelledError:
        return "closed"
    except grpc.FutureTimeoutError:
        return "timeout"
    return "ready"
