"""The shape of the ``ztnet`` command line: every command has working help, every handler
is a module-level function of ztnet.cli, and the commands load only what they run."""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztnet import cli
from ztnet.cli.args import COMMAND_PARSER, HANDLER

ROOT = Path(__file__).resolve().parents[2]


def commands(parser: argparse.ArgumentParser,
             path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                          argparse.ArgumentParser]]:
    """Every (command path, parser) below ``parser``, groups included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


ALL = sorted(path for path, _ in commands(cli.build_parser()))


def test_the_command_tree() -> None:
    top = {path[0] for path in ALL if path}
    assert top == {"daemon", "controller", "hosts", "label", "revoke", "flows",
                   "grant", "grants", "requests", "approve", "deny", "request-grant",
                   "enroll", "run",
                   "agents", "status", "teardown", "demo", "debug", "keys", "policy",
                   "observe", "audit", "lab", "quarantine", "release", "quarantines",
                   "alerts", "baseline"}
    assert ("policy", "apply") in ALL and ("controller", "token", "create") in ALL


@pytest.mark.parametrize("path", ALL, ids=lambda path: " ".join(path) or "ztnet")
def test_every_command_has_help(path: tuple[str, ...],
                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(('ztnet', *path))} ")
    if path:
        assert "example:\n  " in out


def test_every_leaf_command_has_a_module_level_handler() -> None:
    for path, parser in commands(cli.build_parser()):
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        handler = parser.get_default(HANDLER)
        if groups:
            assert handler is None, path
            continue
        assert inspect.isfunction(handler), path
        assert handler.__module__.startswith("ztnet.cli."), path
        assert handler.__qualname__ == handler.__name__, f"{path}: not module-level"
        assert list(inspect.signature(handler).parameters) == ["args"], path
        assert parser.get_default(COMMAND_PARSER) is parser, path


def test_demo_has_no_local_mode(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--local"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --local" in capsys.readouterr().err


def test_a_usage_error_found_by_a_handler_looks_like_argparses(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["flows", "--limit", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ztnet flows ")
    assert err.endswith("ztnet flows: error: --limit: must be between 1 and 10000\n")


def test_option_types_report_the_parsers_message(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in [
        (["daemon", "--spool-max", "1K"], "argument --spool-max: the spool needs at least 1M"),
        (["daemon", "--spool-max", "lots"], "argument --spool-max: bad size 'lots'"),
        (["controller", "token", "create", "--state", "s", "--host", "h", "--ttl", "0s"],
         "argument --ttl: duration '0s' must be greater than zero"),
        (["controller", "serve", "--state", "s", "--listen", "l", "--flow-retention", "1x"],
         "argument --flow-retention: bad duration '1x'"),
    ]:
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert message in capsys.readouterr().err


def test_parsing_loads_neither_bcc_nor_the_lab() -> None:
    """`ztnet daemon` (and every command but the lab's own) works without the lab's extras
    (scapy, pyroute2): they load only when a lab command runs."""
    code = (
        "import sys\n"
        "from ztnet.cli import build_parser\n"
        f"paths = {[list(path) for path in ALL if path[:1] != ('lab',)]!r}\n"
        "parser = build_parser()\n"
        "for path in paths:\n"
        "    try:\n"
        "        parser.parse_args(path)\n"
        "    except SystemExit:\n"
        "        pass  # a group without its sub-command, a missing required option\n"
        "import ztnet.cli.daemon, ztnet.daemon.service, ztnet.daemon.credentials\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('bcc', 'scapy', 'pyroute2')"
        " or m.startswith('ztnet.lab')]\n"
        "sys.exit(f'loaded {loaded}' if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
