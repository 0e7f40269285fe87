"""The node API (proto/ztnet/v1/node.proto): what daemons call.

Enroll is the only RPC without a certificate (it is served on the
enrollment listener too, which asks for none); every other RPC needs a host
certificate and acts only about the host it names. Handlers take parsed
requests and raise RpcFailure; ``ztnet.controller.rpc`` does the wire.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization

from ztnet import logs
from ztnet.controller import flows, status
from ztnet.controller.authz import Authorizer, Peer
from ztnet.controller.enrollment import Enrollment, check_host
from ztnet.controller.hub import Answer, Hub, Session
from ztnet.controller.limiter import HostLimiter
from ztnet.controller.metrics import ControllerMetrics
from ztnet.controller.publisher import Publisher
from ztnet.controller.store import Store
from ztnet.errors import RpcFailure
from ztnet.observe.records import FlowRecord
from ztnet.text import escape
from ztnet.v1 import node_pb2

# How often an idle stream re-checks its certificate (revoked, expired).
RECHECK_SECONDS = 30.0
MAX_REASON = 4096


class FlowExport(Protocol):
    """Where stored flow records also go (``ztnet.observe.otlp.OtlpExporter``): must
    return at once, whatever the far end does."""

    def submit_many(self, records: Sequence[FlowRecord]) -> int: ...


class NodeService:
    def __init__(self, store: Store, enrollment: Enrollment, authz: Authorizer, hub: Hub,
                 publisher: Publisher, signing_pub_pem: bytes,
                 clock: Callable[[], float], metrics: ControllerMetrics | None = None,
                 limiter: HostLimiter | None = None,
                 flow_export: FlowExport | None = None,
                 on_records: Callable[[list[FlowRecord]], Awaitable[object]] | None = None,
                 ) -> None:
        self.store = store
        self.enrollment = enrollment
        self.authz = authz
        self.hub = hub
        self.publisher = publisher
        self.signing_pub_pem = signing_pub_pem
        self.clock = clock
        self.metrics = metrics or ControllerMetrics()
        self.limiter = limiter or HostLimiter()
        self.flow_export = flow_export
        self.on_records = on_records  # the detectors (ztnet.controller.detect)

    async def enroll(self, request: node_pb2.EnrollRequest,
                     context: Any) -> node_pb2.EnrollResponse:
        tpm = request.tpm if request.HasField("tpm") else None
        issued = self.enrollment.enroll(request.token, request.host, request.csr_pem, tpm)
        await self.publisher.host_enrolled(issued.identity.name)
        logs.event("host enrolled", host=issued.identity.name,
                   serial=format(issued.cert.serial_number, "x"),
                   attestation=issued.attestation)
        return node_pb2.EnrollResponse(
            certificate_pem=issued.cert.public_bytes(serialization.Encoding.PEM),
            ca_pem=self.enrollment.authority.cert_pem,
            signing_public_key_pem=self.signing_pub_pem,
            trust_domain=issued.identity.trust_domain,
            spiffe_id=issued.identity.uri,
            attestation=issued.attestation)

    async def begin_attestation(self, request: node_pb2.BeginAttestationRequest,
                                context: Any) -> node_pb2.BeginAttestationResponse:
        # make_credential is an RSA encryption: ~0.1 ms, fine on the event loop
        return self.enrollment.begin_attestation(request)

    async def begin_renewal(self, request: node_pb2.BeginRenewalRequest,
                            context: Any) -> node_pb2.BeginRenewalResponse:
        peer = self.authz.require(context, "host")
        nonce = self.enrollment.renewal_nonce(peer.identity)
        ttl = self.enrollment.attestation.ttl if nonce and self.enrollment.attestation else 0.0
        return node_pb2.BeginRenewalResponse(nonce=nonce, expires_in_seconds=ttl)

    async def renew_certificate(self, request: node_pb2.RenewCertificateRequest,
                                context: Any) -> node_pb2.RenewCertificateResponse:
        peer = self.authz.require(context, "host")
        self.limiter.admit(peer.name, "renew")
        issued = self.enrollment.renew(peer.identity, request.csr_pem, request.nonce,
                                       request.tpm_signature)
        logs.event("host certificate renewed", host=peer.name,
                   serial=format(issued.cert.serial_number, "x"))
        return node_pb2.RenewCertificateResponse(
            certificate_pem=issued.cert.public_bytes(serialization.Encoding.PEM))

    async def stream_grants(self, requests: AsyncIterator[node_pb2.GrantStreamRequest],
                            context: Any) -> AsyncIterator[node_pb2.GrantStreamResponse]:
        peer = self.authz.require(context, "host")
        with self.limiter.stream(peer.name, "StreamGrants"):
            self.limiter.admit(peer.name, "subscribe")
            async for response in self._stream_grants(peer, requests):
                yield response

    async def _stream_grants(self, peer: Peer,
                             requests: AsyncIterator[node_pb2.GrantStreamRequest],
                             ) -> AsyncIterator[node_pb2.GrantStreamResponse]:
        first = await anext(requests, None)
        if first is None:
            return
        if first.WhichOneof("kind") != "subscribe":
            raise status.invalid("subscribe", "the first message of the stream must be a "
                                 "Subscribe")
        host = check_host(first.subscribe.host, "subscribe.host")
        peer.require_self(host, "subscribe.host")
        session = Session(host, peer)
        self.hub.attach(session)
        reader = asyncio.create_task(self._read_answers(session, requests))
        logs.event("host connected", host=host, version_held=first.subscribe.version_held)
        try:
            await self.publisher.subscribe(session, first.subscribe.version_held)
            while True:
                push = await session.next_push(self._recheck_in(peer))
                if session.closed:
                    if session.failure is not None:
                        raise session.failure
                    return
                self.authz.check_valid(peer)  # revoked or expired since the stream began
                if push is not None:
                    self.metrics.pushes.inc()
                    yield node_pb2.GrantStreamResponse(version=push.version, nonce=push.nonce,
                                                       envelope=push.envelope)
        finally:
            reader.cancel()
            self.hub.detach(session)
            logs.event("host disconnected", host=host)

    def _recheck_in(self, peer: Peer) -> float:
        return max(0.05, min(RECHECK_SECONDS, peer.not_after - self.clock()))

    async def _read_answers(self, session: Session,
                            requests: AsyncIterator[node_pb2.GrantStreamRequest]) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "ack":
                    self._answer(session, request.ack.nonce, request.ack.version, None)
                elif kind == "nack":
                    # stored and handed to admins escaped: no client of the admin
                    # API gets a host's control characters
                    reason = escape(request.nack.reason[:MAX_REASON])[:MAX_REASON] or \
                        "no reason given"
                    self._answer(session, request.nack.nonce, request.nack.version, reason)
                else:
                    raise status.invalid(kind or "kind", "only the first message of the "
                                         "stream may be a Subscribe; then Ack or Nack")
        except RpcFailure as failure:
            session.close(failure)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke (client went away, bad bytes …)
            logs.event("grant stream read failed", logging.DEBUG, host=session.host,
                       error=repr(exc))
        session.close(session.failure)

    def _answer(self, session: Session, nonce: str, version: int,
                nack_reason: str | None) -> None:
        sent = session.sent_version(nonce)
        if sent is None or sent != version:
            # xDS semantics: an answer to a push we did not make (or no longer
            # remember) changes nothing.
            logs.event("stale answer ignored", logging.WARNING, host=session.host,
                       nonce=nonce[:32], version=version)
            return
        self.store.record_answer(session.host, version, self.clock(), nack_reason)
        self.hub.answer(session.host, Answer(version, nack_reason is None, nack_reason or ""))
        self.metrics.answers.labels("ack" if nack_reason is None else "nack").inc()
        if nack_reason is None:
            logs.event("host ack", host=session.host, version=version)
        else:
            logs.event("host nack", logging.WARNING, host=session.host, version=version,
                       reason=nack_reason)

    async def _detect(self, host: str, records: list[FlowRecord]) -> None:
        """Run the detectors on a stored batch; their failure never refuses the batch."""
        if self.on_records is None:
            return
        try:
            await self.on_records(records)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logs.event("detection failed", logging.ERROR, host=host, error=repr(exc))

    async def report_flows(self, requests: AsyncIterator[node_pb2.FlowBatch],
                           context: Any) -> AsyncIterator[node_pb2.FlowAck]:
        """Store each batch in one transaction, then acknowledge its sequence.
        A batch at or below the host's highest stored sequence is a resend: it
        is acknowledged again and not stored. A bad record refuses the whole
        batch and ends the stream (nothing of it is stored)."""
        peer = self.authz.require(context, "host")
        with self.limiter.stream(peer.name, "ReportFlows"):
            async for ack in self._report_flows(peer, requests):
                yield ack

    async def _report_flows(self, peer: Peer, requests: AsyncIterator[node_pb2.FlowBatch],
                            ) -> AsyncIterator[node_pb2.FlowAck]:
        async for batch in requests:
            try:
                self.authz.check_valid(peer)  # revoked or expired since the stream began
                flows.check_sequence(batch.sequence)
                await self.limiter.throttle(peer.name, "flow_records", len(batch.records))
                if batch.sequence <= self.store.flow_sequence(peer.name):
                    stored = None
                else:
                    # decoding is pure Python, ~0.1 ms a record: off the event loop,
                    # so a large batch does not hold up grant pushes
                    decoded: list[FlowRecord] = []
                    rows = await asyncio.to_thread(flows.decode_batch, peer.name,
                                                   list(batch.records),
                                                   int(self.clock() * 1e9), decoded)
                    stored = self.store.store_flows(peer.name, batch.sequence, rows)
                    if decoded and self.flow_export is not None and not stored.duplicate:
                        # queued, never awaited: a slow collector does not slow ingest
                        self.flow_export.submit_many(decoded)
                    if not stored.duplicate:
                        await self._detect(peer.name, decoded)
            except RpcFailure:
                self.metrics.flow_batches.labels("refused").inc()
                raise
            if stored is None or stored.duplicate:
                self.metrics.flow_batches.labels("duplicate").inc()
                logs.event("flow batch already stored", host=peer.name,
                           sequence=batch.sequence, records=len(batch.records))
            else:
                self.metrics.flow_batches.labels("stored").inc()
                self.metrics.flow_records.labels("stored").inc(stored.stored)
                self.metrics.flow_records.labels("duplicate").inc(stored.ignored)
                self.metrics.flow_rows.inc(stored.stored)
                logs.event("flows stored", logging.DEBUG, host=peer.name,
                           sequence=batch.sequence, stored=stored.stored,
                           duplicates=stored.ignored)
            yield node_pb2.FlowAck(sequence=batch.sequence)
