"""Reconnect delays: grow, are capped, are jittered, start over after a healthy stream."""

from __future__ import annotations

import random

from ztnet.daemon.backoff import Backoff


def test_delays_double_up_to_the_cap_with_jitter_in_the_upper_half() -> None:
    backoff = Backoff(initial=0.5, cap=30.0, rng=random.Random(7))
    steps = [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    for step in steps:
        delay = backoff.next_delay()
        assert step / 2 <= delay <= step


def test_jitter_spreads_a_fleet_that_lost_the_controller_at_once() -> None:
    delays = {round(Backoff(rng=random.Random(seed)).next_delay(), 6) for seed in range(50)}
    assert len(delays) > 40


def test_reset_starts_over() -> None:
    backoff = Backoff(initial=1.0, cap=8.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 1.0
