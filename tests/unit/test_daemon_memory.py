"""The daemon's collector policy (ztnet.daemon.memory): paused around an apply, and
what survives an apply frozen out of later passes."""

from __future__ import annotations

import gc
import os
import platform
import sys
import weakref
from collections.abc import Iterator

import pytest

from ztnet.daemon.memory import collector_paused, settle_long_lived


@pytest.fixture(autouse=True)
def _restore_collector() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    if enabled:
        gc.enable()
    else:
        gc.disable()


def test_the_collector_is_paused_inside_and_restored_after_also_on_error() -> None:
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        assert not gc.isenabled()
        raise RuntimeError("apply failed")
    assert gc.isenabled()
    gc.disable()  # a caller that had it off keeps it off
    with collector_paused():
        pass
    assert not gc.isenabled()


class _Node:
    def __init__(self) -> None:
        self.self_ref = self


def test_a_frozen_cycle_survives_collection_until_the_next_settle_reclaims_it() -> None:
    held = _Node()  # a cycle, like the state an apply installs
    gone = weakref.ref(held)
    settle_long_lived()
    assert gc.get_freeze_count() > 0
    del held
    gc.collect()
    assert gone() is not None  # frozen: full passes no longer walk it
    settle_long_lived()  # the next apply unfreezes first
    assert gone() is None


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_settling_gives_free_heap_pages_in_the_middle_back() -> None:
    # 2,000-byte blocks come from glibc's heap (over pymalloc's 512, under the mmap
    # threshold); one kept block above them keeps the heap's top from being trimmed on free
    blocks = [bytes(2000) for _ in range(20_000)]  # ~40 MiB, zero-filled: resident
    top = bytes(2000)
    del blocks
    before = _rss_mib()
    settle_long_lived()
    after = _rss_mib()
    assert before - after > 20, (before, after)
    assert len(top) == 2000  # held to here
