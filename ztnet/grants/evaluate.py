"""Reference evaluator: what a set of grants means, in plain Python.

The kernel must agree with this function on every input; the differential
test in tests/kernel/test_differential.py checks that it does.
"""

from __future__ import annotations

from collections.abc import Iterable

from ztnet.grants.model import Grant, IPAddress, Proto, normalize_address


def allowed_by(
    grants: Iterable[Grant],
    agent: str,
    proto: int,
    address: IPAddress,
    port: int | None,
    when: float,
) -> Grant | None:
    """The first grant that allows ``agent`` to send ``proto`` (an IP protocol
    number) to ``address``:``port`` at ``when``, or None. ``port`` is None for
    protocols without ports."""
    address = normalize_address(address)
    proto_class = Proto.ICMP if proto in (1, 58) else proto
    for grant in grants:
        if grant.agent != agent or not grant.live_at(when):
            continue
        if grant.proto is not Proto.ANY and grant.proto != proto_class:
            continue
        if address.version != grant.network.version or address not in grant.network:
            continue
        if grant.ports is not None and (port is None or port not in grant.ports):
            continue
        return grant
    return None
