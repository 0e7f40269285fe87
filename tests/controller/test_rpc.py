"""The wire guard: failures become statuses, crashes become INTERNAL and do
not take the server down, every proto method has a handler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from ztnet.controller import rpc, status
from ztnet.controller.response_service import response_handlers
from ztnet.controller.server import ADMIN_SERVICE, NODE_SERVICE, admin_handlers, node_handlers
from ztnet.v1 import admin_pb2, node_pb2


class Flaky:
    def __init__(self) -> None:
        self.calls = 0

    async def get(self, request: admin_pb2.GetPolicyRequest,
                  context: Any) -> admin_pb2.GetPolicyResponse:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug")
        if self.calls == 2:
            raise status.not_found("nothing here")
        return admin_pb2.GetPolicyResponse(version=self.calls)

    async def stream(self, requests: AsyncIterator[node_pb2.FlowBatch],
                     context: Any) -> AsyncIterator[node_pb2.FlowAck]:
        async for batch in requests:
            if batch.sequence == 13:
                raise KeyError("unlucky")
            yield node_pb2.FlowAck(sequence=batch.sequence)


async def _exercise() -> list[tuple[str, str]]:
    flaky = Flaky()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([rpc.service("test.Flaky", {
        "Get": rpc.unary("Get", flaky.get, admin_pb2.GetPolicyRequest),
        "Stream": rpc.stream("Stream", flaky.stream, node_pb2.FlowBatch)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    seen: list[tuple[str, str]] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            get = channel.unary_unary("/test.Flaky/Get",
                                      request_serializer=lambda m: m.SerializeToString(),
                                      response_deserializer=admin_pb2.GetPolicyResponse.FromString)
            for request in (admin_pb2.GetPolicyRequest(),) * 3:
                try:
                    reply = await get(request, timeout=5)
                    seen.append(("OK", str(reply.version)))
                except grpc.aio.AioRpcError as exc:
                    seen.append((exc.code().name, exc.details() or ""))
            raw = channel.unary_unary("/test.Flaky/Get")
            try:
                await raw(b"\xff", timeout=5)
            except grpc.aio.AioRpcError as exc:
                seen.append((exc.code().name, exc.details() or ""))
            stream = channel.stream_stream(
                "/test.Flaky/Stream", request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=node_pb2.FlowAck.FromString)
            call = stream(iter([node_pb2.FlowBatch(sequence=n) for n in (1, 13, 2)]), timeout=5)
            try:
                async for ack in call:
                    seen.append(("ACK", str(ack.sequence)))
            except grpc.aio.AioRpcError as exc:
                seen.append((exc.code().name, exc.details() or ""))
    finally:
        await server.stop(None)
    return seen


def test_the_guard_maps_failures_and_survives_crashes() -> None:
    seen = asyncio.run(_exercise())
    assert seen[0] == ("INTERNAL", "Get: internal error in the controller (see its log)")
    assert seen[1] == ("NOT_FOUND", "nothing here")
    assert seen[2] == ("OK", "3")  # still serving after the crash
    assert seen[3][0] == "INVALID_ARGUMENT"
    assert "not a valid ztnet.v1.GetPolicyRequest" in seen[3][1]
    assert seen[4:] == [("ACK", "1"),
                        ("INTERNAL", "Stream: internal error in the controller (see its log)")]


@pytest.mark.parametrize("descriptor, handlers", [
    (node_pb2.DESCRIPTOR.services_by_name["NodeService"], [node_handlers]),
    (admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
     [admin_handlers, lambda service, _: response_handlers(service, ADMIN_SERVICE)]),
])
def test_every_proto_method_has_a_handler(descriptor: Any, handlers: Any) -> None:
    assert descriptor.full_name in (NODE_SERVICE, ADMIN_SERVICE)
    generics = [make(_Anything(), _Anything()) for make in handlers]
    for method in descriptor.methods:
        details = _CallDetails(f"/{descriptor.full_name}/{method.name}")
        found = [h for h in (g.service(details) for g in generics) if h is not None]
        assert len(found) == 1, method.name
        handler = found[0]
        assert handler.request_streaming == method.client_streaming, method.name
        assert handler.response_streaming == method.server_streaming, method.name


class _Anything:
    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


class _CallDetails:
    """What a generic handler reads of grpc.HandlerCallDetails."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()
