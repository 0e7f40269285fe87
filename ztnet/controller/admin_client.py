"""The operator's side of the admin API: `ztnet policy apply|show`, `ztnet
hosts`, `ztnet agents --controller`, `ztnet revoke`, `ztnet flows`.

Every command takes the controller's mutual-TLS address and an admin
credential directory (admin.key, admin.pem, ca.pem from `ztnet controller
admin-cert`), from ``--controller``/``--credentials`` or the environment
(``ZTNET_CONTROLLER``/``ZTNET_CREDENTIALS``). A failed call is a
ControllerError naming the address and the gRPC status.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TextIO

import grpc
from google.protobuf.message import Message

from ztnet.controller.statedir import AdminPaths, read_file
from ztnet.errors import ConfigError, ControllerError
from ztnet.grants.bundle import format_time
from ztnet.observe.records import from_json
from ztnet.observe.render import Renderer
from ztnet.v1 import admin_pb2, admin_pb2_grpc

ENV_CONTROLLER = "ZTNET_CONTROLLER"
ENV_CREDENTIALS = "ZTNET_CREDENTIALS"
RPC_TIMEOUT = 30.0
# QueryFlows answers may reach 16 MiB (10,000 records); gRPC's default is 4 MiB.
MAX_RECEIVE_BYTES = 32 * 1024 * 1024


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

    def query_flows(self, request: admin_pb2.QueryFlowsRequest) -> admin_pb2.QueryFlowsResponse:
        response: admin_pb2.QueryFlowsResponse = self._call(self._stub.QueryFlows, request)
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


# --- commands ----------------------------------------------------------------------


def policy_apply(client: AdminClient, path: Path, *, wait: float = 0.0,
                 out: TextIO | None = None) -> int:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"policy: cannot read {path}: {exc}") from None
    response = client.apply_policy(text, wait)
    return _report(f"policy version {response.version} stored", response.version,
                   response.results, out)


def policy_show(client: AdminClient, *, out: TextIO | None = None) -> int:
    response = client.get_policy()
    print(f"# version {response.version}, applied {format_time(response.applied_at)}",
          file=sys.stderr)
    _print(out, response.policy_toml.rstrip("\n"))
    return 0


def hosts(client: AdminClient, *, out: TextIO | None = None) -> int:
    rows = [("HOST", "APPLIED", "IN SYNC", "CONNECTED", "LAST SEEN", "LAST NACK")]
    for host in client.list_hosts().hosts:
        nack = f"v{host.last_nack_version}: {host.last_nack_reason}" if \
            host.last_nack_version else "-"
        rows.append((host.name, str(host.applied_version or "-"), _yes(host.in_sync),
                     _yes(host.connected),
                     format_time(host.last_seen) if host.last_seen else "never", nack))
    _table(rows, out)
    return 0


def agents(client: AdminClient, *, out: TextIO | None = None) -> int:
    rows = [("AGENT", "RULES", "REVOKED", "SPIFFE ID")]
    for agent in client.list_agents().agents:
        rows.append((agent.name, str(agent.rules), ",".join(agent.revoked_grants) or "-",
                     agent.spiffe_id))
    _table(rows, out)
    return 0


def revoke(client: AdminClient, agent: str, grant_id: str = "", *, restore: bool = False,
           out: TextIO | None = None) -> int:
    response = client.revoke(agent, grant_id, restore=restore)
    what = f"grant {grant_id} of agent {agent}" if grant_id else f"every grant of agent {agent}"
    verb = "restored" if restore else "revoked"
    return _report(f"{verb} {what}: version {response.version}", response.version,
                   response.results, out)


def flows(client: AdminClient, request: admin_pb2.QueryFlowsRequest, *, as_json: bool = False,
          color: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The newest matching flows, printed in time order (oldest first, like
    `ztnet observe`) with the same table or JSON lines."""
    response = client.query_flows(request)
    err = err if err is not None else sys.stderr
    renderer = Renderer(out if out is not None else sys.stdout, json=as_json, color=color)
    skipped = 0
    try:
        for data in reversed(response.records):
            try:
                record = from_json(data)
            except ValueError:  # a newer schema on the controller: say so, carry on
                skipped += 1
                continue
            renderer.write(record)
        renderer.flush()
    except BrokenPipeError:  # `ztnet flows | head`
        return 0
    if skipped:
        err.write(f"flows: skipped {skipped} records this ztnet cannot read\n")
    if response.truncated:
        err.write(f"flows: showing the newest {len(response.records)}; more match (narrow "
                  "the filters or raise --limit)\n")
    elif renderer.count == 0 and not as_json:
        err.write("flows: no matching flows\n")
    return 0


def _report(headline: str, version: int, results: Sequence[admin_pb2.HostResult],
            out: TextIO | None) -> int:
    if not results:
        _print(out, f"{headline}; no host is connected (hosts get it when they connect)")
        return 0
    _print(out, f"{headline}; pushed to {len(results)} connected host(s):")
    rows = [("HOST", "OUTCOME", "VERSION", "REASON")]
    rows += [(r.host, r.outcome, str(r.version), r.reason or "") for r in results]
    _table(rows, out)
    failed = [r for r in results if r.outcome != "ack"]
    if failed:
        names = ", ".join(f"{r.host} ({r.outcome})" for r in failed)
        raise ControllerError(f"controller: version {version} was not applied by "
                              f"{len(failed)} of {len(results)} host(s): {names}")
    return 0


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _table(rows: Sequence[tuple[str, ...]], out: TextIO | None) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        _print(out, "  ".join(cell.ljust(width) for cell, width in
                              zip(row, widths, strict=True)).rstrip())


def _print(out: TextIO | None, text: str) -> None:
    print(text, file=out if out is not None else sys.stdout)
