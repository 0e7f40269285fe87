"""Just-in-time grants: operators issue them, hosts request them for their agents.

    operator ── IssueGrant ─────────────────────────────▶ grant (approver: the admin)
    host ────── RequestGrant{agent, to, ports, ttl, reason} ─▶ auto rule? ─▶ grant (auto)
                                                           └─ else pending ─▶ approve/deny

A grant is a row in the database and, while it lives, one more grant in the bundles of
the hosts it is for: signed and expiring like the policy's, so the kernel ends it at
``not_after`` whoever is or is not running. The controller starts an epoch without it
:data:`RENEW_BEFORE` seconds before that, so daemons remove it (and cut its connections)
on time too.

Everything a host sends is checked here: the agent must be one the host's bundle carries
(the policy's host selector matches it), the path well formed, the ttl within bounds (then
clamped to the policy's ``[jit] max_ttl``), the reason bounded (:data:`MAX_REASON`) and
stored escaped, and a host has at most :data:`MAX_PENDING` requests waiting.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping

from ztnet.controller import status
from ztnet.controller.jitstore import APPROVED, PENDING, GrantRequest, JitGrant
from ztnet.durations import MAX_DURATION
from ztnet.grants.model import AGENT_NAME_RE, IPNetwork, PortRange, Proto, format_grant_id
from ztnet.grants.payload import floor_ms
from ztnet.policy.document import Policy
from ztnet.policy.fields import parse_destination, parse_ports, parse_proto
from ztnet.text import escape

MAX_REASON = 512
MAX_NOTE = 512
MAX_PENDING = 32
# An epoch carries a JIT grant only if it has more than this left (else a daemon could
# receive it already expired and refuse the whole bundle) ...
MIN_REMAINING = 2.0
# ... and starts the epoch without it this long before it ends.
RENEW_BEFORE = 1.0
AUTO = "auto"


def check_agent(policy: Policy | None, agent: str) -> None:
    if not AGENT_NAME_RE.match(agent):
        raise status.invalid("agent", f"{agent[:80]!r} is not an agent name")
    if policy is None:
        raise status.precondition("no policy has been applied yet")
    if policy.agent(agent) is None:
        raise status.not_found(f"agent: {agent!r} is not in the current policy")


def check_host_runs(policy: Policy, agent: str, host: str, labels: Mapping[str, str]) -> None:
    """A host may ask only for agents its own bundle carries."""
    table = policy.agent(agent)
    if table is None or (table.hosts is not None and not table.hosts.matches(host, labels)):
        raise status.denied(f"agent: host {host} does not run agent {agent!r} (the policy "
                            "sends its grants to other hosts)")


def parse_path(to: str, ports: str, proto: str) -> tuple[IPNetwork, Proto, PortRange | None]:
    """The destination, protocol and ports of a grant, or INVALID_ARGUMENT naming the
    field. Hostnames are not accepted here (yet): an address or a prefix."""
    try:
        network = parse_destination(to)
    except ValueError as exc:
        raise status.invalid("to", f"{exc} (JIT grants take an IP address or prefix)") from None
    try:
        kind = parse_proto(proto or "tcp")
    except ValueError as exc:
        raise status.invalid("proto", str(exc)) from None
    try:
        port_range = parse_ports(ports or ("any" if kind is Proto.ICMP else ""))
    except ValueError as exc:
        raise status.invalid("ports", str(exc)) from None
    if kind is Proto.ICMP and port_range is not None:
        raise status.invalid("ports", 'icmp has no ports: leave them out or write "any"')
    return network, kind, port_range


def check_ttl(ttl: float) -> float:
    if math.isnan(ttl) or not 1.0 <= ttl <= MAX_DURATION:
        raise status.invalid("ttl_seconds", f"must be between 1 and {MAX_DURATION} seconds")
    return ttl


def clean_text(text: str, field: str, limit: int, *, required: bool) -> str:
    """Untrusted free text: refused when over ``limit`` characters (or missing when
    ``required``), stored escaped so no reader ever gets its control characters."""
    if len(text) > limit:
        raise status.invalid(field, f"{len(text)} characters, more than {limit}")
    if required and not text.strip():
        raise status.invalid(field, "must say why (a ticket, a task)")
    return escape(text)


def new_grant_id(taken: Callable[[int], bool]) -> int:
    while True:
        grant_id = secrets.randbits(64)
        if grant_id and not taken(grant_id):
            return grant_id


def make_grant(*, grant_id: int, agent: str, path: tuple[IPNetwork, Proto, PortRange | None],
               ttl: float, now: float, hosts: tuple[str, ...], reason: str, approver: str,
               requested_by: str, request_id: str = "") -> JitGrant:
    start = floor_ms(now)
    network, proto, ports = path
    return JitGrant(grant_id, agent, network, proto, ports, start,
                    round((start + ttl) * 1000) / 1000, hosts, reason, approver, requested_by,
                    request_id, now)


def new_request_id() -> str:
    return "r-" + secrets.token_hex(6)


def describe(grant: JitGrant) -> dict[str, object]:
    """Audit-trail fields of a grant."""
    return {"grant": format_grant_id(grant.grant_id), "agent": grant.agent,
            "to": str(grant.network), "proto": str(grant.proto),
            "ports": "any" if grant.ports is None else str(grant.ports),
            "not_after": grant.not_after, "ttl": round(grant.not_after - grant.not_before, 3),
            "hosts": ",".join(grant.hosts) or "selector", "reason": grant.reason,
            "approver": grant.approver, "requested_by": grant.requested_by,
            "request": grant.request_id}


def describe_request(request: GrantRequest) -> dict[str, object]:
    return {"request": request.id, "host": request.host, "agent": request.agent,
            "to": str(request.network), "proto": str(request.proto),
            "ports": "any" if request.ports is None else str(request.ports),
            "ttl": request.ttl, "reason": request.reason}


__all__ = ["APPROVED", "AUTO", "MAX_PENDING", "MAX_REASON", "PENDING", "RENEW_BEFORE",
           "check_agent", "check_host_runs", "check_ttl", "clean_text", "describe",
           "describe_request", "make_grant", "new_grant_id", "new_request_id", "parse_path"]
