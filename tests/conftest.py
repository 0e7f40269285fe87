"""Session-wide hooks and fixtures for every suite: the hardening figures
(tests/hardening/figures.py), collected from every test directory and printed at the end of
the run; software TPMs (swtpm) for the TPM-bound identity tests (tests/controller/test_tpm_*.py,
tests/kernel/test_controller_e2e.py); one PostgreSQL server for the session (the store
contract tests on both backends, the replica tests), a fresh database per test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _pytest.terminal import TerminalReporter

from tests.hardening import figures
from ztnet.testing import postgres
from ztnet.testing.swtpm import EkAuthority, SoftwareTpm
from ztnet.testing.swtpm import available as swtpm_available


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    figures.on_report(report, {mark.name for mark in item.iter_markers()})


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    if not figures.FIGURES.any():
        return
    terminalreporter.section("hardening figures")
    for line in figures.summary_lines():
        terminalreporter.write_line(line)
    figures.write_json()



@pytest.fixture(scope="session")
def ek_authority(tmp_path_factory: pytest.TempPathFactory) -> EkAuthority:
    """The EK CA the TPM controllers trust (a test anchor only). Its certificates exist
    once a first TPM is manufactured, so one is, and thrown away."""
    skip_without_swtpm()
    root = tmp_path_factory.mktemp("ek-ca")
    authority = EkAuthority.create(root / "ca")
    SoftwareTpm.manufacture(root / "first-tpm", authority)
    return authority


@pytest.fixture
def swtpm(tmp_path: Path, ek_authority: EkAuthority) -> Iterator[Callable[..., SoftwareTpm]]:
    """``swtpm(authority=ek_authority)``: a freshly manufactured software TPM, serving on
    free loopback ports until the test ends (passed or not). ``authority=None``: a TPM
    without an EK certificate."""
    started: list[SoftwareTpm] = []

    def start(authority: EkAuthority | None | str = "default") -> SoftwareTpm:
        chosen = ek_authority if authority == "default" else authority
        assert chosen is None or isinstance(chosen, EkAuthority)
        tpm = SoftwareTpm.manufacture(tmp_path / f"tpm-{len(started)}", chosen)
        started.append(tpm)
        tpm.start()
        return tpm

    try:
        yield start
    finally:
        for tpm in started:
            tpm.stop()


def skip_without_swtpm() -> None:
    """Skip with the reason, or fail under ZTNET_REQUIRE_TPM=1 (CI: .ci/run)."""
    reason = swtpm_available()
    if reason is None:
        return
    if os.environ.get("ZTNET_REQUIRE_TPM") == "1":
        pytest.fail(f"ZTNET_REQUIRE_TPM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.PostgresServer]:
    """One real PostgreSQL for the session (tests that stop it restart it)."""
    skip_without_postgres()
    server = postgres.PostgresServer.start()
    try:
        yield server
    finally:
        server.close()


def skip_without_postgres() -> None:
    """Skip with the reason, or fail under ZTNET_REQUIRE_POSTGRES=1 (CI: .ci/run)."""
    reason = postgres.available()
    if reason is None:
        return
    if os.environ.get("ZTNET_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"ZTNET_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)
