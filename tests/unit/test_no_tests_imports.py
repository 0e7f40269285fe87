"""No file outside tests/ imports tests: the product (ztnet/), the benchmarks and the Vagrant
checks take their harnesses from ztnet.testing and the lab's traffic matrix from
ztnet.lab.scenarios. Files are parsed (AST), nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUTSIDE_TESTS = ("ztnet", "benchmarks", "vagrant", "scripts")


def imports_of_tests(root: Path) -> list[str]:
    """``path:line: module`` for every import of ``tests`` (or below it) in the Python files
    of ``root``'s OUTSIDE_TESTS directories, wherever the import stands."""
    found: list[str] = []
    for top in OUTSIDE_TESTS:
        for path in sorted((root / top).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                else:
                    continue
                found += [f"{path.relative_to(root)}:{node.lineno}: {name}" for name in names
                          if name == "tests" or name.startswith("tests.")]
    return found


def test_nothing_outside_tests_imports_tests() -> None:
    assert imports_of_tests(REPO) == []


def test_the_check_finds_every_form_of_import(tmp_path: Path) -> None:
    for top in OUTSIDE_TESTS:
        (tmp_path / top).mkdir()
    (tmp_path / "benchmarks" / "a.py").write_text("from tests.kernel.support import x\n")
    (tmp_path / "vagrant" / "b.py").write_text("def f():\n    import tests.kernel\n")
    (tmp_path / "ztnet" / "c.py").write_text("from tests import conftest\n")
    (tmp_path / "ztnet" / "d.py").write_text("from . import tests\nimport testsuite\n")
    assert imports_of_tests(tmp_path) == [
        "ztnet/c.py:1: tests", "benchmarks/a.py:1: tests.kernel.support",
        "vagrant/b.py:2: tests.kernel"]
