"""The operator's side of the admin API: a client for the controller's
AdminService, used by `ztnet policy apply|show`, `ztnet hosts`, `ztnet agents
--controller`, `ztnet revoke` and `ztnet flows` (ztnet.cli.operator prints
what it returns).

The client speaks mutual TLS with an admin credential directory (admin.key,
admin.pem, ca.pem from `ztnet controller admin-cert`); :func:`resolve` finds
the address and directory from the options or the environment
(``ZTNET_CONTROLLER``/``ZTNET_CREDENTIALS``). Methods take plain arguments and
build the requests themselves; a failed call is a ControllerError naming the
address and the gRPC status.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
from google.protobuf.message import Message

from ztnet.controller.flowstore import MAX_AHEAD_NS
from ztnet.controller.statedir import AdminPaths, read_file
from ztnet.errors import ConfigError, ControllerError
from ztnet.v1 import admin_pb2, admin_pb2_grpc

ENV_CONTROLLER = "ZTNET_CONTROLLER"
ENV_CREDENTIALS = "ZTNET_CREDENTIALS"
RPC_TIMEOUT = 30.0
# QueryFlows answers may reach 16 MiB (10,000 records); gRPC's default is 4 MiB.
MAX_RECEIVE_BYTES = 32 * 1024 * 1024
_PAGE = 10_000  # QueryFlows' largest limit (ztnet.controller.flows.MAX_LIMIT)


@dataclass(frozen=True, slots=True)
class AdminCredentials:
    ca_pem: bytes
    key_pem: bytes
    cert_pem: bytes

    @classmethod
    def load(cls, directory: Path) -> AdminCredentials:
        paths = AdminPaths(directory)
        return cls(read_file(paths.ca_cert), read_file(paths.key), read_file(paths.cert))


def resolve(controller: str | None, credentials: str | os.PathLike[str] | None,
            ) -> tuple[str, AdminCredentials]:
    """The address and credentials from the options, else the environment."""
    address = controller or os.environ.get(ENV_CONTROLLER, "")
    directory = credentials or os.environ.get(ENV_CREDENTIALS, "")
    if not address:
        raise ConfigError(f"controller: no controller address: pass --controller HOST:PORT "
                          f"or set {ENV_CONTROLLER}")
    if not directory:
        raise ConfigError(f"controller: no admin credentials: pass --credentials DIR or set "
                          f"{ENV_CREDENTIALS} (`ztnet controller admin-cert` makes one)")
    return address, AdminCredentials.load(Path(directory))


class AdminClient:
    def __init__(self, address: str, credentials: AdminCredentials, *,
                 timeout: float = RPC_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=credentials.ca_pem, private_key=credentials.key_pem,
            certificate_chain=credentials.cert_pem)
        self._channel = grpc.secure_channel(
            address, channel_credentials,
            options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)])
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def apply_policy(self, text: str, wait: float = 0.0) -> admin_pb2.ApplyPolicyResponse:
        request = admin_pb2.ApplyPolicyRequest(policy_toml=text, timeout_seconds=wait)
        response: admin_pb2.ApplyPolicyResponse = self._call(self._stub.ApplyPolicy, request,
                                                             extra=wait)
        return response

    def get_policy(self) -> admin_pb2.GetPolicyResponse:
        response: admin_pb2.GetPolicyResponse = self._call(self._stub.GetPolicy,
                                                           admin_pb2.GetPolicyRequest())
        return response

    def list_hosts(self) -> admin_pb2.ListHostsResponse:
        response: admin_pb2.ListHostsResponse = self._call(self._stub.ListHosts,
                                                           admin_pb2.ListHostsRequest())
        return response

    def list_agents(self) -> admin_pb2.ListAgentsResponse:
        response: admin_pb2.ListAgentsResponse = self._call(self._stub.ListAgents,
                                                             admin_pb2.ListAgentsRequest())
        return response

    def revoke(self, agent: str, grant_id: str = "", *,
               restore: bool = False) -> admin_pb2.RevokeResponse:
        request = admin_pb2.RevokeRequest(agent=agent, grant_id=grant_id, restore=restore)
        response: admin_pb2.RevokeResponse = self._call(self._stub.Revoke, request)
        return response

    def label_host(self, host: str, labels: dict[str, str], remove: list[str], *,
                   wait: float = 0.0) -> admin_pb2.LabelHostResponse:
        """Set ``labels`` and remove the keys in ``remove`` on ``host``; pushed at once."""
        request = admin_pb2.LabelHostRequest(host=host, labels=labels, remove=remove,
                                             timeout_seconds=wait)
        response: admin_pb2.LabelHostResponse = self._call(self._stub.LabelHost, request,
                                                           extra=wait)
        return response

    def issue_grant(self, agent: str, to: str, ports: str, *, proto: str = "tcp",
                    ttl: float, reason: str, hosts: list[str] | None = None,
                    wait: float = 0.0) -> admin_pb2.IssueGrantResponse:
        """A just-in-time grant, pushed at once (docs/policy.md, "Just-in-time grants")."""
        request = admin_pb2.IssueGrantRequest(agent=agent, to=to, ports=ports, proto=proto,
                                              ttl_seconds=ttl, reason=reason,
                                              hosts=hosts or [], timeout_seconds=wait)
        response: admin_pb2.IssueGrantResponse = self._call(self._stub.IssueGrant, request,
                                                            extra=wait)
        return response

    def list_grants(self, *, include_expired: bool = False) -> admin_pb2.ListGrantsResponse:
        response: admin_pb2.ListGrantsResponse = self._call(
            self._stub.ListGrants, admin_pb2.ListGrantsRequest(include_expired=include_expired))
        return response

    def list_grant_requests(self, state: str = "") -> admin_pb2.ListGrantRequestsResponse:
        response: admin_pb2.ListGrantRequestsResponse = self._call(
            self._stub.ListGrantRequests, admin_pb2.ListGrantRequestsRequest(state=state))
        return response

    def decide_grant_request(self, request_id: str, *, approve: bool, note: str = "",
                             ttl: float = 0.0, wait: float = 0.0
                             ) -> admin_pb2.DecideGrantRequestResponse:
        request = admin_pb2.DecideGrantRequestRequest(request_id=request_id, approve=approve,
                                                      note=note, ttl_seconds=ttl,
                                                      timeout_seconds=wait)
        response: admin_pb2.DecideGrantRequestResponse = self._call(
            self._stub.DecideGrantRequest, request, extra=wait)
        return response

    def query_flows(self, *, host: str = "", agent: str = "", verdict: str = "",
                    event_type: str = "", since_ns: int = 0, until_ns: int = 0,
                    limit: int = 0) -> admin_pb2.QueryFlowsResponse:
        """The newest ``limit`` matching records (0: the controller's default), newest
        first. Empty strings and zeros match everything; the controller checks the values
        (``verdict``: allowed|denied|audit, ``event_type``: connect|sendmsg|flow_end|dns)."""
        request = admin_pb2.QueryFlowsRequest(host=host, agent=agent, verdict=verdict,
                                              event_type=event_type, since_ns=since_ns,
                                              until_ns=until_ns, limit=limit)
        response: admin_pb2.QueryFlowsResponse = self._call(self._stub.QueryFlows, request)
        return response

    def flow_history(self, *, agent: str = "", since_ns: int = 0,
                     max_records: int = 1_000_000, page: int = _PAGE) -> list[bytes]:
        """Every stored record (JSON) of ``agent`` (all: "") dated ``since_ns`` or later.
        QueryFlows answers at most ``page`` (10,000) records, newest received first; a window
        of record time that matches more is split in two until every part fits, so nothing is
        missed whatever order the records arrived in. ControllerError beyond ``max_records``."""
        # hosts may date records at most MAX_AHEAD_NS after the controller receives them
        windows = [(since_ns, time.time_ns() + 2 * MAX_AHEAD_NS)]
        records: list[bytes] = []
        while windows:
            low, high = windows.pop()
            answer = self.query_flows(agent=agent, since_ns=low, until_ns=high, limit=page)
            if answer.truncated:
                if high - low <= 1:
                    raise ControllerError(f"controller: more than {page} flow records at one "
                                          "instant; cannot read them all")
                middle = (low + high) // 2
                windows += [(low, middle), (middle, high)]
                continue
            records += answer.records
            if len(records) > max_records:
                raise ControllerError(f"controller: more than {max_records} flow records "
                                      "match; narrow the time window (--since)")
        return records

    def quarantine(self, agent: str, *, host: str = "", reason: str,
                   freeze: bool = False) -> admin_pb2.QuarantineResponse:
        request = admin_pb2.QuarantineRequest(agent=agent, host=host, reason=reason,
                                              freeze=freeze)
        response: admin_pb2.QuarantineResponse = self._call(self._stub.Quarantine, request)
        return response

    def release(self, agent: str, reason: str = "") -> admin_pb2.ReleaseResponse:
        request = admin_pb2.ReleaseRequest(agent=agent, reason=reason)
        response: admin_pb2.ReleaseResponse = self._call(self._stub.Release, request)
        return response

    def list_quarantines(self) -> admin_pb2.ListQuarantinesResponse:
        response: admin_pb2.ListQuarantinesResponse = self._call(
            self._stub.ListQuarantines, admin_pb2.ListQuarantinesRequest())
        return response

    def list_alerts(self, *, agent: str = "", after_id: int = 0,
                    limit: int = 0) -> admin_pb2.ListAlertsResponse:
        request = admin_pb2.ListAlertsRequest(agent=agent, after_id=after_id, limit=limit)
        response: admin_pb2.ListAlertsResponse = self._call(self._stub.ListAlerts, request)
        return response

    def follow_alerts(self, *, agent: str = "", after_id: int = 0,
                      ) -> Iterator[admin_pb2.Alert]:
        """Stored alerts after ``after_id``, then each new one, until the caller stops."""
        request = admin_pb2.ListAlertsRequest(agent=agent, after_id=after_id)
        try:
            yield from self._stub.FollowAlerts(request)
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() is grpc.StatusCode.CANCELLED:
                return
            raise rpc_error(self.address, exc) from None

    def get_baseline(self, agent: str) -> admin_pb2.BaselineResponse:
        response: admin_pb2.BaselineResponse = self._call(
            self._stub.GetBaseline, admin_pb2.BaselineRequest(agent=agent))
        return response

    def reset_baseline(self, agent: str, *,
                       from_policy: bool = False) -> admin_pb2.BaselineResponse:
        response: admin_pb2.BaselineResponse = self._call(
            self._stub.ResetBaseline, admin_pb2.BaselineRequest(agent=agent,
                                                                from_policy=from_policy))
        return response

    def _call(self, method: Callable[..., Any], request: Message, extra: float = 0.0) -> Any:
        # gRPC's stubs are untyped; each caller above names the response type.
        try:
            return method(request, timeout=self.timeout + extra)
        except grpc.RpcError as exc:
            raise rpc_error(self.address, exc) from None


def rpc_error(address: str, exc: grpc.RpcError) -> ControllerError:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = (exc.details() if isinstance(exc, grpc.Call) else str(exc)) or "no details"
    if code is grpc.StatusCode.UNAVAILABLE:
        return ControllerError(f"controller: cannot reach {address} over mutual TLS "
                               f"({details}); check the address, and that the credentials "
                               "are from this controller and not expired")
    name = code.name if code is not None else "ERROR"
    return ControllerError(f"controller: {address}: {name}: {details}")
