"""Prerequisites of the kernel tests: they skip with a reason, or fail under ZTNET_REQUIRE_BPF=1.

Every test in this directory is marked ``kernel`` and needs root; an autouse fixture checks
that before the test runs. Tests needing more call :func:`require` (or a helper built on it)
themselves. With ``ZTNET_REQUIRE_BPF=1`` (CI, the Vagrant VMs) a missing prerequisite is an
error, so a machine that silently lost root or BPF cannot go green by skipping everything.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REQUIRE_ENV = "ZTNET_REQUIRE_BPF"
_HERE = Path(__file__).resolve().parent


def prerequisites_required() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1"


def require(condition: bool, reason: str) -> None:
    """Skip the running test unless ``condition``; fail instead under ZTNET_REQUIRE_BPF=1."""
    if condition:
        return
    if prerequisites_required():
        pytest.fail(f"{reason} (a prerequisite, and {REQUIRE_ENV}=1 is set)", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (network namespaces, cgroups, BPF)")


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    require(not missing, f"needs {', '.join(missing)} on PATH")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees every collected item, not only ours: mark just the ones under this dir.
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(autouse=True)
def _kernel_prerequisites(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("kernel") is not None:
        require_root()


# --- datapath fixtures ----------------------------------------------------------------------

from collections.abc import Iterator  # noqa: E402

from tests.kernel.controller_lab import lab  # noqa: E402, F401 (fixture)
from tests.kernel.pair_fixtures import datapath, pair, server  # noqa: E402, F401 (fixtures)
from tests.kernel.support import new_instance, stale_test_instances  # noqa: E402
from ztnet.instance import Instance  # noqa: E402


def require_bpf() -> None:
    """Root, cgroup v2, bcc and kernel headers: what loading the datapath needs."""
    from ztnet.datapath.probe import probe
    from ztnet.errors import UnsupportedKernel

    require_root()
    try:
        probe()
    except UnsupportedKernel as exc:
        require(False, str(exc))


@pytest.fixture(scope="session", autouse=True)
def _remove_stale_test_instances() -> None:
    """A crashed earlier run may have left test instances behind."""
    if os.geteuid() != 0:
        return
    from ztnet.datapath.datapath import teardown
    from ztnet.lab.netns import cleanup_orphans

    for instance in stale_test_instances():
        teardown(instance)
    cleanup_orphans()


@pytest.fixture
def instance() -> Iterator[Instance]:
    """A private ztnet instance, removed whatever the test did."""
    require_bpf()
    from ztnet.datapath.datapath import teardown

    inst = new_instance()
    try:
        yield inst
    finally:
        teardown(inst)
