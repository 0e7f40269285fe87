"""The RPCs of just-in-time grants (ztnet.controller.jit): IssueGrant, ListGrants,
ListGrantRequests and DecideGrantRequest for admins; RequestGrant and GetGrantRequest for
hosts. Every decision (issued, requested, auto-approved, approved, denied) is written to the
controller's audit trail before the answer goes out."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from ztnet import logs
from ztnet.controller import jit, status
from ztnet.controller.admin_service import _result
from ztnet.controller.authz import Authorizer
from ztnet.controller.enrollment import check_host
from ztnet.controller.hub import HostResult, Hub
from ztnet.controller.jitstore import DENIED, GrantRequest, JitGrant
from ztnet.controller.limiter import HostLimiter
from ztnet.controller.publisher import Publication, Publisher
from ztnet.controller.store import Store
from ztnet.grants.model import format_grant_id
from ztnet.observe.audit import AuditLog
from ztnet.v1 import admin_pb2, node_pb2

MAX_WAIT = 300.0


class JitService:
    def __init__(self, store: Store, publisher: Publisher, hub: Hub, authz: Authorizer,
                 clock: Callable[[], float], *, audit: AuditLog | None = None,
                 default_wait: float = 10.0, limiter: HostLimiter | None = None) -> None:
        self.limiter = limiter or HostLimiter()
        self.store = store
        self.publisher = publisher
        self.hub = hub
        self.authz = authz
        self.clock = clock
        self.audit = audit
        self.default_wait = default_wait

    # --- admin ---------------------------------------------------------------------------

    async def issue_grant(self, request: admin_pb2.IssueGrantRequest,
                          context: Any) -> admin_pb2.IssueGrantResponse:
        admin = self.authz.require(context, "admin")
        wait = self._wait(request.timeout_seconds)
        policy = self.publisher.policy
        jit.check_agent(policy, request.agent)
        assert policy is not None
        path = jit.parse_path(request.to, request.ports, request.proto)
        ttl = policy.jit.clamp(jit.check_ttl(request.ttl_seconds))
        reason = jit.clean_text(request.reason, "reason", jit.MAX_REASON, required=True)
        hosts = tuple(sorted({check_host(h, "hosts") for h in request.hosts}))
        unknown = set(hosts) - {record.name for record in self.store.hosts()}
        if unknown:
            raise status.not_found(f"hosts: not enrolled: {', '.join(sorted(unknown))}")
        grant = jit.make_grant(grant_id=self._new_id(), agent=request.agent, path=path,
                               ttl=ttl, now=self.clock(), hosts=hosts, reason=reason,
                               approver=admin.name, requested_by=f"admin:{admin.name}")
        publication = await self.publisher.issue_jit(grant)
        assert publication is not None
        self._audit("jit.issued", **jit.describe(grant), version=publication.epoch.version)
        results = await self._collect(publication, wait)
        logs.event("jit grant issued", admin=admin.name, grant=format_grant_id(grant.grant_id),
                   agent=grant.agent, to=str(grant.network), ttl=ttl)
        return admin_pb2.IssueGrantResponse(grant=grant_message(grant),
                                            version=publication.epoch.version,
                                            results=[_result(r) for r in results])

    async def list_grants(self, request: admin_pb2.ListGrantsRequest,
                          context: Any) -> admin_pb2.ListGrantsResponse:
        self.authz.require(context, "admin")
        grants = self.store.jit_grants(None if request.include_expired else self.clock())
        return admin_pb2.ListGrantsResponse(grants=[grant_message(g) for g in grants])

    async def list_requests(self, request: admin_pb2.ListGrantRequestsRequest,
                            context: Any) -> admin_pb2.ListGrantRequestsResponse:
        self.authz.require(context, "admin")
        if request.state not in ("", jit.PENDING, jit.APPROVED, DENIED):
            raise status.invalid("state", "pending, approved, denied or empty")
        found = self.store.grant_requests(state=request.state)
        return admin_pb2.ListGrantRequestsResponse(requests=[request_message(r) for r in found])

    async def decide(self, request: admin_pb2.DecideGrantRequestRequest,
                     context: Any) -> admin_pb2.DecideGrantRequestResponse:
        admin = self.authz.require(context, "admin")
        wait = self._wait(request.timeout_seconds)
        pending = self.store.grant_request(request.request_id)
        if pending is None:
            raise status.not_found(f"request_id: no request {request.request_id[:40]!r}")
        if pending.state != jit.PENDING:
            raise status.precondition(f"request {pending.id} is already {pending.state}")
        note = jit.clean_text(request.note, "note", jit.MAX_NOTE, required=False)
        if not request.approve:
            if not self.store.deny_request(pending.id, admin.name, self.clock(), note):
                raise status.precondition(f"request {pending.id} was decided meanwhile")
            self._audit("jit.denied", **jit.describe_request(pending), admin=admin.name,
                        note=note)
            decided = self.store.grant_request(pending.id)
            assert decided is not None
            return admin_pb2.DecideGrantRequestResponse(request=request_message(decided))
        policy = self.publisher.policy
        jit.check_agent(policy, pending.agent)
        assert policy is not None
        ttl = policy.jit.clamp(jit.check_ttl(request.ttl_seconds or pending.ttl))
        grant = jit.make_grant(grant_id=self._new_id(), agent=pending.agent,
                               path=(pending.network, pending.proto, pending.ports), ttl=ttl,
                               now=self.clock(), hosts=(pending.host,), reason=pending.reason,
                               approver=admin.name, requested_by=f"host:{pending.host}",
                               request_id=pending.id)
        publication = await self.publisher.issue_jit(grant, approve=pending.id,
                                                     decided_by=admin.name)
        if publication is None:
            raise status.precondition(f"request {pending.id} was decided meanwhile")
        self._audit("jit.approved", **jit.describe(grant), note=note,
                    version=publication.epoch.version)
        results = await self._collect(publication, wait)
        decided = self.store.grant_request(pending.id)
        assert decided is not None
        return admin_pb2.DecideGrantRequestResponse(
            request=request_message(decided), grant=grant_message(grant),
            version=publication.epoch.version, results=[_result(r) for r in results])

    # --- node ----------------------------------------------------------------------------

    async def request_grant(self, request: node_pb2.RequestGrantRequest,
                            context: Any) -> node_pb2.RequestGrantResponse:
        peer = self.authz.require(context, "host")
        host = peer.name
        self.limiter.admit(host, "grant_requests")
        policy = self.publisher.policy
        jit.check_agent(policy, request.agent)
        assert policy is not None
        jit.check_host_runs(policy, request.agent, host,
                            self.store.host_labels().get(host, {}))
        path = jit.parse_path(request.to, request.ports, request.proto)
        asked = jit.check_ttl(request.ttl_seconds)
        reason = jit.clean_text(request.reason, "reason", jit.MAX_REASON, required=True)
        waiting = self.store.grant_requests(state=jit.PENDING, host=host)
        if len(waiting) >= jit.MAX_PENDING:
            raise status.exhausted(f"host {host} has {len(waiting)} grant requests waiting "
                                   f"for an operator (at most {jit.MAX_PENDING})")
        now = self.clock()
        pending = GrantRequest(jit.new_request_id(), host, request.agent, *path, ttl=asked,
                               reason=reason, state=jit.PENDING, created_at=now)
        self.store.add_request(pending)
        rule = policy.jit.auto_rule(request.agent, *path)
        self._audit("jit.requested", **jit.describe_request(pending),
                    decision="auto" if rule is not None else "pending")
        if rule is None:
            logs.event("jit grant requested", host=host, agent=pending.agent,
                       request=pending.id, to=str(pending.network))
            return _answer(pending, "waiting for an operator (`ztnet approve "
                           f"{pending.id}`)")
        index = policy.jit.auto_approve.index(rule)
        grant = jit.make_grant(grant_id=self._new_id(), agent=pending.agent, path=path,
                               ttl=policy.jit.clamp(asked, rule), now=now, hosts=(host,),
                               reason=reason, approver=jit.AUTO, requested_by=f"host:{host}",
                               request_id=pending.id)
        publication = await self.publisher.issue_jit(grant, approve=pending.id,
                                                     decided_by=jit.AUTO)
        if publication is None:  # cannot happen: nobody else knows the id yet
            raise status.precondition(f"request {pending.id} was decided meanwhile")
        self._audit("jit.approved", **jit.describe(grant), rule=index,
                    version=publication.epoch.version)
        logs.event("jit grant auto-approved", host=host, agent=grant.agent,
                   grant=format_grant_id(grant.grant_id), rule=index)
        decided = self.store.grant_request(pending.id)
        assert decided is not None
        return _answer(decided, f"auto-approved by [[jit.auto_approve]] rule {index}", grant)

    async def get_request(self, request: node_pb2.GetGrantRequestRequest,
                          context: Any) -> node_pb2.RequestGrantResponse:
        peer = self.authz.require(context, "host")
        found = self.store.grant_request(request.request_id)
        if found is None or found.host != peer.name:  # another host's: as if unknown
            raise status.not_found(f"request_id: no request {request.request_id[:40]!r} of "
                                   f"host {peer.name}")
        grant = None
        if found.grant_id:
            grant = next((g for g in self.store.jit_grants() if g.grant_id == found.grant_id),
                         None)
        return _answer(found, found.note or found.state, grant)

    # --- helpers -------------------------------------------------------------------------

    def _new_id(self) -> int:
        policy = self.publisher.policy
        taken = set()
        if policy is not None:
            from ztnet.policy.compile import compile_grants

            taken = {g.grant_id for g in compile_grants(policy, now=0.0)}
        taken |= {g.grant_id for g in self.store.jit_grants()}
        return jit.new_grant_id(taken.__contains__)

    def _audit(self, kind: str, **fields: object) -> None:
        if self.audit is not None:
            self.audit.append(kind, fields)
        else:
            logs.event("audit not recorded", logging.WARNING, kind=kind)

    def _wait(self, seconds: float) -> float:
        if math.isnan(seconds) or seconds < 0 or seconds > MAX_WAIT:
            raise status.invalid("timeout_seconds", f"must be between 0 and {MAX_WAIT:g}")
        return seconds or self.default_wait

    async def _collect(self, publication: Publication, wait: float) -> list[HostResult]:
        return await self.hub.collect(publication.answers, publication.epoch.version, wait)


def grant_message(grant: JitGrant) -> admin_pb2.JitGrant:
    return admin_pb2.JitGrant(
        grant_id=format_grant_id(grant.grant_id), agent=grant.agent, to=str(grant.network),
        proto=str(grant.proto), ports="any" if grant.ports is None else str(grant.ports),
        not_before=grant.not_before, not_after=grant.not_after, hosts=list(grant.hosts),
        reason=grant.reason, approver=grant.approver, requested_by=grant.requested_by,
        request_id=grant.request_id)


def request_message(request: GrantRequest) -> admin_pb2.GrantRequest:
    return admin_pb2.GrantRequest(
        id=request.id, host=request.host, agent=request.agent, to=str(request.network),
        proto=str(request.proto), ports="any" if request.ports is None else str(request.ports),
        ttl_seconds=request.ttl, reason=request.reason, state=request.state,
        created_at=request.created_at, decided_at=request.decided_at,
        decided_by=request.decided_by,
        grant_id=format_grant_id(request.grant_id) if request.grant_id else "",
        note=request.note)


def _answer(request: GrantRequest, message: str,
            grant: JitGrant | None = None) -> node_pb2.RequestGrantResponse:
    return node_pb2.RequestGrantResponse(
        request_id=request.id, state=request.state,
        grant_id=format_grant_id(grant.grant_id) if grant is not None else "",
        not_after=grant.not_after if grant is not None else 0.0,
        ttl_seconds=round(grant.not_after - grant.not_before, 3) if grant is not None else 0.0,
        message=message)
