"""Generate the Python gRPC code from proto/ (the only definition of the wire
protocol) into ztnet/v1/: the proto package ztnet.v1 maps onto that
subpackage, so the generated modules' own imports (``from ztnet.v1 import
node_pb2``) resolve. Run by the set-up step (into the checkout) and by the
build hook in setup.py (into the wheel, so a build needs no set-up step);
tests/unit/test_proto.py fails when the checkout's generated code is stale.
Needs only the standard library and grpcio-tools: setup.py loads this file
by path, before ztnet is installed."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
OUT_DIR = Path(__file__).resolve().parent / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(root: Path) -> dict[str, bytes]:
    """Run protoc into ``root``; returns the generated files of ztnet/v1 by name."""
    from grpc_tools import protoc

    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={root}", f"--pyi_out={root}",
            f"--grpc_python_out={root}", *map(str, proto_files())]
    if protoc.main(args) != 0:
        raise SystemExit("protogen: protoc failed")
    return {p.name: p.read_bytes() for p in (root / "ztnet" / "v1").iterdir()}


def installed(out_dir: Path = OUT_DIR) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out_dir.iterdir()
            if p.name.endswith(GENERATED_SUFFIXES)} if out_dir.exists() else {}


def write(out_dir: Path = OUT_DIR) -> None:
    """Generate into ``out_dir`` (the package directory ztnet/v1), removing
    generated files no proto produces any more; unchanged files are left
    alone so their timestamps do not move."""
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "__init__.py").write_text('"""Generated from proto/ztnet/v1 by ztnet.protogen."""\n')
    current = installed(out_dir)
    for name in current.keys() - files.keys():
        (out_dir / name).unlink()
    for name, data in files.items():
        if current.get(name) != data:
            (out_dir / name).write_bytes(data)


def main() -> int:
    write()
    print(f"protogen: generated {len(proto_files())} proto files into {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
