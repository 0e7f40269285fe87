"""`ztnet debug dump-bpf`: debugging aids."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from ztnet.cli.args import SubParsers, add_command, add_group, instance_option
from ztnet.instance import Instance


def register(sub: SubParsers) -> None:
    p = add_command(sub, "debug", "Debugging aids.", "ztnet debug dump-bpf")
    group = add_group(p, "debug_command", metavar="WHAT")
    d = add_command(group, "dump-bpf", "Print the exact BPF translation unit and cflags.",
                    "ztnet debug dump-bpf --instance host-a", handle_dump_bpf)
    instance_option(d)


def handle_dump_bpf(args: argparse.Namespace) -> int:
    return dump_bpf(Instance.resolve(args.instance))


def dump_bpf(instance: Instance, *, out: TextIO | None = None) -> int:
    from ztnet.datapath.loader import dump_program_source

    print(dump_program_source(instance), file=out if out is not None else sys.stdout)
    return 0
