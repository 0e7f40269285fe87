"""Every BPF source the loader compiles is shipped with an installed ztnet."""

from __future__ import annotations

import tomllib
from pathlib import Path

from ztnet.datapath.loader import SOURCES

ROOT = Path(__file__).resolve().parents[2]


def test_all_bpf_sources_are_installed_as_data_files() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = set(project["tool"]["setuptools"]["data-files"]["share/ztnet/bpf"])
    needed = {f"bpf/{name}" for name in SOURCES} | {"bpf/ztnet.h"}
    assert needed <= shipped, f"missing from pyproject data-files: {needed - shipped}"
    assert all((ROOT / path).exists() for path in shipped)
