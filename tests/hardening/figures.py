"""The figures the hardening suite proves, collected while tests run and printed at the end.

Any test can add to them (the hostile-agent tests in tests/kernel too):

    from tests.hardening import figures
    figures.fuzzed()                      # one generated input handled correctly
    figures.escape(blocked=True)          # one escape attempt made by a hostile agent
    figures.leaked(0)                     # packets a sniffer saw that no grant allowed
    figures.records(lost=0, accounted=n)  # flow records lost / lost-but-counted

Faults and escapes are also counted from test outcomes: every test marked
``@pytest.mark.fault`` is a fault, survived when the test passes; every test marked
``@pytest.mark.escape`` is one escape attempt by a hostile agent, blocked when it passes
(skipped tests count for neither). Nothing is printed when no figure was
recorded. ``HARDENING_SUMMARY=path`` also writes the figures as JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest


@dataclass
class Figures:
    faults_run: int = 0
    faults_survived: int = 0
    faults_expected_to_fail: list[str] = field(default_factory=list)  # xfail: owned elsewhere
    escape_attempts: int = 0
    escapes_blocked: int = 0
    inputs_fuzzed: int = 0
    packets_leaked: int = 0
    records_lost: int = 0
    records_accounted: int = 0  # lost by design (budgets, full rings) but counted exactly

    def any(self) -> bool:
        return bool(self.faults_run or self.escape_attempts or self.inputs_fuzzed
                    or self.records_accounted or self.records_lost or self.packets_leaked)


FIGURES = Figures()


def fuzzed(count: int = 1) -> None:
    FIGURES.inputs_fuzzed += count


def escape(*, blocked: bool) -> None:
    FIGURES.escape_attempts += 1
    FIGURES.escapes_blocked += int(blocked)


def leaked(packets: int) -> None:
    FIGURES.packets_leaked += packets


def records(*, lost: int = 0, accounted: int = 0) -> None:
    FIGURES.records_lost += lost
    FIGURES.records_accounted += accounted


def on_report(report: pytest.TestReport, item_markers: set[str]) -> None:
    decided = report.when == "call" or (report.when == "setup" and report.outcome != "passed")
    if not decided or report.skipped and not hasattr(report, "wasxfail"):
        return
    if "escape" in item_markers:  # a test of one hostile-agent escape attempt
        escape(blocked=report.passed)
    if "fault" not in item_markers:
        return
    FIGURES.faults_run += 1
    if hasattr(report, "wasxfail"):
        FIGURES.faults_expected_to_fail.append(f"{report.nodeid} ({report.wasxfail})")
    elif report.passed:
        FIGURES.faults_survived += 1


def summary_lines() -> list[str]:
    f = FIGURES
    lines = [
        f"faults survived:        {f.faults_survived} of {f.faults_run}"
        + (f" ({len(f.faults_expected_to_fail)} expected to fail until their item lands)"
           if f.faults_expected_to_fail else ""),
        f"escape attempts made:   {f.escape_attempts}, blocked: {f.escapes_blocked}",
        f"inputs fuzzed:          {f.inputs_fuzzed}",
        f"packets leaked:         {f.packets_leaked} (must be 0)",
        f"records lost:           {f.records_lost} (must be 0); "
        f"dropped by budgets and accounted for exactly: {f.records_accounted}",
    ]
    lines += [f"  xfail: {name}" for name in f.faults_expected_to_fail]
    return lines


def write_json() -> None:
    target = os.environ.get("HARDENING_SUMMARY")
    if target:
        Path(target).write_text(json.dumps(asdict(FIGURES), indent=2) + "\n")
