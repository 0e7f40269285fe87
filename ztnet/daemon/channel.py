"""gRPC channels to the controller, always verified against the pinned CA.

There is no insecure channel here: the only unverified connection a host ever makes is the
chain read in ``pinning`` (nothing is sent on it). With a key and certificate the channel is
mutual TLS (the host's identity); without, it is server-authenticated TLS (enrollment).
"""

from __future__ import annotations

import grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the largest bundle the daemon accepts
# Keepalive pings notice a controller that vanished without closing the connection (power
# loss, a partition); 20 s apart, 10 s to answer.
_KEEPALIVE = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
              ("grpc.keepalive_permit_without_calls", 1),
              ("grpc.http2.max_pings_without_data", 0)]


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
