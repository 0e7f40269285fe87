"""The lab's topology and policy (ztnet/lab), as the VMs' provisioning needs them.

``python labvm.py env`` prints shell assignments (``eval "$(python labvm.py env)"`` in
provision.sh); ``python labvm.py policy`` prints the lab's policy. Run with the project's
virtualenv inside a VM, so the VMs take their roles, addresses, ports, DNS records and policy
from the same code as ``ztnet lab`` and ``make demo``.
"""

from __future__ import annotations

import shlex
import sys

from ztnet.lab.policy import lab_policy
from ztnet.lab.topology import (
    API_ALT_PORT,
    API_PORT,
    CONTROL_PORT,
    CONTROLLER_PORT,
    DNS_PORT,
    ENROLL_PORT,
    EXFIL_PORT,
    METADATA_PORT,
    PEER_PORT,
    TRUST_DOMAIN,
    Role,
    Topology,
)


def lab_env(topology: Topology) -> dict[str, str]:
    api, exfil, dns = (topology.by_role(role)[0] for role in (Role.API, Role.EXFIL, Role.DNS))
    env = {
        "TRUST_DOMAIN": TRUST_DOMAIN,
        "CONTROLLER_V4": topology.controller.ipv4,
        "CONTROLLER_V6": topology.controller.ipv6,
        "CONTROLLER_PORT": str(CONTROLLER_PORT),
        "ENROLL_PORT": str(ENROLL_PORT),
        "AGENT_HOSTS": " ".join(h.name for h in topology.agent_hosts_list),
        "API_V4": api.ipv4,
        "API_V6": api.ipv6,
        "API_PORTS": f"{API_PORT} {API_ALT_PORT}",
        "EXFIL_V4": exfil.ipv4,
        "EXFIL_V6": exfil.ipv6,
        "EXFIL_TCP_PORTS": f"{EXFIL_PORT} {METADATA_PORT}",
        "EXFIL_UDP_PORT": str(EXFIL_PORT),
        "DNS_V4": dns.ipv4,
        "DNS_V6": dns.ipv6,
        "DNS_PORT": str(DNS_PORT),
        "DNS_RECORDS": " ".join(f"{name}={address}" for name, addresses in
                                topology.zone().items() for address in addresses),
        "PEER_PORT": str(PEER_PORT),
        "CONTROL_PORT": str(CONTROL_PORT),  # the positive controls' port: nothing listens there
    }
    for host in topology.agent_hosts_list:
        key = host.name.upper().replace("-", "_")
        env[f"{key}_V4"], env[f"{key}_V6"] = host.ipv4, host.ipv6
        env[f"{key}_AGENT"] = host.agent
    return env


def main(argv: list[str]) -> int:
    topology = Topology()
    if argv == ["env"]:
        for key, value in lab_env(topology).items():
            print(f"{key}={shlex.quote(value)}")
    elif argv == ["policy"]:
        print(lab_policy(topology))
    else:
        print("usage: labvm.py env|policy", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
