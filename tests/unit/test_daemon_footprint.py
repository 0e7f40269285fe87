"""A daemon enforcing a bundle file loads neither gRPC nor dnspython: each is imported
where its mode starts (controller, --dns), which keeps ~18 MiB out of every such daemon."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("grpc", "dns", "google.protobuf")


def loaded_after(code: str) -> list[str]:
    """Which of HEAVY a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport sys\nprint(' '.join(n for n in {HEAVY!r} if n in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.split()


@pytest.mark.parametrize("code", [
    "import ztnet.daemon.service",
    "import ztnet.cli.daemon",
    # the argument parsing `ztnet daemon` goes through before it starts anything
    "import contextlib, io\nfrom ztnet.cli import main\n"
    "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
    "    main(['daemon', '--help'])",
])
def test_the_file_mode_daemon_path_imports_no_grpc_or_dnspython(code: str) -> None:
    assert loaded_after(code) == []


@pytest.mark.parametrize(("module", "heavy"), [
    ("ztnet.daemon.resolver", "dns"),
    ("ztnet.daemon.client", "grpc"),
])
def test_the_probe_sees_the_modules_that_do_load_them(module: str, heavy: str) -> None:
    assert heavy in loaded_after(f"import {module}")
