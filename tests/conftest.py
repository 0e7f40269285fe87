"""Session-wide hooks: the hardening figures (tests/hardening/figures.py), collected from
every test directory and printed at the end of the run."""

from __future__ import annotations

import pytest
from _pytest.terminal import TerminalReporter

from tests.hardening import figures


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
