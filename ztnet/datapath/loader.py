"""Compile, load, attach and adopt the BPF programs.

Lifecycle, as a Tetragon sensor: ``load_programs()`` has a short-lived child
process (build.py, the only bcc user) compile the programs with bcc, which
opens the maps already pinned under the instance's bpffs directory or creates
and pins them, and pin the programs under ``<pin_dir>/progs/<stamp>/``, the
stamp being a hash of the exact source, flags and hooks. A later start whose
stamp is pinned already reuses those programs and compiles nothing. The
daemon opens the pins with raw bpf() calls and never maps bcc or LLVM. The
programs are attached to the
instance's cgroup with BPF_F_ALLOW_MULTI *before* any older ztnet program
there is detached. Every attached program must allow a packet, and all of
them read the same pinned maps, so during the overlap verdicts are exactly
those of the maps: adoption has no gap and no double standard. Programs
attached with BPF_PROG_ATTACH stay attached after the loader exits, which is
what makes enforcement fail closed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ztnet.datapath import abi
from ztnet.datapath.bpfsys import (
    AttachType,
    attach,
    attached_prog_ids,
    detach,
    obj_get,
    prog_fd_by_id,
    prog_info,
)
from ztnet.errors import DatapathError, LoadError
from ztnet.instance import Instance

SOURCES = ("maps.h", "verdict.h", "socket.h", "events.h", "names.h", "sock_addr.c", "egress.c",
           "ingress.c", "sock_release.c", "dns.c")


@dataclass(frozen=True, slots=True)
class ProgramSpec:
    function: str
    attach_type: AttachType
    prog_type: str  # name of the bcc.BPF program-type constant


PROGRAMS = (
    ProgramSpec("zt_connect4", AttachType.CGROUP_INET4_CONNECT, "CGROUP_SOCK_ADDR"),
    ProgramSpec("zt_connect6", AttachType.CGROUP_INET6_CONNECT, "CGROUP_SOCK_ADDR"),
    ProgramSpec("zt_sendmsg4", AttachType.CGROUP_UDP4_SENDMSG, "CGROUP_SOCK_ADDR"),
    ProgramSpec("zt_sendmsg6", AttachType.CGROUP_UDP6_SENDMSG, "CGROUP_SOCK_ADDR"),
    ProgramSpec("zt_egress", AttachType.CGROUP_INET_EGRESS, "CGROUP_SKB"),
    ProgramSpec("zt_ingress", AttachType.CGROUP_INET_INGRESS, "CGROUP_SKB"),
    ProgramSpec("zt_sock_release", AttachType.CGROUP_INET_SOCK_RELEASE, "CGROUP_SOCK"),
    # the reverse half of the DNS redirect (bpf/dns.c)
    ProgramSpec("zt_recvmsg4", AttachType.CGROUP_UDP4_RECVMSG, "CGROUP_SOCK_ADDR"),
    ProgramSpec("zt_recvmsg6", AttachType.CGROUP_UDP6_RECVMSG, "CGROUP_SOCK_ADDR"),
    ProgramSpec("zt_getpeername4", AttachType.CGROUP_INET4_GETPEERNAME, "CGROUP_SOCK_ADDR"),
    ProgramSpec("zt_getpeername6", AttachType.CGROUP_INET6_GETPEERNAME, "CGROUP_SOCK_ADDR"),
)

# The maps without which nothing is enforced; the datapath opens every other pinned map
# by name when it first needs it (whatever bpf/ declares).
CORE_MAPS = ("zt_agents_v1", "zt_grants_v1", "zt_levels_v1", "zt_config_v1")


def bpf_source_dir() -> Path:
    """bpf/ beside the package in a checkout, share/ztnet/bpf when installed."""
    checkout = Path(__file__).resolve().parents[2] / "bpf"
    if (checkout / "ztnet.h").exists():
        return checkout
    installed = Path(sys.prefix) / "share" / "ztnet" / "bpf"
    if (installed / "ztnet.h").exists():
        return installed
    raise LoadError(f"datapath: BPF sources not found in {checkout} or {installed}")


def cflags(instance: Instance) -> list[str]:
    return [
        f"-I{bpf_source_dir()}",
        f'-DZT_PIN_DIR="{instance.pin_dir}"',
        f"-DZT_MAX_AGENTS={abi.MAX_AGENTS}",
        f"-DZT_MAX_ENTRIES={abi.MAX_ENTRIES}",
    ]


def translation_unit() -> str:
    """The sources in order, as one text: bcc rewrites map accesses and
    exports programs only in its main file, never in #included ones, so the
    headers that use maps are part of the unit (their include guards make the
    later #include lines no-ops)."""
    directory = bpf_source_dir()
    return "\n".join((directory / name).read_text() for name in SOURCES)


PROGRAMS_DIR = "progs"


def program_stamp(instance: Instance) -> str:
    """What the pinned programs were built from: the exact unit, its flags and the
    hooks. Pinned programs with this stamp are ABI-compatible with this build."""
    digest = hashlib.sha256()
    for part in (translation_unit(), *cflags(instance),
                 *(f"{s.function}:{int(s.attach_type)}:{s.prog_type}" for s in PROGRAMS)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def programs_dir(instance: Instance, stamp: str) -> Path:
    return instance.pin_dir / PROGRAMS_DIR / stamp


@dataclass
class LoadedPrograms:
    """The programs this process attaches, opened from their pins; holds their fds.
    ``compiled``: whether this load ran the compiler (else the pins were reused)."""

    instance: Instance
    stamp: str
    prog_fds: dict[str, int]
    prog_ids: dict[str, int]
    compiled: bool

    def close(self) -> None:
        """Release our references. Attached (and pinned) programs stay."""
        for fd in self.prog_fds.values():
            os.close(fd)
        self.prog_fds = {}


@contextmanager
def _cgroup_fd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _complete(directory: Path) -> bool:
    return all((directory / spec.function).exists() for spec in PROGRAMS)


def compile_in_child(instance: Instance, stamp: str) -> None:
    """Compile, load and pin the programs in a short-lived process (build.py)."""
    build_in_child(translation_unit(), cflags(instance), instance.pin_dir,
                   programs_dir(instance, stamp), PROGRAMS)


def build_in_child(text: str, flags: Sequence[str], pin_dir: Path, directory: Path,
                   programs: Sequence[ProgramSpec]) -> None:
    """Compile ``text`` with bcc in a short-lived process (build.py), pin each of
    ``programs`` as ``directory/<function>`` and its maps under ``pin_dir``."""
    request = {
        "text": text, "cflags": list(flags), "pin_dir": str(pin_dir),
        "programs_dir": str(directory),
        "programs": [[s.function, int(s.attach_type), s.prog_type] for s in programs],
    }
    # -I and cwd "/": the child (root, like its parent) imports ztnet from where this
    # interpreter has it, never from the working directory or PYTHON* variables
    result = subprocess.run([sys.executable, "-I", "-m", "ztnet.datapath.build"],
                            input=json.dumps(request), capture_output=True, text=True,
                            check=False, cwd="/")
    lines = result.stdout.strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else {}
    except ValueError:
        reply = {}
    if result.returncode != 0 or "error" in reply or not isinstance(reply, dict):
        error = reply.get("error") if isinstance(reply, dict) else None
        log = result.stderr.strip()
        raise LoadError(f"datapath: compiling and loading the BPF programs failed: "
                        f"{error or f'loader exited with {result.returncode}'}"
                        + (f"\n{log[-4000:]}" if log else ""), log)


def load_programs(instance: Instance, *, fresh: bool = False) -> LoadedPrograms:
    """Open the programs pinned for this build, compiling them first (in a child
    process) if there are none or ``fresh`` asks for new ones. The child opens the
    maps already pinned under the instance's bpffs directory or creates and pins
    them. Attaches nothing."""
    instance.pin_dir.mkdir(parents=True, exist_ok=True)
    stamp = program_stamp(instance)
    directory = programs_dir(instance, stamp)
    compiled = False
    if fresh and directory.exists():
        shutil.rmtree(directory)  # unpins only: attached programs stay attached
    if not _complete(directory):
        if directory.exists():
            shutil.rmtree(directory)
        compile_in_child(instance, stamp)
        compiled = True
    fds: dict[str, int] = {}
    try:
        for spec in PROGRAMS:
            fds[spec.function] = obj_get(directory / spec.function, "program")
        ids = {name: prog_info(fd).prog_id for name, fd in fds.items()}
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return LoadedPrograms(instance, stamp, fds, ids, compiled)


def remove_stale_programs(programs: LoadedPrograms) -> None:
    """Unpin programs of other builds (and a crashed load's leftovers): they are
    detached by now, and their pins would keep them loaded."""
    parent = programs.instance.pin_dir / PROGRAMS_DIR
    for entry in parent.iterdir() if parent.is_dir() else ():
        if entry.name != programs.stamp:
            shutil.rmtree(entry, ignore_errors=True)


def attach_replacing(programs: LoadedPrograms) -> int:
    """Attach our programs, then detach every other program attached to the
    instance cgroup for the same hooks (older ztnet programs, leftovers of a
    crash between these two steps). Returns how many were replaced."""
    root = programs.instance.cgroup_root
    replaced = 0
    with _cgroup_fd(root) as cgroup_fd:
        for spec in PROGRAMS:
            if programs.prog_ids[spec.function] in attached_prog_ids(cgroup_fd,
                                                                     spec.attach_type):
                continue  # a restart that reuses the pinned programs: attached already
            attach(programs.prog_fds[spec.function], cgroup_fd, spec.attach_type, root)
        for spec in PROGRAMS:
            replaced += _detach_others(cgroup_fd, spec, keep=programs.prog_ids[spec.function])
    return replaced


def _detach_others(cgroup_fd: int, spec: ProgramSpec, keep: int | None) -> int:
    """Detach every program attached for ``spec``'s hook except ``keep``."""
    removed = 0
    for prog_id in attached_prog_ids(cgroup_fd, spec.attach_type):
        if prog_id == keep:
            continue
        fd = prog_fd_by_id(prog_id)
        try:
            detach(fd, cgroup_fd, spec.attach_type)
        finally:
            os.close(fd)
        removed += 1
    return removed


def attached_counts(instance: Instance) -> dict[str, int]:
    """Programs attached at the instance cgroup, per hook."""
    if not instance.cgroup_root.is_dir():
        return {spec.function: 0 for spec in PROGRAMS}
    with _cgroup_fd(instance.cgroup_root) as cgroup_fd:
        return {spec.function: len(attached_prog_ids(cgroup_fd, spec.attach_type))
                for spec in PROGRAMS}


def is_enforcing(instance: Instance) -> bool:
    """Every hook has a program attached and the maps are pinned."""
    pins_ok = all((instance.pin_dir / name).exists() for name in CORE_MAPS)
    return pins_ok and all(count > 0 for count in attached_counts(instance).values())


def detach_all(instance: Instance) -> int:
    if not instance.cgroup_root.is_dir():
        return 0
    with _cgroup_fd(instance.cgroup_root) as cgroup_fd:
        return sum(_detach_others(cgroup_fd, spec, keep=None) for spec in PROGRAMS)


def remove_pins(instance: Instance) -> None:
    if instance.bpffs_dir.exists():
        shutil.rmtree(instance.bpffs_dir)


def dump_program_source(instance: Instance) -> str:
    """What `ztnet debug dump-bpf` prints: flags and the exact unit compiled."""
    flags = "\n".join(f"//   {flag}" for flag in cflags(instance))
    return f"// cflags:\n{flags}\n{translation_unit()}"


__all__ = ["DatapathError", "LoadedPrograms", "PROGRAMS", "attach_replacing", "attached_counts",
           "detach_all", "dump_program_source", "is_enforcing", "load_programs", "remove_pins",
           "remove_stale_programs"]
