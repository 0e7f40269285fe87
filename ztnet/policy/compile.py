"""Policy → grants: one grant per distinct allow rule, with a stable id.

The grant id is what the kernel reports with every decision a grant made, so
it must survive recompiles: it is derived from what the rule allows (trust
domain, agent, destination, ports, protocol), never from its position in the
file, its comment or its lifetime. Reordering a file, editing a comment or
changing a ttl keeps every id; changing what a rule allows gives a new one.
"""

from __future__ import annotations

import hashlib

from ztnet.errors import PolicyError
from ztnet.grants.model import Grant
from ztnet.grants.names import HostPattern, NameGrant
from ztnet.policy.document import MAX_TTL, AllowRule, Policy

# Domain separation: no other hash in ztnet can collide with a grant id.
_GRANT_ID_CONTEXT = b"ztnet grant id v1\x00"


def grant_id_for(trust_domain: str, agent: str, rule: AllowRule) -> int:
    """SHA-256 over the rule's canonical content, first 8 bytes, big-endian,
    never zero (zero means "no grant" to the kernel)."""
    # NUL cannot occur in any field (DNS names, CIDRs, port and protocol
    # words), so joining on it is unambiguous.
    fields = (trust_domain, agent, *rule.canonical())
    digest = hashlib.sha256(_GRANT_ID_CONTEXT + "\x00".join(fields).encode()).digest()
    while int.from_bytes(digest[:8], "big") == 0:  # 2**-64: rehash, stay deterministic
        digest = hashlib.sha256(digest).digest()
    return int.from_bytes(digest[:8], "big")


def compile_grants(policy: Policy, *, now: float, default_ttl: float = 300.0) -> list[Grant]:
    """One grant per distinct address allow rule, valid from ``now`` for the rule's
    ttl (or ``default_ttl`` seconds). Identical rules of one agent become one
    grant with the longest ttl. Sorted by agent, destination, protocol, ports.
    Hostname rules are compile_name_grants'."""
    return compile_all(policy, now=now, default_ttl=default_ttl)[0]


def compile_name_grants(policy: Policy, *, now: float,
                        default_ttl: float = 300.0) -> list[NameGrant]:
    """The hostname rules' grants, as compile_grants makes the address rules'."""
    return compile_all(policy, now=now, default_ttl=default_ttl)[1]


def compile_all(policy: Policy, *, now: float,
                default_ttl: float = 300.0) -> tuple[list[Grant], list[NameGrant]]:
    """Address grants and hostname grants of ``policy``; ids are unique across both."""
    if not 0 < default_ttl <= MAX_TTL:
        raise PolicyError(f"policy: default ttl must be between 1s and 365d, got {default_ttl}s")
    grants: dict[int, Grant] = {}
    names: dict[int, NameGrant] = {}
    content: dict[int, tuple[str, ...]] = {}
    for agent in policy.agents:
        for rule in agent.allow:
            grant_id = grant_id_for(policy.trust_domain, agent.name, rule)
            key = (agent.name, *rule.canonical())
            if content.setdefault(grant_id, key) != key:
                # Two different rules with one id would make kernel reports
                # ambiguous; at 2**-64 per pair this is a bug, not bad luck.
                raise PolicyError(
                    f"policy: grant id collision between {content[grant_id]} and {key}"
                )
            ttl = float(rule.ttl) if rule.ttl is not None else default_ttl
            if isinstance(rule.to, HostPattern):
                name = NameGrant(grant_id=grant_id, agent=agent.name, proto=rule.proto,
                                 pattern=rule.to, ports=rule.ports, not_before=now,
                                 not_after=now + ttl, allow_private=rule.allow_private)
                earlier = names.get(grant_id)
                if earlier is None or name.not_after > earlier.not_after:
                    names[grant_id] = name
                continue
            grant = Grant(
                grant_id=grant_id,
                agent=agent.name,
                proto=rule.proto,
                network=rule.to,
                ports=rule.ports,
                not_before=now,
                not_after=now + ttl,
                budget=rule.budget,
            )
            previous = grants.get(grant_id)
            if previous is None or grant.not_after > previous.not_after:
                grants[grant_id] = grant
    ordered_names = sorted(names.values(), key=lambda g: (g.agent, g.pattern.text, g.grant_id))
    return sorted(grants.values(), key=grant_sort_key), ordered_names


def grant_sort_key(grant: Grant) -> tuple[str, int, int, int, int, int, int, int]:
    """Human order: agent, then v4 before v6, address, prefix, protocol,
    ports ("any" first); the id breaks any remaining tie."""
    network = grant.network
    first, last = (grant.ports.first, grant.ports.last) if grant.ports else (0, 0)
    return (
        grant.agent,
        network.version,
        int(network.network_address),
        network.prefixlen,
        int(grant.proto),
        first,
        last,
        grant.grant_id,
    )
