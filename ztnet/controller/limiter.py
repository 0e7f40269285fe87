"""Per-host limits on the node API, enforced: what one host (honest, buggy or
compromised) may cost the controller, so it can never slow down the others.

    StreamGrants   at most ``max_streams`` open at once; opening one takes a
                   token from the host's ``subscribe`` bucket
    ReportFlows    at most ``max_streams`` open at once; every record takes a
                   token from the host's ``flow_records`` bucket (a batch
                   waits for its tokens, up to ``MAX_FLOW_WAIT`` seconds:
                   backpressure, not loss; beyond that it is refused)
    RenewCertificate  one token from the host's ``renew`` bucket
    RequestGrant   one token from the host's ``grant_requests`` bucket

A refusal is RESOURCE_EXHAUSTED naming the host, the limit and its flag; a
daemon retries with its usual backoff. The host is the one its certificate
names (limits apply after authentication, so they cost an attacker an
enrolled host, and are keyed by identities the controller issued: the tables
are bounded by the fleet). Everything runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ztnet.controller import status
from ztnet.controller.limits import DEFAULT_LIMITS, HostLimits, Rate

# A batch that would have to wait longer than this for its tokens is refused
# instead: a stream is never held open for long by a host over its rate.
MAX_FLOW_WAIT = 2.0

# (rpc, flag) of each bucket, for the refusal message
_BUCKETS = {"subscribe": ("StreamGrants", "--host-subscribe-rate"),
            "renew": ("RenewCertificate", "--host-renew-rate"),
            "flow_records": ("ReportFlows records", "--host-flow-rate"),
            "grant_requests": ("RequestGrant", "--host-request-rate")}


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


@dataclass(slots=True)
class _Host:
    buckets: dict[str, _Bucket] = field(default_factory=dict)
    streams: dict[str, int] = field(default_factory=dict)


class HostLimiter:
    def __init__(self, limits: HostLimits = DEFAULT_LIMITS, *,
                 clock: Callable[[], float] = time.monotonic,
                 on_refuse: Callable[[str], None] = lambda limit: None) -> None:
        self.limits = limits
        self.clock = clock
        self.on_refuse = on_refuse  # called with the limit's name (metrics)
        self._hosts: dict[str, _Host] = {}

    def admit(self, host: str, bucket: str) -> None:
        """One call of a rate-limited RPC, or RESOURCE_EXHAUSTED."""
        self._take(host, bucket, 1, max_wait=0.0)

    async def throttle(self, host: str, bucket: str, cost: int) -> None:
        """Take ``cost`` tokens, waiting for them if that takes at most
        MAX_FLOW_WAIT seconds; else RESOURCE_EXHAUSTED and nothing is taken."""
        wait = self._take(host, bucket, cost, max_wait=MAX_FLOW_WAIT)
        if wait > 0:
            await asyncio.sleep(wait)

    @contextmanager
    def stream(self, host: str, rpc: str) -> Iterator[None]:
        """Count one open stream of ``rpc`` for ``host`` while inside, or
        RESOURCE_EXHAUSTED if the host has ``max_streams`` open already."""
        limit = self.limits.max_streams
        state = self._hosts.setdefault(host, _Host())
        open_now = state.streams.get(rpc, 0)
        if limit and open_now >= limit:
            self.on_refuse("streams")
            raise status.exhausted(f"controller: host {host} already has {open_now} {rpc} "
                                   f"streams open (the limit, --host-max-streams, is {limit})")
        state.streams[rpc] = open_now + 1
        try:
            yield
        finally:
            state.streams[rpc] -= 1

    def _rate(self, bucket: str) -> Rate:
        rate: Rate = getattr(self.limits, bucket)
        return rate

    def _take(self, host: str, bucket: str, cost: int, *, max_wait: float) -> float:
        """Take ``cost`` tokens; the bucket may go into debt by up to ``max_wait``
        seconds of refill. Returns how long until the tokens are really there
        (0: now); beyond ``max_wait`` RESOURCE_EXHAUSTED, and nothing is taken."""
        rate = self._rate(bucket)
        if rate.count == 0:
            return 0.0
        now = self.clock()
        state = self._hosts.setdefault(host, _Host())
        current = state.buckets.get(bucket)
        if current is None:
            current = state.buckets[bucket] = _Bucket(float(rate.count), now)
        current.tokens = min(float(rate.count),
                             current.tokens + (now - current.updated) * rate.per_second)
        current.updated = now
        # a batch larger than the whole bucket costs the whole bucket: it must
        # be able to pass at all
        after = current.tokens - min(cost, rate.count)
        wait = max(0.0, -after / rate.per_second)
        if wait > max_wait:
            self._refuse(host, bucket, wait)
        current.tokens = after
        return wait

    def _refuse(self, host: str, bucket: str, wait: float) -> None:
        self.on_refuse(bucket)
        rpc, flag = _BUCKETS[bucket]
        raise status.exhausted(f"controller: host {host} is over its {rpc} rate of "
                               f"{self._rate(bucket)} ({flag}); retry in {wait:.1f}s")
