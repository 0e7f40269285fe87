"""What `ztnet lab up|down|status` print (cli.py only parses)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from ztnet.lab.cluster import Lab
from ztnet.lab.topology import DEFAULT_NAME, Topology


def _lab(name: str, hosts: int, out: TextIO) -> Lab:
    def progress(message: str) -> None:
        out.write(f"lab: {message}\n")
        out.flush()

    return Lab(Topology(name, hosts), progress=progress)


def _flag(name: str) -> str:
    return "" if name == DEFAULT_NAME else f" --name {name}"


def lab_up(name: str, hosts: int, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    start = time.monotonic()
    lab = _lab(name, hosts, out)
    if not lab.up():
        out.write(f"lab {name} is already up\n")
        return 0
    out.write(f"lab {name} up in {time.monotonic() - start:.1f}s\n\n")
    print_topology(lab, out)
    topo = lab.topology
    host = topo.agent_hosts_list[0]
    api = topo.host("api")
    out.write(
        "\nan agent on host-a (confined by host-a's daemon; the api echoes, exfil is denied):\n"
        f"  echo hello | nsenter --net=/run/netns/{topo.netns(host)} ztnet run --instance "
        f"{topo.instance_name(host)} --agent {host.agent} --user nobody -- "
        f"curl -sS -m 1 telnet://{api.ipv4}:443\n"
        "its flows, live:\n"
        f"  ztnet observe --state {lab.host_state(host)} --follow\n"
        "the operator (from the controller's namespace):\n"
        f"  nsenter --net=/run/netns/{topo.netns(topo.controller)} ztnet hosts --controller "
        f"{topo.controller_address} --credentials {lab.admin_dir}\n"
        f"status / remove:  ztnet lab status{_flag(name)}  /  ztnet lab down{_flag(name)}\n")
    return 0


def print_topology(lab: Lab, out: TextIO) -> None:
    topo = lab.topology
    rows = [("HOST", "NAMESPACE", "IPV4", "IPV6", "ROLE", "RUNS")]
    for host in topo.hosts:
        ipv4 = ",".join((host.ipv4, *host.extra_ipv4))
        role = f"{host.role.value} ({host.agent})" if host.agent else host.role.value
        rows.append((host.name, topo.netns(host), ipv4, host.ipv6, role,
                     "; ".join(host.services)))
    _table(rows, out)


def lab_down(name: str, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    lab = Lab(Topology(name))
    removed = lab.down()
    if removed:
        out.write(f"lab {name} removed: {len(removed)} items\n")
        for item in removed:
            out.write(f"  {item}\n")
    else:
        out.write(f"lab {name}: nothing to remove\n")
    return 0


def lab_status(name: str, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """Exit 0 when the lab is up and every agent host enforces, 1 otherwise."""
    out = out or sys.stdout
    state = Lab(Topology(name)).read_state() or {}
    lab = Lab(Topology(name, int(state.get("agent_hosts", 2)) or 2))
    rows = lab.status()
    healthy = bool(state.get("complete")) and all(
        r.netns_up and all(alive for _, _, alive in r.processes) and r.enforcing is not False
        for r in rows)
    if as_json:
        out.write(json.dumps({
            "name": name, "up": healthy, "run_dir": str(lab.run_dir),
            "controller": lab.topology.controller_address,
            "hosts": [{"host": r.host.name, "role": r.host.role.value, "agent": r.host.agent,
                       "netns": lab.topology.netns(r.host), "netns_up": r.netns_up,
                       "ipv4": [r.host.ipv4, *r.host.extra_ipv4], "ipv6": [r.host.ipv6],
                       "processes": [{"name": n, "pid": p, "alive": a}
                                     for n, p, a in r.processes],
                       "enforcing": r.enforcing, "live_grants": r.live_grants}
                      for r in rows]}, indent=1) + "\n")
        return 0 if healthy else 1
    if not state and not any(r.netns_up for r in rows):
        out.write(f"lab {name} is down\n")
        return 1
    table = [("HOST", "NETNS", "IPV4", "IPV6", "PROCESSES", "ENFORCEMENT")]
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
    _table(table, out)
    hosts = lab.operator("hosts")
    if hosts.returncode == 0:
        out.write("\ncontroller (ztnet hosts):\n" + hosts.stdout)
    out.write(f"\nlab {name} is {'up' if healthy else 'DEGRADED (ztnet lab up repairs it)'}; "
              f"state in {lab.run_dir}\n")
    return 0 if healthy else 1


def _table(rows: Sequence[tuple[str, ...]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
