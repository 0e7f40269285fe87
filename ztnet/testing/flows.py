"""A raw ReportFlows client (what the daemon's uploader does, minus the spool): send batches
over a host's mutual-TLS channel, collect the acks and the status the stream ended with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from ztnet.observe.records import FlowRecord, to_json
from ztnet.testing.controller import ControllerProcess
from ztnet.testing.nodes import HostIdentity
from ztnet.v1 import node_pb2, node_pb2_grpc


@dataclass(frozen=True, slots=True)
class Reported:
    acks: list[int]
    error: grpc.RpcError | None

    @property
    def code(self) -> grpc.StatusCode | None:
        error: Any = self.error
        return None if error is None else error.code()

    @property
    def details(self) -> str:
        error: Any = self.error
        return "" if error is None else error.details() or ""


def report(controller: ControllerProcess, identity: HostIdentity,
           batches: Sequence[tuple[int, Sequence[FlowRecord] | Sequence[bytes]]],
           timeout: float = 15.0) -> Reported:
    """Send ``(sequence, records)`` batches on one ReportFlows stream."""
    requests = [node_pb2.FlowBatch(sequence=sequence, records=[
        r if isinstance(r, bytes) else to_json(r).encode() for r in records])
        for sequence, records in batches]
    acks: list[int] = []
    with controller.channel(key_pem=identity.key_pem, cert_pem=identity.cert_pem) as channel:
        call = node_pb2_grpc.NodeServiceStub(channel).ReportFlows(iter(requests),
                                                                  timeout=timeout)
        try:
            for ack in call:
                acks.append(ack.sequence)
        except grpc.RpcError as exc:
            return Reported(acks, exc)
    return Reported(acks, None)
