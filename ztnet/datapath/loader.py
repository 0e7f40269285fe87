"""Compile, load, attach and adopt the BPF programs (the only bcc user).

Lifecycle, as a Tetragon sensor: ``load_programs()`` compiles the programs
with bcc, which opens the maps already pinned under the instance's bpffs
directory or creates and pins them; the new programs are attached to the
instance's cgroup with BPF_F_ALLOW_MULTI *before* any older ztnet program
there is detached. Every attached program must allow a packet, and all of
them read the same pinned maps, so during the overlap verdicts are exactly
those of the maps: adoption has no gap and no double standard. Programs
attached with BPF_PROG_ATTACH stay attached after the loader exits, which is
what makes enforcement fail closed.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ztnet.datapath import abi
from ztnet.datapath.bpfsys import (
    AttachType,
    attach,
    attached_prog_ids,
    detach,
    prog_fd_by_id,
    prog_info,
)
from ztnet.errors import DatapathError, LoadError
from ztnet.instance import Instance

SOURCES = ("maps.h", "verdict.h", "events.h", "sock_addr.c", "egress.c", "ingress.c",
           "sock_release.c")


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
)

MAP_NAMES = ("zt_agents_v1", "zt_grants_v1", "zt_levels_v1", "zt_config_v1",
             "zt_counters_v1", "zt_agent_stats_v1", "zt_agent_drops_v1", "zt_flows_v1",
             "zt_deny_budget_v1", "zt_allow_budget_v1", "zt_agent_events_v1",
             "zt_events_v1", "zt_denials_v1")


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


@dataclass
class LoadedPrograms:
    """The programs this process loaded and attached; holds their fds."""

    instance: Instance
    bpf: object  # bcc.BPF; typed loosely so that importing this module needs no bcc
    prog_fds: dict[str, int]
    prog_ids: dict[str, int]

    def close(self) -> None:
        """Release our references. Attached programs stay attached."""
        cleanup = getattr(self.bpf, "cleanup", None)
        if cleanup is not None:
            cleanup()


@contextmanager
def _cgroup_fd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def load_programs(instance: Instance) -> LoadedPrograms:
    """Compile and load the programs, opening or creating the pinned maps.
    Attaches nothing."""
    import bcc  # the one import of bcc in ztnet

    instance.pin_dir.mkdir(parents=True, exist_ok=True)
    try:
        bpf = bcc.BPF(text=translation_unit().encode(), cflags=cflags(instance))
    except Exception as exc:  # bcc raises bare Exception on compile errors
        raise LoadError(f"datapath: compiling BPF programs failed: {exc}", str(exc)) from exc
    fds: dict[str, int] = {}
    ids: dict[str, int] = {}
    for spec in PROGRAMS:
        prog_type = getattr(bcc.BPF, spec.prog_type)
        try:
            fn = bpf.load_func(spec.function.encode(), prog_type, attach_type=int(spec.attach_type))
        except Exception as exc:
            raise LoadError(f"datapath: loading {spec.function} failed: {exc}", str(exc)) from exc
        fds[spec.function] = fn.fd
        ids[spec.function] = prog_info(fn.fd).prog_id
    return LoadedPrograms(instance, bpf, fds, ids)


def attach_replacing(programs: LoadedPrograms) -> int:
    """Attach our programs, then detach every other program attached to the
    instance cgroup for the same hooks (older ztnet programs, leftovers of a
    crash between these two steps). Returns how many were replaced."""
    root = programs.instance.cgroup_root
    replaced = 0
    with _cgroup_fd(root) as cgroup_fd:
        for spec in PROGRAMS:
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
    pins_ok = all((instance.pin_dir / name).exists() for name in MAP_NAMES)
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
           "detach_all", "dump_program_source", "is_enforcing", "load_programs", "remove_pins"]
