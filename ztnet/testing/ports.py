"""Loopback ports for processes under test."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port free a moment ago: for a listener whose address must be known before
    it starts (a metrics endpoint, a controller that must come back on the same address)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
