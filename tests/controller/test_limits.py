"""The per-host limiter in-process, on a clock the test moves: buckets refill
evenly, hosts never share one, flow batches wait (within a bound) instead of
failing, open streams are counted and released."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ztnet.controller.limiter import HostLimiter
from ztnet.controller.limits import HostLimits, Rate, parse_rate
from ztnet.controller.status import RpcFailure


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_parse_rate() -> None:
    assert parse_rate("30/m") == Rate(30, 60.0) and str(Rate(30, 60.0)) == "30/m"
    assert parse_rate("5/10s") == Rate(5, 10.0) and str(parse_rate("5/10s")) == "5/10s"
    assert parse_rate("off") == parse_rate("0") == Rate(0)
    for bad in ("30", "0/s", "3/0s", "-1/s", "1/d", "x/s"):
        with pytest.raises(ValueError, match="is not a rate"):
            parse_rate(bad)


def test_a_bucket_per_host_refilled_evenly() -> None:
    clock, refused = Clock(), list[str]()
    limiter = HostLimiter(HostLimits(subscribe=Rate(3, 60.0)), clock=clock,
                          on_refuse=refused.append)
    for _ in range(3):
        limiter.admit("a", "subscribe")
    with pytest.raises(RpcFailure) as excinfo:
        limiter.admit("a", "subscribe")
    assert excinfo.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(excinfo.value) == ("controller: host a is over its StreamGrants rate of 3/m "
                                  "(--host-subscribe-rate); retry in 20.0s")
    limiter.admit("b", "subscribe")  # another host's bucket is full
    clock.now += 20.0  # one token back
    limiter.admit("a", "subscribe")
    with pytest.raises(RpcFailure):
        limiter.admit("a", "subscribe")
    assert refused == ["subscribe", "subscribe"]


def test_flow_batches_wait_for_their_tokens_within_a_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    limiter = HostLimiter(HostLimits(flow_records=Rate(1000, 1.0)), clock=clock)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:  # records the wait instead of taking it
        waits.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", sleep)

    async def run() -> None:
        await limiter.throttle("h", "flow_records", 1000)  # the burst
        await limiter.throttle("h", "flow_records", 500)  # half a second of debt
        await limiter.throttle("h", "flow_records", 1000)  # 1.5 s
        with pytest.raises(RpcFailure, match="retry in 2.5s"):
            await limiter.throttle("h", "flow_records", 1000)  # 2.5 s: refused, none taken
        clock.now += 1.5  # the debt paid off
        await limiter.throttle("h", "flow_records", 1)
        clock.now += 10.0
        await limiter.throttle("h", "flow_records", 50_000)  # costs at most the bucket

    asyncio.run(run())
    assert waits == [0.5, 1.5, 0.001]


def test_open_streams_are_counted_per_host_and_rpc() -> None:
    limiter = HostLimiter(HostLimits(max_streams=2))
    with limiter.stream("h", "ReportFlows"), limiter.stream("h", "ReportFlows"):
        with pytest.raises(RpcFailure, match=r"already has 2 ReportFlows streams open "
                           r"\(the limit, --host-max-streams, is 2\)"):
            with limiter.stream("h", "ReportFlows"):
                pass
        with limiter.stream("h", "StreamGrants"), limiter.stream("g", "ReportFlows"):
            pass
    with limiter.stream("h", "ReportFlows"):  # released on the way out
        pass


def test_zero_is_no_limit() -> None:
    limiter = HostLimiter(HostLimits(subscribe=Rate(0), max_streams=0))
    for _ in range(1000):
        limiter.admit("h", "subscribe")
    with limiter.stream("h", "StreamGrants"), limiter.stream("h", "StreamGrants"):
        pass
