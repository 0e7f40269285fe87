"""Check, once and before anything is loaded, that this host can enforce.

Each failure names what is missing and how to get it, so `ztnet daemon`
can exit with a one-line reason instead of a traceback from bcc."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ztnet.errors import UnsupportedKernel
from ztnet.instance import BPFFS, find_cgroup2_mount

BPF_FS_MAGIC = 0xCAFE4A11


@dataclass(frozen=True, slots=True)
class Capabilities:
    cgroup2: Path
    bpffs: Path
    kernel: str
    headers: Path


def _is_bpffs(path: Path) -> bool:
    try:
        with open("/proc/self/mounts") as mounts:
            return any(
                line.split()[1] == str(path) and line.split()[2] == "bpf" for line in mounts
            )
    except OSError:
        return False


def ensure_bpffs(path: Path = BPFFS) -> None:
    """Pins need a bpf filesystem; mount one where the host has none."""
    if _is_bpffs(path):
        return
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise UnsupportedKernel(
            f"datapath: no bpf filesystem at {path} and mounting one failed: "
            f"{result.stderr.strip()}"
        )


def probe() -> Capabilities:
    if os.geteuid() != 0:
        raise UnsupportedKernel("datapath: must run as root (loading BPF programs needs "
                                "CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)")
    cgroup2 = find_cgroup2_mount()
    kernel = platform.release()
    headers = Path("/lib/modules") / kernel / "build"
    if not (headers / "include").exists() and not (headers / "Makefile").exists():
        raise UnsupportedKernel(
            f"datapath: kernel headers for {kernel} not found at {headers} "
            "(run `make setup`, which installs or links them)"
        )
    # found, not imported: bcc (and LLVM with it) is loaded only by the short-lived
    # compiling process (build.py), never by the daemon
    if importlib.util.find_spec("bcc") is None:
        raise UnsupportedKernel(
            "datapath: bcc is not importable (install the distribution package "
            "python3-bpfcc and use a venv with --system-site-packages)"
        )
    ensure_bpffs()
    return Capabilities(cgroup2=cgroup2, bpffs=BPFFS, kernel=kernel, headers=headers)
