"""Imports point down only: the layer table of docs/architecture.md, enforced.

Every module under ztnet/ is parsed (AST, nothing is imported) and each of its
imports of a ztnet module, wherever it stands (top level, inside a function,
under TYPE_CHECKING), must go to its own layer unit or to a lower rank:

    rank 0  utilities: errors, fsutil, logs, durations, pki, text, instance, protogen, v1
    rank 1  grants        rank 2  policy      rank 3  identity    rank 4  datapath
    rank 5  observe       rank 6  daemon, controller (siblings: neither imports the other)
    rank 7  lab           rank 8  testing
    top     cli: the entry point, may import anything; nothing imports it

The utility modules are one unit: they may import each other. Nothing in ztnet
imports ``tests``. A ztnet module that is not in the table fails the test too,
so a new top-level module gets a rank before it gets callers.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

UTILITIES = "utilities"
CLI_RANK = 100
# layer unit -> (rank, modules that belong to it: a module and everything below it)
LAYERS: dict[str, tuple[int, tuple[str, ...]]] = {
    UTILITIES: (0, ("ztnet", "ztnet.errors", "ztnet.fsutil", "ztnet.logs", "ztnet.durations",
                    "ztnet.pki", "ztnet.text", "ztnet.instance", "ztnet.protogen", "ztnet.v1")),
    "grants": (1, ("ztnet.grants",)),
    "policy": (2, ("ztnet.policy",)),
    "identity": (3, ("ztnet.identity",)),
    "datapath": (4, ("ztnet.datapath",)),
    "observe": (5, ("ztnet.observe",)),
    "daemon": (6, ("ztnet.daemon",)),
    "controller": (6, ("ztnet.controller",)),
    "lab": (7, ("ztnet.lab",)),
    "testing": (8, ("ztnet.testing",)),
    "cli": (CLI_RANK, ("ztnet.cli",)),
}
@dataclass(frozen=True, slots=True)
class Violation:
    path: str
    line: int
    importer: str
    imported: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported}: {self.reason}"


def layer_of(module: str) -> str | None:
    """The unit owning ``module``: the longest table entry that is it or a parent of it
    (``ztnet`` itself, the package root, is only the root: ``ztnet.foo`` must be listed)."""
    best: tuple[int, str] | None = None
    for unit, (_, prefixes) in LAYERS.items():
        for prefix in prefixes:
            exact = module == prefix
            below = module.startswith(prefix + ".") and prefix != "ztnet"
            if (exact or below) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), unit)
    return None if best is None else best[1]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool,
                     known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every import in ``tree``. ``from a import b`` names module
    ``a.b`` when that is a module of the tree (or, from the package root ``ztnet``, a name
    the layer table knows, such as a cli that does not exist yet), else ``a``; relative
    imports are resolved against ``module``."""
    found: dict[tuple[int, str], None] = {}  # ordered, one entry per (line, module)
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(((node.lineno, alias.name), None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                named = candidate in known or (base == "ztnet" and layer_of(candidate) is not None)
                found[(node.lineno, candidate if named else base)] = None
    return list(found)


def find_violations(root: Path) -> list[Violation]:
    """Every import under ``root/ztnet`` that breaks the layer table (``root`` holds the
    ``ztnet`` package, as the repository does)."""
    files = sorted((root / "ztnet").rglob("*.py"))
    known = {module_name(root, path) for path in files}
    violations: list[Violation] = []
    for path in files:
        importer = module_name(root, path)
        where = str(path.relative_to(root))
        own = layer_of(importer)
        if own is None:
            violations.append(Violation(where, 1, importer, importer,
                                        "module is not in the layer table"))
            continue
        own_rank = LAYERS[own][0]
        tree = ast.parse(path.read_text(), filename=where)
        for line, imported in imported_modules(tree, importer, path.name == "__init__.py",
                                               known):
            top = imported.partition(".")[0]
            if top == "tests":
                violations.append(Violation(where, line, importer, imported,
                                            "nothing in ztnet imports tests"))
                continue
            if top != "ztnet":
                continue
            target = layer_of(imported)
            if target is None:
                violations.append(Violation(where, line, importer, imported,
                                            "imported module is not in the layer table"))
            elif target == own:
                continue
            elif target == "cli":
                violations.append(Violation(where, line, importer, imported,
                                            "nothing imports cli (the entry point)"))
            elif own != "cli" and LAYERS[target][0] >= own_rank:
                violations.append(Violation(
                    where, line, importer, imported,
                    f"{own} (rank {own_rank}) may import only lower ranks, not {target} "
                    f"(rank {LAYERS[target][0]})"))
    return violations


def test_ztnet_imports_point_down() -> None:
    violations = find_violations(REPO)
    assert not violations, "imports that break the layer table (docs/architecture.md):\n" + (
        "\n".join(str(v) for v in violations))


# --- the checker itself: every rule must be able to fail --------------------------------


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for directory in {p.parent for p in root.rglob("*.py")}:
        (directory / "__init__.py").touch()
    return root


BASE = {
    "ztnet/errors.py": "class ZtnetError(Exception): ...\n",
    "ztnet/fsutil.py": "from ztnet.errors import ZtnetError\n",
    "ztnet/grants/model.py": "from ztnet import errors\n",
    "ztnet/policy/document.py": "from ztnet.grants.model import *\nfrom . import fields\n",
    "ztnet/policy/fields.py": "",
    "ztnet/daemon/service.py": "from ztnet.policy import document\n",
    "ztnet/controller/server.py": "import ztnet.grants.model\n",
    "ztnet/cli.py": "from ztnet.daemon import service\nfrom ztnet.controller import server\n",
}


def reported(tmp_path: Path, extra: dict[str, str]) -> list[tuple[str, str]]:
    root = make_tree(tmp_path, {**BASE, **extra})
    return [(v.importer, v.imported) for v in find_violations(root)]


def test_a_tree_whose_imports_point_down_passes(tmp_path: Path) -> None:
    assert reported(tmp_path, {}) == []


def test_an_added_upward_import_is_reported(tmp_path: Path) -> None:
    upward = {"ztnet/grants/bundle.py": """\
        from ztnet.grants.model import *

        def issue():
            from ztnet.policy.document import Policy  # lazy, still an edge
            return Policy
        """}
    assert reported(tmp_path, upward) == [("ztnet.grants.bundle", "ztnet.policy.document")]
    (violation,) = find_violations(tmp_path)
    assert violation.line == 4 and "grants (rank 1)" in violation.reason


@pytest.mark.parametrize(("name", "text", "edge"), [
    ("ztnet/daemon/x.py", "from ztnet.controller import server\n",
     ("ztnet.daemon.x", "ztnet.controller.server")),
    ("ztnet/controller/x.py", "from ztnet.daemon.service import run\n",
     ("ztnet.controller.x", "ztnet.daemon.service")),
    ("ztnet/lab/x.py", "from ztnet import cli\n", ("ztnet.lab.x", "ztnet.cli")),
    ("ztnet/observe/x.py", "from ztnet import testing, __version__\n",
     ("ztnet.observe.x", "ztnet.testing")),
    ("ztnet/fsutil.py", "from ztnet.grants import model\n", ("ztnet.fsutil", "ztnet.grants.model")),
    ("ztnet/lab/x.py", "import tests.kernel.support\n", ("ztnet.lab.x", "tests.kernel.support")),
    ("ztnet/grants/x.py", "from ..policy import document\n",
     ("ztnet.grants.x", "ztnet.policy.document")),
    ("ztnet/gadgets.py", "", ("ztnet.gadgets", "ztnet.gadgets")),
])
def test_each_rule_reports_its_edge(tmp_path: Path, name: str, text: str,
                                    edge: tuple[str, str]) -> None:
    assert reported(tmp_path, {name: text}) == [edge]


def test_the_table_names_every_unit_of_the_design() -> None:
    ranks = {unit: rank for unit, (rank, _) in LAYERS.items()}
    assert ranks["grants"] < ranks["policy"] < ranks["identity"] < ranks["datapath"]
    assert ranks["datapath"] < ranks["observe"] < ranks["daemon"] == ranks["controller"]
    assert ranks["controller"] < ranks["lab"] < ranks["testing"] < ranks["cli"]
    assert layer_of("ztnet.cli.policy") == "cli" and layer_of("ztnet.testing.harness") == "testing"
    assert layer_of("ztnet.v1.node_pb2") == UTILITIES and layer_of("ztnet.gadgets") is None
