"""The daemon installs nothing but verified bundles: outside the lab, no module
calls the datapath's unverified entry point, and only the verifier builds a
VerifiedBundle. An AST check, so a comment or a string cannot fool it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ztnet"
# The local demo installs a hand-made grant; ztnet.testing holds harnesses.
UNVERIFIED_ALLOWED = ("lab", "testing")
VERIFIER = PACKAGE / "grants" / "bundle.py"


def calls(tree: ast.AST, name: str) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else \
                func.id if isinstance(func, ast.Name) else None
            if called == name:
                lines.append(node.lineno)
    return lines


def offenders(name: str, allowed: tuple[Path, ...]) -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(path == a or a in path.parents for a in allowed):
            continue
        found += [f"{path.relative_to(PACKAGE)}:{line}"
                  for line in calls(ast.parse(path.read_text()), name)]
    return found


def test_only_the_lab_installs_unverified_grants() -> None:
    allowed = tuple(PACKAGE / part for part in UNVERIFIED_ALLOWED)
    assert offenders("install_unverified", allowed) == []


def test_only_the_verifier_builds_a_verified_bundle() -> None:
    assert offenders("VerifiedBundle", (VERIFIER,)) == []


def test_the_check_sees_a_call() -> None:
    tree = ast.parse("def f(d):\n    d.install_unverified([])\n    VerifiedBundle(1)\n")
    assert calls(tree, "install_unverified") == [2] and calls(tree, "VerifiedBundle") == [3]
