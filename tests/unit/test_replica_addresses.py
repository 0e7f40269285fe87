"""`daemon --controller A,B`: the list is checked, and dialled in turn."""

from __future__ import annotations

import pytest

from ztnet.daemon.channel import FAILOVER_CONNECT_TIMEOUT, Replicas, parse_addresses


def test_addresses_are_checked() -> None:
    assert parse_addresses("ctl-a:7443, ctl-b:7443") == ("ctl-a:7443", "ctl-b:7443")
    assert parse_addresses("[::1]:7443") == ("[::1]:7443",)
    for bad, why in (("ctl-a", "'ctl-a' is not HOST:PORT"), ("a:1,", "'' is not HOST:PORT"),
                     ("a:0", "'a:0'"), ("a:1,a:1", "listed twice")):
        with pytest.raises(ValueError, match=why):
            parse_addresses(bad)


def test_replicas_are_dialled_in_turn() -> None:
    one = Replicas("ctl:7443")
    one.advance()
    assert one.current == "ctl:7443" and one.connect_timeout(10.0) == 10.0
    two = Replicas("a:1,b:2")
    seen = []
    for _ in range(3):
        seen.append(two.current)
        two.advance()
    assert seen == ["a:1", "b:2", "a:1"]
    assert two.connect_timeout(10.0) == FAILOVER_CONNECT_TIMEOUT
