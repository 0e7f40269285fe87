"""`ztnet controller serve`: one gRPC server (asyncio), two listeners.

    --listen ADDR         mutual TLS: the TLS handshake requires a client
                          certificate issued by the CA. Node, admin, health
                          and reflection services.
    --enroll-listen ADDR  server-authenticated TLS, no client certificate:
                          the same services, but only Enroll (and health,
                          reflection) can succeed there; everything else is
                          UNAUTHENTICATED for lack of a certificate.

Two listeners because gRPC Python can either require a verified client
certificate or not ask for one at all: it has no "ask, verify if given"
mode, and enrolling hosts have no certificate yet. Both present the chain
[server certificate, CA], so a host can pin the CA by its fingerprint.

Ready: after both listeners are bound, the health service says SERVING and
``--ready-file`` (if given) holds the bound addresses as JSON. SIGTERM or
SIGINT: health NOT_SERVING, grant streams end with UNAVAILABLE (daemons
reconnect elsewhere or later), in-flight RPCs get a grace period.

Also: flow records reported by the daemons are stored in the state database
and pruned by ``--flow-retention``/``--flow-max-rows`` (ztnet.controller.flows);
``--metrics ADDR`` serves Prometheus metrics (ztnet.controller.metrics).

``--database postgresql://…``: the state is in PostgreSQL instead of ztnet.db, and
any number of replicas can serve it (ztnet.controller.replicas: they follow each
other's changes). While the database is unreachable, health says NOT_SERVING,
grant streams end with UNAVAILABLE (so daemons fail over to another replica) and
every RPC that needs the database is UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ztnet import logs
from ztnet.controller import rpc, statedir
from ztnet.controller.admin_service import AdminService
from ztnet.controller.attestation import Attestation, EkTrust
from ztnet.controller.authz import Authorizer
from ztnet.controller.detect.observation import observe
from ztnet.controller.detect.response import Responder
from ztnet.controller.enrollment import DEFAULT_HOST_CERT_TTL, Enrollment
from ztnet.controller.epochs import Issuer
from ztnet.controller.flows import Pruner, Retention
from ztnet.controller.hub import Hub
from ztnet.controller.jit_service import JitService
from ztnet.controller.limiter import HostLimiter
from ztnet.controller.limits import HostLimits
from ztnet.controller.metrics import ControllerMetrics
from ztnet.controller.node_service import NodeService
from ztnet.controller.pgstore import PgStore
from ztnet.controller.publisher import Publisher
from ztnet.controller.replicas import ChangeListener, anchor_audit, follow_changes
from ztnet.controller.response_service import ResponseService, response_handlers
from ztnet.controller.status import DatabaseUnavailable
from ztnet.controller.store import SqliteStore, Store
from ztnet.errors import ConfigError, PolicyError, RpcFailure
from ztnet.fsutil import FileTooLarge, read_bounded, replace_atomic
from ztnet.grants.keys import load_private_key
from ztnet.observe.audit import AuditLog
from ztnet.observe.metrics import MetricsServer, start_http_server
from ztnet.observe.records import FlowRecord
from ztnet.policy.document import MAX_POLICY_BYTES
from ztnet.v1 import admin_pb2, node_pb2

if TYPE_CHECKING:
    from ztnet.observe.otlp import OtlpExporter

NODE_SERVICE = "ztnet.v1.NodeService"
ADMIN_SERVICE = "ztnet.v1.AdminService"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SHUTDOWN_GRACE = 5.0
_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # gRPC sets SO_REUSEPORT by default: a second controller on the same port
    # would then start "fine" and take half the connections.
    ("grpc.so_reuseport", 0),
    # Daemons ping every 20 s to notice a dead controller; without these the
    # server would call that abuse and close their connections (too_many_pings).
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    # And the server pings too, so a host that vanished is shown disconnected.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


@dataclass(frozen=True, slots=True)
class ServeConfig:
    state: Path
    listen: str
    enroll_listen: str | None = None
    policy: Path | None = None
    grant_ttl: float = 300.0
    host_cert_ttl: float = DEFAULT_HOST_CERT_TTL
    apply_timeout: float = 10.0
    ready_file: Path | None = None
    retention: Retention = Retention()
    metrics: str | None = None  # HOST:PORT of the Prometheus endpoint
    otlp_endpoint: str | None = None  # HOST:PORT of an OpenTelemetry collector (flows)
    host_limits: HostLimits = HostLimits()
    # TPM enrollment: EK CA certificates (PEM files) and an EK hash allowlist file
    tpm_ek_cas: tuple[Path, ...] = ()
    tpm_ek_allowlist: Path | None = None
    database: str | None = None  # postgresql://… (None: the state directory's ztnet.db)


def serve(config: ServeConfig) -> int:
    return asyncio.run(_serve(config))


async def _serve(config: ServeConfig) -> int:
    paths = statedir.open_state(config.state, config.database)
    store = statedir.open_store(paths, config.database)
    checkpointer = store.checkpoint_in_background() if isinstance(store, SqliteStore) else None
    try:
        return await _run(config, paths, store)
    finally:
        if checkpointer is not None:
            checkpointer.stop()
        store.close()


async def _run(config: ServeConfig, paths: statedir.StatePaths, store: Store) -> int:
    clock = time.time
    authority = statedir.load_authority(paths)
    if statedir.ensure_server_certificate(paths, authority, store, clock()):
        logs.event("server certificate renewed", path=str(paths.server_cert))
    hub = Hub()
    issuer = Issuer(load_private_key(paths.signing_key), grant_ttl=config.grant_ttl)
    publisher = Publisher(store, issuer, hub, clock, shared=isinstance(store, PgStore))
    authz = Authorizer(store, authority, clock)
    trust = EkTrust.load(config.tpm_ek_cas, config.tpm_ek_allowlist)
    enrollment = Enrollment(store, authority, host_cert_ttl=config.host_cert_ttl, clock=clock,
                            attestation=Attestation(trust, clock))
    metrics = ControllerMetrics()
    metrics.follow(hosts=lambda: len(hub.sessions()),
                   bundle_version=lambda: publisher.current.version if publisher.current else 0,
                   policy_version=lambda: publisher.policy_version)
    metrics.flow_rows.set(store.flow_count())
    limiter = HostLimiter(config.host_limits,
                          on_refuse=lambda limit: metrics.host_limited.labels(limit).inc())
    flow_export: OtlpExporter | None = None
    if config.otlp_endpoint is not None:
        from ztnet.observe import otlp  # the SDK loads only when asked for

        flow_export = otlp.OtlpExporter(config.otlp_endpoint, service="ztnet-controller",
                                        host=socket.gethostname())
        otlp.OtlpCollector.register(flow_export, metrics.registry)
    audit = AuditLog(paths.audit)
    responder = Responder(store, publisher, clock, metrics, audit)
    # scraped in the exporter's thread: read the epoch, never the event loop's database
    metrics.quarantined.set_function(
        lambda: len(publisher.current.quarantines) if publisher.current else 0)
    metrics.alerts_held_back.set_function(lambda: responder.engine.held_back)
    metrics.observations_untracked.set_function(lambda: responder.engine.untracked)

    async def detect(records: list[FlowRecord]) -> None:
        await responder.on_batch([observe(record) for record in records])

    node = NodeService(store, enrollment, authz, hub, publisher,
                       statedir.read_file(paths.signing_pub), clock, metrics, limiter,
                       flow_export, on_records=detect)
    admin = AdminService(store, publisher, hub, authz, clock, default_wait=config.apply_timeout,
                         metrics=metrics, audit=audit)
    jit = JitService(store, publisher, hub, authz, clock, audit=audit,
                     default_wait=config.apply_timeout, limiter=limiter)
    response = ResponseService(store, responder, hub, authz, wait=config.apply_timeout)
    pruner = Pruner(store, config.retention, clock, metrics)

    server = grpc.aio.server(options=_SERVER_OPTIONS)
    server.add_generic_rpc_handlers([node_handlers(node, jit), admin_handlers(admin, jit),
                                     response_handlers(response, ADMIN_SERVICE)])
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    for name in ("", NODE_SERVICE, ADMIN_SERVICE):
        await checks.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (NODE_SERVICE, ADMIN_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)

    key_pem = statedir.read_file(paths.server_key)
    chain = statedir.read_file(paths.server_cert) + authority.cert_pem
    addresses = {"listen": _bind(server, config.listen, grpc.ssl_server_credentials(
        [(key_pem, chain)], root_certificates=authority.cert_pem, require_client_auth=True))}
    if config.enroll_listen:
        addresses["enroll_listen"] = _bind(server, config.enroll_listen,
                                           grpc.ssl_server_credentials([(key_pem, chain)]))
    await server.start()
    exporter: MetricsServer | None = None
    pruning: asyncio.Task[None] | None = None
    replica: _Replica | None = None
    try:
        if config.metrics is not None:
            exporter = start_http_server(config.metrics, metrics.registry)
            host = str(exporter.server.server_address[0])
            addresses["metrics"] = f"[{host}]:{exporter.port}" if ":" in host else \
                f"{host}:{exporter.port}"
        if config.policy is not None:
            await _initial_policy(config.policy, publisher, store)
        await publisher.start()
        if isinstance(store, PgStore):
            replica = _Replica(store, publisher, hub, checks)
            replica.anchor(audit, f"{socket.gethostname()}:{config.state.resolve()}")
        pruning = asyncio.create_task(pruner.run(), name="ztnet-flow-prune")
        for name in ("", NODE_SERVICE, ADMIN_SERVICE):
            await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
        if config.ready_file is not None:
            _write_ready(config.ready_file, addresses)
        logs.event("controller serving", trust_domain=store.trust_domain(),
                   ca_fingerprint=authority.fingerprint, version=store.current_version(),
                   tpm_ek_cas=len(trust.cas), tpm_ek_allowlist=len(trust.allowed),
                   listen=addresses["listen"], enroll_listen=addresses.get("enroll_listen", "off"),
                   metrics=addresses.get("metrics", "off"),
                   otlp_endpoint=config.otlp_endpoint or "off")
        await _wait_for_signal()
    finally:
        logs.event("controller stopping")
        await checks.enter_graceful_shutdown()
        for session in hub.sessions():
            session.close(RpcFailure(grpc.StatusCode.UNAVAILABLE,
                                     "the controller is shutting down"))
        await publisher.stop()
        if replica is not None:
            await replica.stop()
        if pruning is not None:
            pruning.cancel()
            await asyncio.gather(pruning, return_exceptions=True)
        await server.stop(SHUTDOWN_GRACE)
        if exporter is not None:
            exporter.close()
        if flow_export is not None:
            await asyncio.to_thread(flow_export.close)
        if config.ready_file is not None:
            config.ready_file.unlink(missing_ok=True)
        audit.close()
    return 0


class _Replica:
    """One replica of several: follows the database's changes, and says in health
    whether it can reach the database."""

    def __init__(self, store: PgStore, publisher: Publisher, hub: Hub,
                 checks: health.aio.HealthServicer) -> None:
        loop = asyncio.get_running_loop()
        self.hub, self.checks = hub, checks
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._anchoring: asyncio.Task[None] | None = None
        self._following = asyncio.create_task(follow_changes(publisher, self._wake),
                                              name="ztnet-follow")
        store.watch_availability(
            lambda available: loop.call_soon_threadsafe(self._availability, available))
        self.listener = ChangeListener(store, lambda: loop.call_soon_threadsafe(self._wake.set))
        self.listener.start()
        self.store = store

    def anchor(self, audit: AuditLog, replica: str) -> None:
        """Keep this replica's audit head in the database (``replica``: its name there)."""
        self._anchoring = asyncio.create_task(anchor_audit(self.store, audit, replica,
                                                           time.time), name="ztnet-anchor")

    def _availability(self, available: bool) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING if available else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", NODE_SERVICE, ADMIN_SERVICE):
            task = asyncio.create_task(self.checks.set(name, serving))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not available:
            # nothing more can be issued here: let the daemons find a replica that can
            for session in self.hub.sessions():
                session.close(DatabaseUnavailable("controller: this replica lost its "
                                                  "database; reconnect to another"))

    async def stop(self) -> None:
        tasks = [self._following, *([self._anchoring] if self._anchoring else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(self.listener.stop)


def node_handlers(node: NodeService, jit: JitService) -> grpc.GenericRpcHandler:
    return rpc.service(NODE_SERVICE, {
        "Enroll": rpc.unary("Enroll", node.enroll, node_pb2.EnrollRequest),
        "BeginAttestation": rpc.unary("BeginAttestation", node.begin_attestation,
                                      node_pb2.BeginAttestationRequest),
        "RenewCertificate": rpc.unary("RenewCertificate", node.renew_certificate,
                                      node_pb2.RenewCertificateRequest),
        "BeginRenewal": rpc.unary("BeginRenewal", node.begin_renewal,
                                  node_pb2.BeginRenewalRequest),
        "StreamGrants": rpc.stream("StreamGrants", node.stream_grants,
                                   node_pb2.GrantStreamRequest),
        "ReportFlows": rpc.stream("ReportFlows", node.report_flows, node_pb2.FlowBatch),
        "RequestGrant": rpc.unary("RequestGrant", jit.request_grant,
                                  node_pb2.RequestGrantRequest),
        "GetGrantRequest": rpc.unary("GetGrantRequest", jit.get_request,
                                     node_pb2.GetGrantRequestRequest),
    })


def admin_handlers(admin: AdminService, jit: JitService) -> grpc.GenericRpcHandler:
    return rpc.service(ADMIN_SERVICE, {
        "ApplyPolicy": rpc.unary("ApplyPolicy", admin.apply_policy,
                                 admin_pb2.ApplyPolicyRequest),
        "GetPolicy": rpc.unary("GetPolicy", admin.get_policy, admin_pb2.GetPolicyRequest),
        "ListHosts": rpc.unary("ListHosts", admin.list_hosts, admin_pb2.ListHostsRequest),
        "ListAgents": rpc.unary("ListAgents", admin.list_agents, admin_pb2.ListAgentsRequest),
        "Revoke": rpc.unary("Revoke", admin.revoke, admin_pb2.RevokeRequest),
        "QueryFlows": rpc.unary("QueryFlows", admin.query_flows, admin_pb2.QueryFlowsRequest),
        "LabelHost": rpc.unary("LabelHost", admin.label_host, admin_pb2.LabelHostRequest),
        "IssueGrant": rpc.unary("IssueGrant", jit.issue_grant, admin_pb2.IssueGrantRequest),
        "ListGrants": rpc.unary("ListGrants", jit.list_grants, admin_pb2.ListGrantsRequest),
        "ListGrantRequests": rpc.unary("ListGrantRequests", jit.list_requests,
                                       admin_pb2.ListGrantRequestsRequest),
        "DecideGrantRequest": rpc.unary("DecideGrantRequest", jit.decide,
                                        admin_pb2.DecideGrantRequestRequest),
    })


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"controller: bad listen address {address!r} (want HOST:PORT, "
                          "e.g. 0.0.0.0:7443 or [::]:7443)")
    try:
        bound = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise ConfigError(f"controller: cannot listen on {address}: {exc}") from None
    if not bound:
        raise ConfigError(f"controller: cannot listen on {address}")
    return f"{host}:{bound}"


async def _initial_policy(path: Path, publisher: Publisher, store: Store) -> None:
    """``--policy FILE`` wins only if it is newer than the stored policy: an
    apply made through the API since the file was written is kept."""
    try:
        data = read_bounded(path, MAX_POLICY_BYTES)
        mtime = path.stat().st_mtime
    except OSError as exc:
        raise ConfigError(f"controller: cannot read --policy {path}: {exc.strerror}") from None
    except FileTooLarge:
        raise PolicyError(f"policy: {path}: larger than {MAX_POLICY_BYTES} bytes") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"policy: {path}: not UTF-8 text (byte {exc.start})") from None
    policy = publisher.validate(text, str(path))
    stored = store.current_policy()
    if stored is not None and (stored.text == text or mtime <= stored.applied_at):
        logs.event("policy file not applied", path=str(path), stored_version=stored.version,
                   reason="same as stored" if stored.text == text else "older than stored")
        return
    publication = await publisher.apply(text, policy)
    logs.event("policy file applied", path=str(path), version=publication.epoch.version)


def _write_ready(path: Path, addresses: dict[str, str]) -> None:
    # readers never see half a file
    replace_atomic(path, (json.dumps({"pid": os.getpid(), **addresses}) + "\n").encode(), 0o644)


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
