"""Failures that become a gRPC status: the controller's logic raises these,
``ztnet.controller.rpc`` turns them into the status code and message the
caller sees. Messages name the field or the rule that failed."""

from __future__ import annotations

import grpc

from ztnet.errors import RpcFailure


def invalid(field: str, problem: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")


def unauthenticated(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.UNAUTHENTICATED, message)


def denied(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.PERMISSION_DENIED, message)


def not_found(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.NOT_FOUND, message)


def precondition(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, message)


def exhausted(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


class DatabaseUnavailable(RpcFailure):
    """The controller's database cannot be reached: UNAVAILABLE, and nothing is issued
    (a daemon keeps what it holds and retries with its backoff)."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)
