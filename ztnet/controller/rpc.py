"""The wire boundary: gRPC method handlers around the controller's services.

Requests arrive as raw bytes and are parsed here, so a malformed protobuf is
INVALID_ARGUMENT naming the message (gRPC's own deserializer would answer
INTERNAL). Every handler runs inside one guard: an RpcFailure becomes its
status and message; any other exception is logged with its traceback and
becomes INTERNAL, and never takes the server down (as mitmproxy's safecall
keeps one addon from killing the proxy).
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from ztnet import logs
from ztnet.errors import RpcFailure

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

UnaryHandler = Callable[[Req, Any], Awaitable[Resp]]
StreamHandler = Callable[[AsyncIterator[Req], Any], AsyncIterator[Resp]]
ServerStreamHandler = Callable[[Req, Any], AsyncIterator[Resp]]


def service(name: str, methods: Mapping[str, grpc.RpcMethodHandler]) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(name, dict(methods))


def unary(method: str, handler: UnaryHandler[Req, Resp],
          request_type: type[Req]) -> grpc.RpcMethodHandler:
    async def call(raw: bytes, context: Any) -> Resp | None:
        try:
            return await handler(parse(request_type, raw), context)
        except RpcFailure as failure:
            await _refuse(context, method, failure)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:
            await _internal(context, method)
        return None  # not reached: abort raises

    return grpc.unary_unary_rpc_method_handler(call, response_serializer=_serialize)


def stream(method: str, handler: StreamHandler[Req, Resp],
           request_type: type[Req]) -> grpc.RpcMethodHandler:
    async def call(raw_requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[Resp]:
        try:
            async for response in handler(_parse_each(request_type, raw_requests), context):
                yield response
        except RpcFailure as failure:
            await _refuse(context, method, failure)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:
            await _internal(context, method)

    return grpc.stream_stream_rpc_method_handler(call, response_serializer=_serialize)


def server_stream(method: str, handler: ServerStreamHandler[Req, Resp],
                  request_type: type[Req]) -> grpc.RpcMethodHandler:
    """One request, a stream of responses (FollowAlerts)."""
    async def call(raw: bytes, context: Any) -> AsyncIterator[Resp]:
        try:
            async for response in handler(parse(request_type, raw), context):
                yield response
        except RpcFailure as failure:
            await _refuse(context, method, failure)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:
            await _internal(context, method)

    return grpc.unary_stream_rpc_method_handler(call, response_serializer=_serialize)


def parse(request_type: type[Req], raw: bytes) -> Req:
    try:
        request: Req = request_type.FromString(raw)
        return request
    except (DecodeError, ValueError) as exc:
        name = request_type.DESCRIPTOR.full_name
        raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                         f"request: not a valid {name} ({exc})") from None


async def _parse_each(request_type: type[Req],
                      raw_requests: AsyncIterator[bytes]) -> AsyncIterator[Req]:
    async for raw in raw_requests:
        yield parse(request_type, raw)


def _serialize(message: Message) -> bytes:
    data: bytes = message.SerializeToString()
    return data


async def _refuse(context: Any, method: str, failure: RpcFailure) -> None:
    logs.event("rpc refused", logging.INFO, method=method, code=failure.code.name,
               peer=context.peer(), reason=str(failure))
    await context.abort(failure.code, str(failure))


async def _internal(context: Any, method: str) -> None:
    logs.event("rpc failed", logging.ERROR, method=method, peer=context.peer(),
               traceback=traceback.format_exc(limit=8))
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"{method}: internal error in the controller (see its log)")
