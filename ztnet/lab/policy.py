"""The lab's embedded default policy: two agents, two different sets of paths.

Policies name agents, not hosts (every host gets every agent's grants), so the two agent
hosts differ by the agent each runs: host-a runs ``research-bot``, host-b runs ``ops-bot``
(topology.agent_for). Everything not listed is denied: the exfil sink, the metadata service,
the controller, the other agent host, loopback.
"""

from __future__ import annotations

from ztnet.lab.topology import (
    API_ALT_PORT,
    API_PORT,
    CDN_NAME,
    DNS_PORT,
    TRUST_DOMAIN,
    UPLOAD_PORT,
    Role,
    Topology,
)

RESEARCH_BOT, OPS_BOT = "research-bot", "ops-bot"
UPLOAD_BUDGET = "1M"  # research-bot's byte budget per upload connection (docs/policy.md)


def _rule(agent: str, to: str, ports: str, proto: str, comment: str) -> str:
    return (f'[[agents.{agent}.allow]]\nto = "{to}"\nports = "{ports}"\nproto = "{proto}"\n'
            f'comment = "{comment}"\n')


def lab_policy(topology: Topology) -> str:
    """The policy `ztnet lab up` starts the controller with, and `ztnet demo` applies."""
    api = topology.by_role(Role.API)[0]
    dns = topology.by_role(Role.DNS)[0]
    return "\n".join([
        "# ztnet lab policy (embedded in ztnet/lab/policy.py; docs/lab.md)",
        f'trust_domain = "{TRUST_DOMAIN}"',
        "",
        f"# {RESEARCH_BOT} (host-a): the internal API over HTTPS, and name resolution",
        f"[agents.{RESEARCH_BOT}]",
        _rule(RESEARCH_BOT, api.ipv4, str(API_PORT), "tcp", f"{api.fqdn}:{API_PORT}"),
        _rule(RESEARCH_BOT, dns.ipv4, str(DNS_PORT), "udp", "the lab resolver"),
        _rule(RESEARCH_BOT, api.ipv4, str(UPLOAD_PORT), "tcp",
              f"report uploads, {UPLOAD_BUDGET} per connection")
        + f'max_bytes_out = "{UPLOAD_BUDGET}"\n',
        _rule(RESEARCH_BOT, CDN_NAME, str(API_PORT), "tcp",
              "a CDN by name: whatever addresses ztnet's resolver hands out"),
        f"# {OPS_BOT} (host-b): the API's admin port over IPv4 and IPv6, ping it, resolve",
        f"[agents.{OPS_BOT}]",
        _rule(OPS_BOT, api.ipv4, str(API_ALT_PORT), "tcp", f"{api.fqdn}:{API_ALT_PORT}"),
        _rule(OPS_BOT, api.ipv6, str(API_ALT_PORT), "tcp", f"{api.fqdn}:{API_ALT_PORT} (IPv6)"),
        _rule(OPS_BOT, api.ipv4, "any", "icmp", "ping the API host"),
        _rule(OPS_BOT, dns.ipv4, str(DNS_PORT), "udp", "the lab resolver"),
    ])
