"""ztnet.fsutil: crash-safe writes and bounded reads, the one owner of both."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ztnet.fsutil import FileTooLarge, create_new, read_bounded, replace_atomic


def test_read_bounded_returns_a_file_up_to_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert read_bounded(path, 10) == b"x" * 10
    with pytest.raises(FileTooLarge, match=r"f is larger than 9 bytes"):
        read_bounded(path, 9)


def test_read_bounded_never_reads_an_endless_file_to_its_end() -> None:
    with pytest.raises(FileTooLarge) as excinfo:
        read_bounded("/dev/zero", 4096)
    assert excinfo.value.limit == 4096 and excinfo.value.path == "/dev/zero"


def test_read_bounded_leaves_os_errors_to_the_caller(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_bounded(tmp_path / "missing", 10)


def test_replace_atomic_writes_with_its_mode_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "key"
    old = os.umask(0)
    try:
        replace_atomic(path, b"secret", 0o600)
    finally:
        os.umask(old)
    assert path.read_bytes() == b"secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key"]  # no temporary file left


def test_replace_atomic_never_writes_through_a_planted_temporary_file(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    path = tmp_path / "state.json"
    (tmp_path / ".state.json.tmp").symlink_to(victim)
    replace_atomic(path, b"new")
    assert path.read_bytes() == b"new" and not path.is_symlink()
    assert victim.read_bytes() == b"untouched"
    os.link(victim, tmp_path / ".state.json.tmp")  # a hard link, too
    replace_atomic(path, b"newer")
    assert path.read_bytes() == b"newer" and victim.read_bytes() == b"untouched"


def test_create_new_refuses_an_existing_file_and_a_symlink(tmp_path: Path) -> None:
    path = tmp_path / "ca.key"
    create_new(path, b"one", 0o600)
    with pytest.raises(FileExistsError):
        create_new(path, b"two", 0o600)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        create_new(tmp_path / "link", b"two", 0o600)
    assert path.read_bytes() == b"one" and not (tmp_path / "elsewhere").exists()
