"""What the kernel's building blocks cost on this machine, by the kernel's own statistics.

    sudo .venv/bin/python -m benchmarks.primitives [--calls 20000] [--rounds 5] [--json FILE]

The hook-cost targets of issue 11 are absolute (nanoseconds per run), and what a BPF
program can do within them depends on the machine as much as on the program: the
statistics themselves read the clock twice per run, and on a virtual machine a clock read,
an interrupt-disabling lock or a memory allocation can cost several times what it does on
bare metal. This benchmark measures those building blocks alone, in the same run, so that
`benchmarks.hookcost`'s figures can be read against them.

Each variant is a one-purpose `cgroup/connect4` program (an empty one, one that reads the
boot clock, one that creates socket storage, ...), attached in turn to a cgroup of its own
that only this benchmark's child process joins; the child makes ``--calls`` UDP
``connect()`` calls to 127.0.0.1:9 (no packet is sent). The rounds are interleaved
(every variant once per round) and the median per variant is reported, with the cost it
adds over the empty program. The programs are compiled and pinned by ztnet.datapath's build
child (this process never imports bcc) under /sys/fs/bpf/ztnet-primitives-<pid>. Nothing is
attached anywhere else; the cgroup and the pins are removed afterwards (also those an earlier,
crashed run left).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from benchmarks.datapath import bpf_stats_enabled, machine_facts
from ztnet.datapath import bpfsys
from ztnet.datapath.loader import ProgramSpec, build_in_child
from ztnet.instance import find_cgroup2_mount

CGROUP_PREFIX = "ztnet-primitives-"  # the cgroup and the pins: <prefix><pid>
BPFFS = Path("/sys/fs/bpf")
_COOKIE = "static u64 (*zt_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;\n"
_VALUE = "struct value { u64 words[%d]; };\n"

# name -> (what it measures, program text); every program allows the connect.
VARIANTS: dict[str, tuple[str, str]] = {
    "empty": ("the statistics' own floor: a program that only returns",
              "int f(struct bpf_sock_addr *ctx) { return 1; }"),
    "boot clock": ("bpf_ktime_get_boot_ns (grant deadlines are CLOCK_BOOTTIME)",
                   "int f(struct bpf_sock_addr *ctx) { return bpf_ktime_get_boot_ns() != 1; }"),
    "coarse clock": ("bpf_ktime_get_coarse_ns (CLOCK_MONOTONIC at tick resolution)",
                     "int f(struct bpf_sock_addr *ctx) { return bpf_ktime_get_coarse_ns() != 1; }"),
    "pid+uid": ("bpf_get_current_pid_tgid and bpf_get_current_uid_gid",
                "int f(struct bpf_sock_addr *ctx) { return (bpf_get_current_pid_tgid() ^"
                " bpf_get_current_uid_gid()) != 1; }"),
    "comm": ("bpf_get_current_comm (16 bytes)",
             "int f(struct bpf_sock_addr *ctx) { char comm[16];"
             " bpf_get_current_comm(comm, sizeof(comm)); return comm[0] != 1; }"),
    "cgroup id": ("bpf_get_current_ancestor_cgroup_id",
                  "int f(struct bpf_sock_addr *ctx) {"
                  " return bpf_get_current_ancestor_cgroup_id(1) != 1; }"),
    "socket cookie": ("bpf_get_socket_cookie (the first call on a socket assigns it)",
                      _COOKIE + "int f(struct bpf_sock_addr *ctx) { return zt_cookie(ctx) != 1; }"),
    "array lookup": ("one array map lookup",
                     "BPF_ARRAY(a, u64, 4);\n"
                     "int f(struct bpf_sock_addr *ctx) { int k = 1; u64 *v = a.lookup(&k);"
                     " return v != 0; }"),
    "hash miss": ("one hash map lookup that misses",
                  "BPF_HASH(h, u64, u64, 1024);\n"
                  "int f(struct bpf_sock_addr *ctx) { u64 k = ctx->user_port;"
                  " return h.lookup(&k) == 0; }"),
    "ring record": ("a 96-byte ring-buffer record submitted without a wake-up",
                    "BPF_RINGBUF_OUTPUT(rb, 256);\n"
                    "int f(struct bpf_sock_addr *ctx) { u64 *p = rb.ringbuf_reserve(96);"
                    " if (p) { p[0] = 1; rb.ringbuf_submit(p, BPF_RB_NO_WAKEUP); } return 1; }"),
    "hash insert": ("a preallocated hash insert keyed by socket cookie (one per socket)",
                    _COOKIE + _VALUE % 8 + "BPF_HASH(h, u64, struct value, 65536);\n"
                    "int f(struct bpf_sock_addr *ctx) { u64 k = zt_cookie(ctx);"
                    " struct value v = {}; h.update(&k, &v); h.delete(&k); return 1; }"),
    "socket storage 64 B": ("bpf_sk_storage_get with F_CREATE, 64-byte value (one per socket)",
                            _VALUE % 8 + "BPF_SK_STORAGE(st, struct value);\n"
                            "int f(struct bpf_sock_addr *ctx) {"
                            " return st.sk_storage_get(ctx->sk, 0,"
                            " BPF_SK_STORAGE_GET_F_CREATE) != 0; }"),
    "socket storage 256 B": ("the same, 256-byte value",
                             _VALUE % 32 + "BPF_SK_STORAGE(st, struct value);\n"
                             "int f(struct bpf_sock_addr *ctx) {"
                             " return st.sk_storage_get(ctx->sk, 0,"
                             " BPF_SK_STORAGE_GET_F_CREATE) != 0; }"),
}


def _remove_stale(root: Path) -> None:
    for path in root.glob(CGROUP_PREFIX + "*"):
        owner = path.name.removeprefix(CGROUP_PREFIX)
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            if path.is_relative_to(BPFFS):
                shutil.rmtree(path, ignore_errors=True)  # unpins
            else:
                with suppress(OSError):
                    path.rmdir()


@contextmanager
def _own_directory(root: Path, mkdir: Callable[[Path], None],
                   remove: Callable[[Path], None]) -> Iterator[Path]:
    """``root/<prefix><pid>``, made afresh after removing what crashed runs left."""
    _remove_stale(root)
    path = root / f"{CGROUP_PREFIX}{os.getpid()}"
    mkdir(path)
    try:
        yield path
    finally:
        remove(path)


def _load(text: str, pins: Path) -> int:
    """Compile and pin ``text``'s program ``f`` (ztnet.datapath's build child); its fd."""
    spec = ProgramSpec("f", bpfsys.AttachType.CGROUP_INET4_CONNECT, "CGROUP_SOCK_ADDR")
    build_in_child(text, (), pins / "maps", pins / "programs", (spec,))
    return bpfsys.obj_get(pins / "programs" / "f", "program")


def _connect_loop(cgroup: Path, calls: int) -> None:
    """In a child: join ``cgroup`` and make ``calls`` UDP connects (the hook runs in each)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
            for _ in range(calls):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.connect(("127.0.0.1", 9))
        except BaseException:  # the parent sees the exit status
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("benchmarks.primitives: the connect loop failed")


def measure(calls: int, rounds: int) -> dict[str, list[float]]:
    """ns per run of each variant, per round."""
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    connect = bpfsys.AttachType.CGROUP_INET4_CONNECT
    with _own_directory(BPFFS, lambda p: p.mkdir(), shutil.rmtree) as pins, \
            _own_directory(find_cgroup2_mount(), lambda p: p.mkdir(exist_ok=True),
                           Path.rmdir) as cgroup:
        loaded = {name: _load(text, pins / str(i))
                  for i, (name, (_, text)) in enumerate(VARIANTS.items())}
        cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(rounds):
                for name, fd in loaded.items():
                    before = bpfsys.prog_info(fd)
                    bpfsys.attach(fd, cgroup_fd, connect, cgroup)
                    try:
                        _connect_loop(cgroup, calls)
                    finally:
                        bpfsys.detach(fd, cgroup_fd, connect)
                    after = bpfsys.prog_info(fd)
                    runs = after.run_cnt - before.run_cnt
                    if runs != calls:
                        raise RuntimeError(f"benchmarks.primitives: {name} ran {runs} times "
                                           f"for {calls} connects")
                    samples[name].append((after.run_time_ns - before.run_time_ns) / runs)
        finally:
            os.close(cgroup_fd)
            for fd in loaded.values():
                os.close(fd)
    return samples


def table(samples: dict[str, list[float]]) -> list[dict[str, Any]]:
    floor = statistics.median(samples["empty"])
    rows = []
    for name, values in samples.items():
        median = statistics.median(values)
        rows.append({"primitive": name, "what": VARIANTS[name][0], "ns_per_run": median,
                     "added_ns": median - floor, "min": min(values), "max": max(values),
                     "samples": values})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.primitives",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the samples here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks.primitives: needs root (cgroups, BPF)", file=sys.stderr)
        return 2
    with bpf_stats_enabled():
        rows = table(measure(args.calls, args.rounds))
    print(f"{'primitive':22} {'ns/run':>8} {'added':>8} {'min':>7} {'max':>7}")
    for row in rows:
        print(f"{row['primitive']:22} {row['ns_per_run']:8.0f} {row['added_ns']:8.0f} "
              f"{row['min']:7.0f} {row['max']:7.0f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_facts(), "calls": args.calls,
                                         "rounds": args.rounds, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
