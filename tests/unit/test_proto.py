"""The generated gRPC code must match proto/: regenerate and compare."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ztnet import protogen


def test_generated_code_is_not_stale() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = protogen.generate(Path(tmp))
    assert fresh, "protoc generated nothing"
    assert protogen.installed() == fresh, (
        "ztnet/v1 is stale: run `python -m ztnet.protogen` (make setup does)")


def test_services_are_importable() -> None:
    from ztnet.v1 import admin_pb2_grpc, node_pb2_grpc

    assert hasattr(node_pb2_grpc, "NodeServiceServicer")
    assert hasattr(admin_pb2_grpc, "AdminServiceStub")
