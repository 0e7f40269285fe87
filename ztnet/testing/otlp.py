"""A real OTLP logs receiver for tests and benchmarks: a gRPC server implementing the
``opentelemetry-proto`` package's generated ``LogsService``, on a loopback port.

It keeps every log record it was sent, flattened (``ReceivedLog``: attributes as Python
values, the resource's attributes, the scope name), and can be told to refuse exports
(``refuse(code)``) to exercise a sender's retries. ``stop()`` closes the port, like a
collector that went away; ``start()`` again on the same port brings it back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from ztnet.testing.ports import free_port


@dataclass(frozen=True, slots=True)
class ReceivedLog:
    time_ns: int
    observed_ns: int
    severity_number: int
    severity_text: str
    body: Any
    event_name: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return kv_dict(value.kvlist_value.values)
    return getattr(value, kind)


def kv_dict(values: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in values}


class OtlpReceiver(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.logs: list[ReceivedLog] = []
        self.requests = 0      # Export calls answered OK
        self.refused = 0       # Export calls refused (refuse())
        self._refuse: grpc.StatusCode | None = None
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                             options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.so_reuseport", 0)])
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            self, server)
        server.add_insecure_port(self.endpoint)
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __enter__(self) -> OtlpReceiver:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def refuse(self, code: grpc.StatusCode | None) -> None:
        """Answer every Export with ``code`` from now on (None: accept again)."""
        with self._cond:
            self._refuse = code

    def Export(self, request: logs_service_pb2.ExportLogsServiceRequest,  # noqa: N802
               context: grpc.ServicerContext) -> logs_service_pb2.ExportLogsServiceResponse:
        with self._cond:
            refuse = self._refuse
            if refuse is not None:
                self.refused += 1
                self._cond.notify_all()
        if refuse is not None:
            context.abort(refuse, "the test receiver refuses exports")
        received = []
        for resource_logs in request.resource_logs:
            resource = kv_dict(resource_logs.resource.attributes)
            for scope_logs in resource_logs.scope_logs:
                for log in scope_logs.log_records:
                    received.append(ReceivedLog(
                        log.time_unix_nano, log.observed_time_unix_nano, log.severity_number,
                        log.severity_text, any_value(log.body), log.event_name,
                        kv_dict(log.attributes), resource, scope_logs.scope.name))
        with self._cond:
            self.logs.extend(received)
            self.requests += 1
            self._cond.notify_all()
        return logs_service_pb2.ExportLogsServiceResponse()

    def wait_for(self, predicate: Callable[[list[ReceivedLog]], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.logs), timeout)

    def wait_count(self, count: int, timeout: float) -> bool:
        return self.wait_for(lambda logs: len(logs) >= count, timeout)

    def wait_refused(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.refused >= count, timeout)
