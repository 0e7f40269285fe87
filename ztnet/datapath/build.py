"""The short-lived loader process: compile the BPF programs with bcc, load
them into the kernel, pin them, exit. The only module that imports bcc.

    python -m ztnet.datapath.build < request.json

``loader.load_programs()`` runs this in a child process, so that bcc and LLVM
(about 170 MiB mapped, and their heap) never live in the long-running daemon:
the daemon works only through the pinned objects, with raw bpf() calls
(``bpfsys``). The request names the unit to compile, its cflags, the pin
directory of the maps and where to pin the programs; the child pins each
program as ``<programs_dir>/<function>`` in a fresh directory and renames it
into place last, so a complete directory is the only thing a later start
ever finds (a crash halfway leaves a ``tmp-*`` directory, which the next
load removes). Maps the C code declares pinned are pinned by bcc itself; any
other map the object defines is pinned under its own name too, so the daemon
can open every map the programs use by name, whatever ``bpf/`` declares.

It prints one JSON line: ``{"programs": {function: prog_id}, "maps": [...]}``
or ``{"error": message}`` (exit status 1; bcc wrote the verifier log to stderr).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from ztnet.datapath.bpfsys import map_id, obj_get, obj_pin, prog_info


def _pin_unpinned_maps(bpf: Any, pin_dir: Path) -> list[str]:
    """Pin every map of the object that is not pinned at ``pin_dir/<name>`` already."""
    from bcc.libbcc import lib

    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    names = []
    for index in range(lib.bpf_num_tables(bpf.module)):
        name = lib.bpf_table_name(bpf.module, index)
        fd = lib.bpf_table_fd(bpf.module, name)
        if fd < 0:
            continue
        text = name.decode()
        names.append(text)
        path = pin_dir / text
        if path.exists():
            pinned = obj_get(path, "map")
            try:
                if map_id(pinned) == map_id(fd):
                    continue
            finally:
                os.close(pinned)
            path.unlink()  # an unpinned map of an older load: the new programs use this one
        obj_pin(fd, path)
    return names


def build(request: dict[str, Any]) -> dict[str, Any]:
    import bcc  # the one import of bcc in ztnet

    pin_dir = Path(request["pin_dir"])
    target = Path(request["programs_dir"])
    pin_dir.mkdir(parents=True, exist_ok=True)
    bpf = bcc.BPF(text=request["text"].encode(), cflags=list(request["cflags"]))
    staging = target.parent / f"tmp-{target.name}-{os.getpid()}"  # bpffs names have no dots
    staging.mkdir(parents=True)
    try:
        ids = {}
        for function, attach_type, prog_type in request["programs"]:
            fn = bpf.load_func(function.encode(), getattr(bcc.BPF, prog_type),
                               attach_type=int(attach_type))
            obj_pin(fn.fd, staging / function)
            ids[function] = prog_info(fn.fd).prog_id
        maps = _pin_unpinned_maps(bpf, pin_dir)
        if target.exists():  # a concurrent load of the same stamp won; same programs
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"programs": ids, "maps": maps}


def main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        result = build(request)
    except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception; report it whole
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
