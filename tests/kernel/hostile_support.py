"""Helpers for the hostile-agent tests: a scratch user, running ztnet.lab.hostile as an agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ztnet.instance import Instance
from ztnet.testing.agents import agent_argv


def hostile_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ztnet.lab.hostile", *args]


def run_argv(instance: Instance, agent: str, flags: Sequence[str],
             argv: Sequence[str]) -> list[str]:
    """`ztnet run` with exactly ``flags`` (no user translation), then ``argv``."""
    return [sys.executable, "-m", "ztnet.cli", "run", "--instance", instance.name,
            "--agent", agent, *flags, "--", *argv]


def attempts(stdout: str) -> dict[str, dict[str, object]]:
    """The hostile program's JSON lines, by attempt name."""
    found: dict[str, dict[str, object]] = {}
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            record = json.loads(line)
            found[str(record["attempt"])] = record
    return found


def run_hostile(instance: Instance, agent: str, args: Sequence[str], *, user: str | None = "nobody",
                netns: str | None = None, timeout: float = 60.0) -> dict[str, dict[str, object]]:
    proc = subprocess.run(agent_argv(instance, agent, hostile_argv(*args), netns=netns, user=user),
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"agent failed ({proc.returncode}): {proc.stderr}"
    return attempts(proc.stdout)


@contextmanager
def scratch_user(tag: str) -> Iterator[str]:
    """A system user that exists only for the test (no home, no shell)."""
    name = f"zt{tag}{os.getpid() % 100000}"[:31]
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


class Ledger:
    """Escape attempts made and blocked in one test, reported with record_property."""

    def __init__(self) -> None:
        self.made = 0
        self.blocked = 0

    def blocked_attempt(self, record: dict[str, object], *expected: str) -> None:
        self.made += 1
        assert record["result"] in expected, record
        self.blocked += 1
