"""Detection and response on the admin API (proto/ztnet/v1/admin.proto): Quarantine,
Release, ListQuarantines, ListAlerts, FollowAlerts, GetBaseline, ResetBaseline. Every
RPC needs an admin certificate. Registered next to ``AdminService`` under the same
service name (docs/detection.md).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc

from ztnet import logs
from ztnet.controller import rpc, status
from ztnet.controller.admin_service import MAX_WAIT, _result
from ztnet.controller.authz import Authorizer
from ztnet.controller.detect.response import Responder
from ztnet.controller.detectstore import AlertRecord, QuarantineRecord
from ztnet.controller.enrollment import check_host
from ztnet.controller.hub import HostResult, Hub
from ztnet.controller.publisher import Publication
from ztnet.controller.store import Store
from ztnet.grants.model import AGENT_NAME_RE
from ztnet.text import escape
from ztnet.v1 import admin_pb2

MAX_REASON = 512
MAX_ALERTS = 10_000


class ResponseService:
    def __init__(self, store: Store, responder: Responder, hub: Hub, authz: Authorizer, *,
                 wait: float = 10.0) -> None:
        self.store = store
        self.responder = responder
        self.hub = hub
        self.authz = authz
        self.wait = min(wait, MAX_WAIT)

    async def quarantine(self, request: admin_pb2.QuarantineRequest,
                         context: Any) -> admin_pb2.QuarantineResponse:
        admin = self.authz.require(context, "admin")
        agent = _agent(request.agent)
        host = ""
        if request.host:
            host = check_host(request.host, "host")
            if host not in {record.name for record in self.store.hosts()}:
                raise status.not_found(f"host: {host!r} is not an enrolled host")
        reason = _reason(request.reason)
        if self.responder.publisher.policy is None:
            raise status.precondition("no policy has been applied yet")
        record = QuarantineRecord(agent, host, reason, request.freeze, admin.name, 0, 0,
                                  self.responder.clock())
        publication = await self.responder.quarantine(record)
        results = await self._collect(publication)
        logs.event("agent quarantined", admin=admin.name, agent=agent, host=host or "all",
                   freeze=request.freeze, version=publication.epoch.version)
        return admin_pb2.QuarantineResponse(version=publication.epoch.version,
                                            results=[_result(r) for r in results])

    async def release(self, request: admin_pb2.ReleaseRequest,
                      context: Any) -> admin_pb2.ReleaseResponse:
        admin = self.authz.require(context, "admin")
        agent = _agent(request.agent)
        reason = _reason(request.reason) if request.reason else "released by an operator"
        publication, lifted = await self.responder.release(agent, admin.name, reason)
        if publication is None:
            raise status.not_found(f"agent {agent} is not quarantined")
        results = await self._collect(publication)
        logs.event("agent released", admin=admin.name, agent=agent,
                   version=publication.epoch.version)
        return admin_pb2.ReleaseResponse(version=publication.epoch.version,
                                         results=[_result(r) for r in results],
                                         released=[_entry(q) for q in lifted])

    async def list_quarantines(self, request: admin_pb2.ListQuarantinesRequest,
                               context: Any) -> admin_pb2.ListQuarantinesResponse:
        self.authz.require(context, "admin")
        return admin_pb2.ListQuarantinesResponse(
            quarantines=[_entry(q) for q in self.store.quarantines()])

    async def list_alerts(self, request: admin_pb2.ListAlertsRequest,
                          context: Any) -> admin_pb2.ListAlertsResponse:
        self.authz.require(context, "admin")
        agent, limit = _alert_filter(request)
        alerts = self.store.alerts(agent=agent, after_id=request.after_id, limit=limit)
        return admin_pb2.ListAlertsResponse(alerts=[alert_message(a) for a in alerts])

    async def follow_alerts(self, request: admin_pb2.ListAlertsRequest,
                            context: Any) -> AsyncIterator[admin_pb2.Alert]:
        self.authz.require(context, "admin")
        agent, _ = _alert_filter(request)
        async for alert in self.responder.follow(agent, request.after_id):
            yield alert_message(alert)

    async def get_baseline(self, request: admin_pb2.BaselineRequest,
                           context: Any) -> admin_pb2.BaselineResponse:
        self.authz.require(context, "admin")
        agent = _agent(request.agent)
        baseline = self.responder.baseline(agent)
        body = json.dumps(baseline.to_json(), sort_keys=True) if baseline else ""
        return admin_pb2.BaselineResponse(agent=agent, baseline_json=body)

    async def reset_baseline(self, request: admin_pb2.BaselineRequest,
                             context: Any) -> admin_pb2.BaselineResponse:
        admin = self.authz.require(context, "admin")
        agent = _agent(request.agent)
        if request.from_policy:
            policy = self.responder.publisher.policy
            if policy is None or policy.agent(agent) is None:
                raise status.not_found(f"agent {agent} is not in the current policy: no rules "
                                       "to seed a baseline from")
        baseline = self.responder.reset_baseline(agent, admin.name, seed=request.from_policy)
        logs.event("baseline reset", admin=admin.name, agent=agent,
                   source="policy" if baseline else "learning")
        body = json.dumps(baseline.to_json(), sort_keys=True) if baseline else ""
        return admin_pb2.BaselineResponse(agent=agent, baseline_json=body)

    async def _collect(self, publication: Publication) -> list[HostResult]:
        return await self.hub.collect(publication.answers, publication.epoch.version,
                                      self.wait)


def alert_message(alert: AlertRecord) -> admin_pb2.Alert:
    return admin_pb2.Alert(id=alert.id, time=alert.time, agent=alert.agent, host=alert.host,
                           detector=alert.detector, summary=alert.summary,
                           evidence=list(alert.evidence), action=alert.action,
                           first_evidence_ns=alert.first_evidence_ns)


def _entry(record: QuarantineRecord) -> admin_pb2.QuarantineEntry:
    return admin_pb2.QuarantineEntry(agent=record.agent, host=record.host,
                                     reason=record.reason, freeze=record.freeze,
                                     actor=record.actor, alert_id=record.alert_id,
                                     since=record.created_at)


def _agent(name: str) -> str:
    if not AGENT_NAME_RE.match(name):
        raise status.invalid("agent", f"{escape(name[:80])!r} is not an agent name")
    return name


def _reason(text: str) -> str:
    if not text.strip():
        raise status.invalid("reason", "a reason is required (it is shown and audited)")
    if len(text) > MAX_REASON:
        raise status.invalid("reason", f"longer than {MAX_REASON} characters")
    return escape(text)  # stored as shown: no control characters reach a terminal


def _alert_filter(request: admin_pb2.ListAlertsRequest) -> tuple[str, int]:
    agent = _agent(request.agent) if request.agent else ""
    if request.limit > MAX_ALERTS:
        raise status.invalid("limit", f"{request.limit} is above the maximum of {MAX_ALERTS}")
    return agent, request.limit or 100


def response_handlers(service: ResponseService, name: str) -> grpc.GenericRpcHandler:
    return rpc.service(name, {
        "Quarantine": rpc.unary("Quarantine", service.quarantine, admin_pb2.QuarantineRequest),
        "Release": rpc.unary("Release", service.release, admin_pb2.ReleaseRequest),
        "ListQuarantines": rpc.unary("ListQuarantines", service.list_quarantines,
                                     admin_pb2.ListQuarantinesRequest),
        "ListAlerts": rpc.unary("ListAlerts", service.list_alerts,
                                admin_pb2.ListAlertsRequest),
        "FollowAlerts": rpc.server_stream("FollowAlerts", service.follow_alerts,
                                          admin_pb2.ListAlertsRequest),
        "GetBaseline": rpc.unary("GetBaseline", service.get_baseline,
                                 admin_pb2.BaselineRequest),
        "ResetBaseline": rpc.unary("ResetBaseline", service.reset_baseline,
                                   admin_pb2.BaselineRequest),
    })
