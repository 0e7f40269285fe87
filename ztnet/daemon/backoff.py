"""Reconnect delays: exponential with jitter, capped, reset after a healthy connection.

Jitter ("equal jitter": a random delay between half and all of the current step) keeps a
fleet of daemons that lost the controller at the same moment from reconnecting in lockstep
when it comes back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    _step: float = 0.0

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt; grows with every call."""
        self._step = self.initial if self._step == 0.0 else min(self.cap,
                                                                 self._step * self.factor)
        return self.rng.uniform(self._step / 2, self._step)

    def reset(self) -> None:
        self._step = 0.0
