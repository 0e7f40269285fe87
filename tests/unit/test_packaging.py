"""What an installed ztnet carries: every BPF source the loader compiles, the
protocol code generated at build time (no set-up step needed), and a daemon
that runs without the lab's dependencies."""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ztnet.datapath.loader import SOURCES

ROOT = Path(__file__).resolve().parents[2]


def test_all_bpf_sources_are_installed_as_data_files() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = set(project["tool"]["setuptools"]["data-files"]["share/ztnet/bpf"])
    needed = {f"bpf/{name}" for name in SOURCES} | {"bpf/ztnet.h"}
    assert needed <= shipped, f"missing from pyproject data-files: {needed - shipped}"
    assert all((ROOT / path).exists() for path in shipped)


# What a build must not see: the set-up step's products and the caches around a checkout.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                     "node_modules", ".*_cache", "*.whl")


def _site_dirs_path_file(venv: Path) -> None:
    """Let the fresh venv find the installed dependencies (protobuf, grpcio) of
    this one as plain path entries: their .pth files (our editable install's
    finder among them) are not processed, so ztnet comes only from the wheel."""
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_ztnet_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")


def test_wheel_from_a_clean_tree_carries_its_protocol_code(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    shutil.rmtree(source / "ztnet" / "v1", ignore_errors=True)  # as scripts/setup.sh never ran
    dist = tmp_path / "dist"
    # the build dependencies (setuptools, grpcio-tools) are this venv's: no index needed
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(dist), str(source)], check=True, timeout=120)
    assert not (source / "ztnet" / "v1").exists(), "the build wrote into the source tree"
    (wheel,) = dist.glob("ztnet-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=120)
    _site_dirs_path_file(venv)
    probe = ("import ztnet, ztnet.v1.node_pb2 as node, ztnet.v1.admin_pb2_grpc as admin;"
             "from ztnet.datapath.loader import bpf_source_dir;"
             "print(ztnet.__file__); print(bpf_source_dir());"
             "assert node.DESCRIPTOR.package == 'ztnet.v1' and admin.AdminServiceStub")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", probe], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"the installed wheel does not import:\n{run.stderr}"
    out = run.stdout.split("\n")
    assert Path(out[0]).is_relative_to(venv), f"ztnet imported from {out[0]}, not the wheel"
    assert Path(out[1]) == venv / "share" / "ztnet" / "bpf", "BPF sources not shipped"


_LAB_ONLY = ("scapy", "pyroute2")
_DAEMON_IMPORTS = {
    "ztnet.daemon.service": "import ztnet.daemon.service",
    "ztnet daemon --help": ("import sys; sys.argv = ['ztnet', 'daemon', '--help']\n"
                            "from ztnet.cli import main\n"
                            "try:\n    main()\nexcept SystemExit:\n    pass"),
}


@pytest.mark.parametrize("what", sorted(_DAEMON_IMPORTS))
def test_daemon_needs_no_lab_dependencies(what: str) -> None:
    """scapy and pyroute2 are the `lab` extra: the daemon must run without them."""
    report = "\nimport sys\nprint(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", _DAEMON_IMPORTS[what] + report], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    loaded = set(eval(out.strip().splitlines()[-1]))  # noqa: S307 - our own subprocess's list
    assert "ztnet" in loaded
    assert not loaded & set(_LAB_ONLY), f"{what} imports {sorted(loaded & set(_LAB_ONLY))}"


def test_lab_dependencies_are_an_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ \[]", dep, maxsplit=1)[0].lower()
             for dep in project["dependencies"]}
    assert not names & set(_LAB_ONLY)
    lab = {re.split(r"[<>=!~ \[]", dep, maxsplit=1)[0].lower()
           for dep in project["optional-dependencies"]["lab"]}
    assert set(_LAB_ONLY) <= lab
