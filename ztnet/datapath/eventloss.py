"""Per-agent accounting of the events that did not reach the ring buffer.

Every agent's event stream adds up exactly, per side (deny events; allowed
verdicts and flow ends): what reached user space, plus the drops those events
reported (``KernelEvent.suppressed``), plus what the budgets dropped and no
event has reported yet (``*_pending``), plus what found the ring buffer full
(``*_lost``), is everything that happened. See bpf/events.h.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ztnet.datapath import abi
from ztnet.datapath.bpfsys import PinnedMap


@dataclass(frozen=True, slots=True)
class EventAccounting:
    deny_pending: int      # dropped by the deny budget, not yet reported by an event
    deny_lost: int         # deny ring buffer full (zt_denials_v1)
    allow_suppressed: int  # dropped by the allowed-side budget (reported or not)
    allow_pending: int     # of which no event has reported yet
    allow_lost: int        # ring buffer full (zt_events_v1)

    @property
    def lost(self) -> int:
        return self.deny_lost + self.allow_lost


def _pending(budget: PinnedMap, index: int) -> int:
    value = abi.ZtDenyBudget()
    return int(value.suppressed) if budget.lookup(ctypes.c_int(index), value) else 0


def read(maps: Mapping[str, PinnedMap], indices: Iterable[int]) -> dict[int, EventAccounting]:
    """The accounting of each agent index (zeros for an agent with no losses)."""
    result = {}
    for index in indices:
        per_cpu = maps["zt_agent_events_v1"].percpu_values(index, abi.ZtAgentEvents)
        result[index] = EventAccounting(
            deny_pending=_pending(maps["zt_deny_budget_v1"], index),
            deny_lost=sum(int(v.deny_lost) for v in per_cpu),
            allow_suppressed=sum(int(v.allow_suppressed) for v in per_cpu),
            allow_pending=_pending(maps["zt_allow_budget_v1"], index),
            allow_lost=sum(int(v.allow_lost) for v in per_cpu),
        )
    return result
