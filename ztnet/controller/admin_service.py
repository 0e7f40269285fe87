"""The admin API (proto/ztnet/v1/admin.proto): what operators call. Every
RPC needs an admin certificate; a host certificate gets PERMISSION_DENIED.

ApplyPolicy and Revoke return when every host connected at push time has
answered (ACK or NACK) the new version or a later one, or the timeout
passed: each host's outcome is "ack", "nack" (with the daemon's reason),
"timeout" or "disconnected".

QueryFlows reads the flow store in a worker thread (its own read-only
connection), so a slow query never holds up grant pushes on the event loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from ztnet import logs
from ztnet.controller import flows, status
from ztnet.controller.authz import Authorizer
from ztnet.controller.enrollment import check_host
from ztnet.controller.hub import HostResult, Hub
from ztnet.controller.metrics import ControllerMetrics
from ztnet.controller.publisher import Publication, Publisher
from ztnet.controller.store import Store
from ztnet.errors import ConfigError
from ztnet.grants.model import AGENT_NAME_RE, format_grant_id, parse_grant_id
from ztnet.observe.audit import AuditLog
from ztnet.pki import spiffe_agent_id
from ztnet.policy.compile import grant_id_for
from ztnet.policy.selectors import check_label_key, check_labels, format_labels
from ztnet.v1 import admin_pb2

DEFAULT_WAIT = 10.0
MAX_WAIT = 300.0


class AdminService:
    def __init__(self, store: Store, publisher: Publisher, hub: Hub, authz: Authorizer,
                 clock: Callable[[], float], *, default_wait: float = DEFAULT_WAIT,
                 metrics: ControllerMetrics | None = None,
                 audit: AuditLog | None = None) -> None:
        self.store = store
        self.audit = audit
        self.publisher = publisher
        self.hub = hub
        self.authz = authz
        self.clock = clock
        self.default_wait = default_wait
        self.metrics = metrics or ControllerMetrics()

    async def apply_policy(self, request: admin_pb2.ApplyPolicyRequest,
                           context: Any) -> admin_pb2.ApplyPolicyResponse:
        admin = self.authz.require(context, "admin")
        wait = self._wait(request.timeout_seconds)
        try:
            policy = self.publisher.validate(request.policy_toml, "<ApplyPolicy>")
        except ConfigError as exc:
            raise status.invalid("policy_toml", str(exc)) from None
        publication = await self.publisher.apply(request.policy_toml, policy)
        self._audit("policy.applied", admin=admin.name, version=publication.epoch.version,
                    agents=len(policy.agents), rules=policy.rule_count)
        results = await self._collect(publication, wait)
        logs.event("policy applied", admin=admin.name, version=publication.epoch.version,
                   agents=len(policy.agents), rules=policy.rule_count,
                   **_summary(results))
        return admin_pb2.ApplyPolicyResponse(version=publication.epoch.version,
                                             results=[_result(r) for r in results])

    async def get_policy(self, request: admin_pb2.GetPolicyRequest,
                         context: Any) -> admin_pb2.GetPolicyResponse:
        self.authz.require(context, "admin")
        record = self.store.current_policy()
        if record is None:
            raise status.not_found("no policy has been applied yet")
        return admin_pb2.GetPolicyResponse(version=record.version, policy_toml=record.text,
                                           applied_at=record.applied_at)

    async def list_hosts(self, request: admin_pb2.ListHostsRequest,
                         context: Any) -> admin_pb2.ListHostsResponse:
        self.authz.require(context, "admin")
        epoch = self.publisher.current
        hosts = []
        for record in self.store.hosts():
            hosts.append(admin_pb2.Host(
                name=record.name, spiffe_id=record.spiffe_id,
                applied_version=record.applied_version, last_seen=record.last_seen,
                connected=self.hub.is_connected(record.name),
                in_sync=epoch is not None and record.applied_version == epoch.version,
                last_nack_version=record.nack_version, last_nack_reason=record.nack_reason,
                attestation=record.attestation, ek_hash=record.ek_hash,
                labels=dict(record.labels)))
        return admin_pb2.ListHostsResponse(hosts=hosts)

    async def label_host(self, request: admin_pb2.LabelHostRequest,
                         context: Any) -> admin_pb2.LabelHostResponse:
        """Change a host's labels: validated whole (nothing changes on error), audited,
        then pushed to every connected host as a new epoch."""
        admin = self.authz.require(context, "admin")
        host = check_host(request.host, "host")
        wait = self._wait(request.timeout_seconds)
        record = next((r for r in self.store.hosts() if r.name == host), None)
        if record is None:
            raise status.not_found(f"host: {host!r} is not enrolled")
        try:
            for key in request.remove:
                check_label_key(key)
            if set(request.remove) & set(request.labels):
                raise ValueError("a key is both set and removed: "
                                 + ",".join(sorted(set(request.remove) & set(request.labels))))
            before = dict(record.labels)
            after = {k: v for k, v in before.items() if k not in set(request.remove)}
            after = check_labels({**after, **dict(request.labels)})
        except ValueError as exc:
            raise status.invalid("labels", str(exc)) from None
        if after == before:
            return admin_pb2.LabelHostResponse(labels=after, changed=False)
        publication = await self.publisher.relabel(host, after)
        version = publication.epoch.version if publication is not None else 0
        self._audit("host.labels", admin=admin.name, host=host, before=format_labels(before),
                    after=format_labels(after), version=version)
        results = await self._collect(publication, wait) if publication is not None else []
        logs.event("host labels changed", admin=admin.name, host=host,
                   labels=format_labels(after), version=version, **_summary(results))
        return admin_pb2.LabelHostResponse(labels=after, changed=True, version=version,
                                           results=[_result(r) for r in results])

    async def list_agents(self, request: admin_pb2.ListAgentsRequest,
                          context: Any) -> admin_pb2.ListAgentsResponse:
        self.authz.require(context, "admin")
        policy = self.publisher.policy
        if policy is None:
            return admin_pb2.ListAgentsResponse()
        revocations = self.store.revocations()
        agents = []
        for agent in policy.agents:
            revoked = [format_grant_id(r.grant_id) if r.grant_id is not None else "all"
                       for r in revocations if r.agent == agent.name]
            agents.append(admin_pb2.Agent(
                name=agent.name, spiffe_id=spiffe_agent_id(policy.trust_domain, agent.name),
                rules=len(agent.allow), revoked_grants=revoked))
        return admin_pb2.ListAgentsResponse(agents=agents)

    async def revoke(self, request: admin_pb2.RevokeRequest,
                     context: Any) -> admin_pb2.RevokeResponse:
        admin = self.authz.require(context, "admin")
        if not AGENT_NAME_RE.match(request.agent):
            raise status.invalid("agent", f"{request.agent!r} is not an agent name")
        grant_id = None
        if request.grant_id:
            try:
                grant_id = parse_grant_id(request.grant_id)
            except ValueError as exc:
                raise status.invalid("grant_id", str(exc)) from None
        policy = self.publisher.policy
        if policy is None:
            raise status.precondition("no policy has been applied yet; nothing to revoke")
        agent = policy.agent(request.agent)
        if agent is None:
            raise status.not_found(f"agent: {request.agent!r} is not in the current policy "
                                   f"(version {self.publisher.policy_version})")
        if request.restore:
            if not any(r.agent == agent.name and r.grant_id == grant_id
                       for r in self.store.revocations()):
                what = f"grant {request.grant_id}" if grant_id else "all grants"
                raise status.not_found(f"agent {agent.name} has no revocation of {what} to "
                                       "restore")
        elif grant_id is not None and grant_id not in {
                grant_id_for(policy.trust_domain, agent.name, rule) for rule in agent.allow} \
                and grant_id not in {g.grant_id for g in self.store.jit_grants(self.clock())
                                     if g.agent == agent.name}:
            raise status.not_found(f"grant_id: agent {agent.name} has no grant "
                                   f"{request.grant_id} in the current policy")
        publication = await self.publisher.revoke(agent.name, grant_id, restore=request.restore)
        self._audit("grants.restored" if request.restore else "grants.revoked",
                    admin=admin.name, agent=agent.name, grant=request.grant_id or "all",
                    version=publication.epoch.version)
        results = await self._collect(publication, self.default_wait)
        logs.event("grants restored" if request.restore else "grants revoked", admin=admin.name,
                   agent=agent.name, grant=request.grant_id or "all",
                   version=publication.epoch.version, **_summary(results))
        return admin_pb2.RevokeResponse(version=publication.epoch.version,
                                        results=[_result(r) for r in results])

    async def query_flows(self, request: admin_pb2.QueryFlowsRequest,
                          context: Any) -> admin_pb2.QueryFlowsResponse:
        self.authz.require(context, "admin")
        query = flows.parse_query(request)
        started = time.perf_counter()
        page = await asyncio.to_thread(self.store.query_flows, query)
        self.metrics.query_seconds.observe(time.perf_counter() - started)
        return flows.response(page.records, page.more)

    def _audit(self, kind: str, **fields: object) -> None:
        if self.audit is not None:
            self.audit.append(kind, fields)

    def _wait(self, seconds: float) -> float:
        if math.isnan(seconds) or seconds < 0 or seconds > MAX_WAIT:
            raise status.invalid("timeout_seconds", f"must be between 0 (the default, "
                                 f"{self.default_wait:g}s) and {MAX_WAIT:g}")
        return seconds or self.default_wait

    async def _collect(self, publication: Publication, wait: float) -> list[HostResult]:
        return await self.hub.collect(publication.answers, publication.epoch.version, wait)


def _result(result: HostResult) -> admin_pb2.HostResult:
    return admin_pb2.HostResult(host=result.host, outcome=result.outcome,
                                version=result.version, reason=result.reason)


def _summary(results: list[HostResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    return counts
