"""Fixtures of the hardening suite: the kernel tests' private instances (root + BPF; they
skip with a reason, or fail under ZTNET_REQUIRE_BPF=1)."""

from __future__ import annotations

from tests.kernel.conftest import _remove_stale_test_instances, instance  # noqa: F401
