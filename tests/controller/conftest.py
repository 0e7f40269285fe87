"""Shared controller for the process-level tests of one module: starting one
costs about a second, so tests that only need "a running controller" share
it and assert on versions relative to what they read first."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ztnet.testing.controller import (
    ControllerProcess,
    ControllerState,
    init_controller,
    write_policy,
)

BASE_POLICY = {"bot": [("10.0.0.1", "443"), ("10.0.0.2", "80")], "other": [("10.9.0.0/16", "22")]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("controller")


@pytest.fixture(scope="module")
def state(workdir: Path) -> ControllerState:
    return init_controller(workdir / "state")


@pytest.fixture(scope="module")
def controller(state: ControllerState, workdir: Path) -> Iterator[ControllerProcess]:
    policy = write_policy(workdir, BASE_POLICY)
    with ControllerProcess(state, policy=policy) as process:
        yield process
    assert process.stop() == 0, process.log()
