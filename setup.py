"""Build hook: the protocol code (ztnet/v1) is generated from proto/ at build
time, so a wheel or an install made from a clean checkout carries it without
scripts/setup.sh. Everything else about the project is in pyproject.toml."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _protogen() -> ModuleType:
    # by path: ztnet itself is not importable while it is being built
    spec = importlib.util.spec_from_file_location("_ztnet_protogen", ROOT / "ztnet" / "protogen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtocol(build_py):
    """build_py that also generates ztnet/v1: into the build tree for a wheel,
    into the source tree for an editable install (which runs from there)."""

    def run(self) -> None:
        super().run()
        protogen = _protogen()
        if self.editable_mode:
            protogen.write()
        else:
            protogen.write(Path(self.build_lib) / "ztnet" / "v1")


setup(cmdclass={"build_py": BuildPyWithProtocol})
