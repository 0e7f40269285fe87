"""`ztnet lab up|down|status`: a multi-host lab on this machine (docs/lab.md).

The lab modules (pyroute2, scapy) are imported inside the functions that use them, so
only the lab commands load them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from ztnet.cli.args import SubParsers, add_command, add_group, checked
from ztnet.text import format_table

if TYPE_CHECKING:
    from ztnet.lab.cluster import HostStatus, Lab


def register(sub: SubParsers) -> None:
    lab = add_command(sub, "lab", "A multi-host lab on this machine (root): network "
                      "namespaces on a bridge with a controller, agent hosts each running an "
                      "enrolled daemon, an internal API, an exfiltration sink and a DNS "
                      "resolver.", "sudo ztnet lab up --hosts 2")
    group = add_group(lab, "lab_command")

    p = add_command(group, "up", "Build the lab and start everything in it; returns once "
                    "every daemon enforces the lab policy. Idempotent.",
                    "sudo ztnet lab up --hosts 3", handle_up)
    _name_option(p)
    p.add_argument("--hosts", type=checked(host_count), default=2, metavar="N",
                   help="number of agent hosts (1-8, default 2)")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="controller replicas (1-4, default 1; more need --database postgres); "
                   "daemons follow them all (--controller A,B,…)")
    p.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite",
                   help="the controller's store: its SQLite file (default), or a PostgreSQL "
                   "server started in the controller's namespace")

    p = add_command(group, "down", "Remove everything the lab owns (processes, namespaces, "
                    "daemon instances, run directory), even after a crashed `lab up`.",
                    "sudo ztnet lab down", handle_down)
    _name_option(p)

    p = add_command(group, "status", "Show the lab's hosts, addresses, processes and "
                    "enforcement; exits 1 unless everything is up.", "sudo ztnet lab status",
                    handle_status)
    _name_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable")


def _name_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="ztlab", type=checked(lab_name),
                        help="lab name: labs with different names coexist (default ztlab)")


def lab_name(text: str) -> str:
    """A valid lab name (ValueError otherwise)."""
    from ztnet.lab.topology import Topology

    return Topology(text).name


def host_count(text: str) -> int:
    """A valid number of agent hosts (ValueError otherwise)."""
    from ztnet.lab.topology import Topology

    return Topology(agent_hosts=int(text)).agent_hosts


# --- handlers: the parsed command line -> the functions below ------------------------


def handle_up(args: argparse.Namespace) -> int:
    return lab_up(args.name, args.hosts, replicas=args.replicas, database=args.database)


def handle_down(args: argparse.Namespace) -> int:
    return lab_down(args.name)


def handle_status(args: argparse.Namespace) -> int:
    return lab_status(args.name, as_json=args.json)


# --- what the commands print -----------------------------------------------------------


def lab_up(name: str, hosts: int, out: TextIO | None = None, *, replicas: int = 1,
           database: str = "sqlite") -> int:
    from ztnet.lab.cluster import Lab
    from ztnet.lab.topology import Topology

    out = out or sys.stdout

    def progress(message: str) -> None:
        out.write(f"lab: {message}\n")
        out.flush()

    start = time.monotonic()
    lab = Lab(Topology(name, hosts), progress=progress, replicas=replicas, database=database)
    if not lab.up():
        out.write(f"lab {name} is already up\n")
        return 0
    out.write(f"lab {name} up in {time.monotonic() - start:.1f}s\n\n")
    topo = lab.topology
    out.write(topo.table() + "\n")
    host = topo.agent_hosts_list[0]
    api = topo.host("api")
    out.write(
        "\nan agent on host-a (confined by host-a's daemon; the api echoes, exfil is denied):\n"
        f"  echo hello | nsenter --net=/run/netns/{topo.netns(host)} ztnet run --instance "
        f"{topo.instance_name(host)} --agent {host.agent} --dynamic-user -- "
        f"curl -sS -m 1 telnet://{api.ipv4}:443\n"
        "its flows, live:\n"
        f"  ztnet observe --state {lab.host_state(host)} --follow\n"
        "the operator (from the controller's namespace):\n"
        f"  nsenter --net=/run/netns/{topo.netns(topo.controller)} ztnet hosts --controller "
        f"{topo.controller_address} --credentials {lab.admin_dir}\n"
        f"status / remove:  ztnet lab status{_flag(name)}  /  ztnet lab down{_flag(name)}\n")
    return 0


def lab_down(name: str, out: TextIO | None = None) -> int:
    from ztnet.lab.cluster import Lab
    from ztnet.lab.topology import Topology

    out = out or sys.stdout
    removed = Lab(Topology(name)).down()
    if removed:
        out.write(f"lab {name} removed: {len(removed)} items\n")
        for item in removed:
            out.write(f"  {item}\n")
    else:
        out.write(f"lab {name}: nothing to remove\n")
    return 0


def lab_status(name: str, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """Exit 0 when the lab is up and every agent host enforces, 1 otherwise."""
    from ztnet.lab.cluster import Lab
    from ztnet.lab.topology import Topology

    out = out or sys.stdout
    state = Lab(Topology(name)).read_state() or {}
    lab = Lab(Topology(name, int(state.get("agent_hosts", 2)) or 2),
              replicas=int(state.get("replicas", 1)), database=str(state.get("database",
                                                                             "sqlite")))
    rows = lab.status()
    healthy = bool(state.get("complete")) and all(
        r.netns_up and all(alive for _, _, alive in r.processes) and r.enforcing is not False
        for r in rows)
    if as_json:
        out.write(json.dumps(_status_json(name, lab, rows, healthy), indent=1) + "\n")
        return 0 if healthy else 1
    if not state and not any(r.netns_up for r in rows):
        out.write(f"lab {name} is down\n")
        return 1
    table = []
    for r in rows:
        processes = ", ".join(f"{n} {p} {'up' if a else 'DEAD'}" for n, p, a in r.processes)
        if r.enforcing is None:
            enforcement = "-"
        elif r.enforcing:
            grants = ", ".join(f"{agent} {count}" for agent, count in sorted(
                r.live_grants.items())) or "none"
            enforcement = f"enforcing (live grants: {grants})"
        else:
            enforcement = "NOT ENFORCING"
        table.append((r.host.name, "up" if r.netns_up else "MISSING",
                      ",".join((r.host.ipv4, *r.host.extra_ipv4)), r.host.ipv6,
                      processes or "-", enforcement))
    out.write(format_table(("HOST", "NETNS", "IPV4", "IPV6", "PROCESSES", "ENFORCEMENT"),
                           table) + "\n")
    hosts = lab.operator("hosts")
    if hosts.returncode == 0:
        out.write("\ncontroller (ztnet hosts):\n" + hosts.stdout)
    out.write(f"\nlab {name} is {'up' if healthy else 'DEGRADED (ztnet lab up repairs it)'}; "
              f"state in {lab.run_dir}\n")
    return 0 if healthy else 1


def _status_json(name: str, lab: Lab, rows: list[HostStatus],
                 healthy: bool) -> dict[str, Any]:
    topo = lab.topology
    return {
        "name": name, "up": healthy, "run_dir": str(lab.run_dir),
        "controller": topo.controller_address,
        "hosts": [{"host": r.host.name, "role": r.host.role.value, "agent": r.host.agent,
                   "netns": topo.netns(r.host), "netns_up": r.netns_up,
                   "ipv4": [r.host.ipv4, *r.host.extra_ipv4], "ipv6": [r.host.ipv6],
                   "processes": [{"name": n, "pid": p, "alive": a} for n, p, a in r.processes],
                   "enforcing": r.enforcing, "live_grants": r.live_grants}
                  for r in rows]}


def _flag(name: str) -> str:
    from ztnet.lab.topology import DEFAULT_NAME

    return "" if name == DEFAULT_NAME else f" --name {name}"
