"""`ztnet lab up|down|status`: the whole system — controller, enrolled daemons, services — on
the topology of :mod:`ztnet.lab.topology`, as real processes in network namespaces.

``up`` builds the network, initialises the controller's state, starts ``ztnet controller
serve`` in the controller's namespace with the lab policy, enrolls every agent host with a
one-time token over the lab network (``ztnet controller token create --json``, then ``ztnet
enroll`` inside the host's namespace) and starts its ``ztnet daemon --instance``, then the
services. Every step awaits readiness: the controller's ready file (written once its health
service says SERVING), a daemon's ``bundle applied`` log event, a service's ``READY`` line.

Everything the lab owns can be found by name alone: namespaces ``<lab>-*``, daemon instances
``host-a``… (``<lab>-host-a``… for labs not named ``ztlab``) and the run directory
``/run/ztnet-lab/<lab>/`` (controller and host state, logs, ``lab.json``). So ``down`` removes
it all even when ``up`` was killed half-way: it stops the recorded processes, removes the
namespaces (killing whatever still runs in them), tears the instances down (agents killed
first, programs detached, pins removed) and deletes the run directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztnet.errors import LabError
from ztnet.fsutil import replace_atomic
from ztnet.identity.launch import DYNAMIC_USER, run_user_flags
from ztnet.instance import BPFFS, FLOWS_FILE, Instance, find_cgroup2_mount
from ztnet.lab import procs
from ztnet.lab import replicas as replicas_mod
from ztnet.lab.netns import list_netns, nsenter_argv, poll_until
from ztnet.lab.policy import lab_policy
from ztnet.lab.procs import ProcRecord
from ztnet.lab.topology import (
    API_ALT_PORT,
    API_PORT,
    DNS_PORT,
    EXFIL_PORT,
    METADATA_PORT,
    PEER_PORT,
    TRUST_DOMAIN,
    UPLOAD_PORT,
    LabHost,
    Role,
    Topology,
    build_network,
    lab_namespaces,
    remove_network,
)
from ztnet.observe.records import FlowRecord, from_json

STATE_FILE = "lab.json"
READY_TIMEOUT = 60.0  # generous: a daemon compiles its BPF programs with clang at start


@dataclass(frozen=True, slots=True)
class HostStatus:
    host: LabHost
    netns_up: bool
    processes: tuple[tuple[str, int, bool], ...]  # (name, pid, alive)
    enforcing: bool | None  # agent hosts only
    live_grants: dict[str, int]


class Lab:
    """One lab, by name: everything it owns is found from its Topology (see the module doc).
    ``progress`` receives one line per stage of ``up``. ``replicas`` controllers serve one
    ``database`` ("sqlite": one controller; "postgres": any number, ztnet.lab.replicas)."""

    def __init__(self, topology: Topology, *, progress: Callable[[str], None] | None = None,
                 replicas: int = 1, database: str = "sqlite") -> None:
        if database not in replicas_mod.DATABASES:
            raise LabError(f"lab: database {database!r} is not one of "
                           f"{', '.join(replicas_mod.DATABASES)}")
        if not 1 <= replicas <= replicas_mod.MAX_REPLICAS or (replicas > 1 and
                                                              database != "postgres"):
            raise LabError(f"lab: --replicas {replicas}: 1 to {replicas_mod.MAX_REPLICAS}, "
                           "and more than one needs --database postgres")
        self.topology = topology
        self.replicas = replicas
        self.database = database
        self.progress = progress or (lambda message: None)
        self.run_dir = topology.run_dir
        self._lock = threading.Lock()
        self._records: list[ProcRecord] = []

    # --- paths -----------------------------------------------------------------------------

    @property
    def controller_state(self) -> Path:
        return self.run_dir / "controller"

    @property
    def admin_dir(self) -> Path:
        return self.run_dir / "admin"

    @property
    def policy_file(self) -> Path:
        return self.run_dir / "policy.toml"

    def host_state(self, host: LabHost | str) -> Path:
        return self.run_dir / (host if isinstance(host, str) else host.name)

    def flows_path(self, host: LabHost | str) -> Path:
        return self.host_state(host) / FLOWS_FILE

    def instance(self, host: LabHost | str) -> Instance:
        return Instance.resolve(self.topology.instance_name(host))

    def _log(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name.replace(' ', '-')}.log"

    def daemon_log(self, host: LabHost | str) -> str:
        """What ``host``'s daemon has logged so far (JSON lines)."""
        return self.process_log(f"daemon {host if isinstance(host, str) else host.name}")

    def process_log(self, name: str) -> str:
        """What the lab's process ``name`` (``upstream``, ``api``…) has written so far."""
        try:
            return self._log(name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- state file ------------------------------------------------------------------------

    def _write_state(self, complete: bool) -> None:
        state = {"name": self.topology.name, "agent_hosts": self.topology.agent_hosts,
                 "replicas": self.replicas, "database": self.database,
                 "complete": complete, "processes": [r.to_json() for r in self._records]}
        replace_atomic(self.run_dir / STATE_FILE, (json.dumps(state, indent=1) + "\n").encode(),
                       0o644)

    def read_state(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads((self.run_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        return state

    def records(self) -> list[ProcRecord]:
        state = self.read_state() or {}
        return [ProcRecord.from_json(obj) for obj in state.get("processes", [])]

    def _spawn(self, name: str, host: LabHost, argv: Sequence[str]) -> ProcRecord:
        record = procs.spawn(name, self.topology.netns(host), argv, self._log(name))
        with self._lock:
            self._records.append(record)
            self._write_state(complete=False)
        return record

    # --- up --------------------------------------------------------------------------------

    def is_up(self) -> bool:
        state = self.read_state()
        if not state or not state.get("complete"):
            return False
        if (state.get("agent_hosts"), state.get("replicas", 1), state.get("database", "sqlite")) \
                != (self.topology.agent_hosts, self.replicas, self.database):
            return False
        names = set(lab_namespaces(self.topology.name))
        return set(self.topology.namespaces()) <= names and all(map(procs.alive, self.records()))

    def up(self) -> bool:
        """Bring the lab up; False if it already was (same topology, everything alive)."""
        require_root()
        if self.is_up():
            return False
        if self.leftovers():
            self.progress("removing the leftovers of an earlier lab")
            self.down()
        self.run_dir.mkdir(parents=True, mode=0o700)
        (self.run_dir / "logs").mkdir()
        self._records = []
        self._write_state(complete=False)
        try:
            self._up()
        except BaseException as exc:
            self.progress("lab up failed; removing what was built")
            try:
                self.down()
            except Exception as cleanup:  # report it, but the first failure is the news
                exc.add_note(f"lab: cleaning up after the failure failed too: {cleanup}")
            raise
        self._write_state(complete=True)
        return True

    def _up(self) -> None:
        topo = self.topology
        self.progress(f"network: {len(topo.namespaces())} namespaces on bridge "
                      f"{topo.switch_netns}/br0")
        build_network(topo)
        for host in topo.agent_hosts_list:
            # unprivileged ICMP (ping) sockets, so agents running as nobody can ping
            procs.run_ok(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"],
                         "sysctl", netns=topo.netns(host))
        ctl = topo.controller
        database = self._start_database()
        # with PostgreSQL, commands that open the store run where the database is
        where = {"netns": topo.netns(ctl)} if database else {}
        procs.run_ok(procs.ztnet_argv(
            "controller", "init", "--state", str(self.controller_state), "--trust-domain",
            TRUST_DOMAIN, "--san", ctl.ipv4, "--san", ctl.ipv6, "--san", ctl.fqdn,
            *self._database_args()), "controller init", **where)
        procs.run_ok(procs.ztnet_argv(
            "controller", "admin-cert", "--state", str(self.controller_state),
            "--out", str(self.admin_dir), "--name", "lab-operator", *self._database_args()),
            "controller admin-cert", **where)
        self.policy_file.write_text(lab_policy(topo))
        controllers = []
        for replica in range(self.replicas):
            listen, enroll = replicas_mod.listen_addresses(topo, replica)
            ready_file = self.run_dir / f"controller{'-' + str(replica) if replica else ''}" \
                ".ready.json"
            state = replicas_mod.replica_state(self.controller_state, replica)
            name = "controller" if replica == 0 else f"controller {replica}"
            controllers.append((ready_file, self._spawn(name, ctl, procs.ztnet_argv(
                "controller", "serve", "--state", str(state), "--listen", listen,
                "--enroll-listen", enroll, "--policy", str(self.policy_file),
                "--ready-file", str(ready_file), "--log-format", "json",
                *self._database_args()))))
        services = self._start_services()
        self.progress(f"controller: {topo.controller_address} (mutual TLS), enrollment "
                      f"{topo.enroll_address}" + (
                          f"; {self.replicas} replicas over PostgreSQL "
                          f"({replicas_mod.controller_list(topo, self.replicas)})"
                          if self.replicas > 1 else ""))

        def serving() -> bool | None:
            for _, controller in controllers:
                if not procs.alive(controller):
                    raise LabError(f"lab: the controller exited:\n"
                                   f"{procs.log_text(controller)}")
            return True if all(ready.exists() for ready, _ in controllers) else None

        poll_until(serving, READY_TIMEOUT, "the controller to serve")
        with ThreadPoolExecutor(max_workers=len(topo.agent_hosts_list)) as pool:
            for future in [pool.submit(self._start_host, h) for h in topo.agent_hosts_list]:
                future.result()
        for record in services:
            procs.wait_log(record, lambda line: line == "READY", READY_TIMEOUT, "READY")

    def _database_args(self) -> list[str]:
        return ["--database", replicas_mod.database_url()] if self.database == "postgres" \
            else []

    def _start_database(self) -> bool:
        """Start PostgreSQL (``--database postgres``) in the controller's namespace."""
        if self.database != "postgres":
            return False
        server = replicas_mod.prepare_database(self.run_dir)
        ctl = self.topology.controller
        record = self._spawn("postgres", ctl, server.foreground_argv())
        replicas_mod.wait_database(server, self.topology.netns(ctl),
                                   lambda: procs.alive(record), READY_TIMEOUT)
        self.progress(f"database: PostgreSQL {replicas_mod.database_url()} in "
                      f"{self.topology.netns(ctl)}")
        return True

    def _start_services(self) -> list[ProcRecord]:
        topo = self.topology
        api = topo.by_role(Role.API)[0]
        exfil = topo.by_role(Role.EXFIL)[0]
        dns = topo.by_role(Role.DNS)[0]
        inet = topo.by_role(Role.INTERNET)[0]
        zone = self.run_dir / "internet-zone.json"
        zone.write_text(json.dumps(topo.internet_zone(), indent=1) + "\n")
        echo = [sys.executable, "-m", "ztnet.lab.servers"]
        started = [
            self._spawn("api", api, [*echo, "--bind", api.ipv4, api.ipv6,
                                     "--tcp", str(API_PORT), str(API_ALT_PORT),
                                     str(UPLOAD_PORT)]),
            # every address, so it also answers as the metadata service (169.254.169.254)
            self._spawn("exfil", exfil, [*echo, "--bind", "0.0.0.0", "::", "--tcp",
                                         str(EXFIL_PORT), str(METADATA_PORT),
                                         "--udp", str(EXFIL_PORT)]),
            self._spawn("dns", dns, [sys.executable, "-m", "ztnet.lab.dns", "--bind",
                                     dns.ipv4, dns.ipv6, "--port", str(DNS_PORT), "--record",
                                     *(f"{name}={address}" for name, addresses in
                                       topo.zone().items() for address in addresses)]),
            # "the internet": the daemons' upstream resolver, and the servers its names lead to
            self._spawn("upstream", inet, [sys.executable, "-m", "ztnet.lab.upstream", "--bind",
                                           inet.ipv4, "--port", str(DNS_PORT), "--zone",
                                           str(zone)]),
            self._spawn("inet", inet, [*echo, "--bind", *inet.extra_ipv4, "--tcp",
                                       str(API_PORT)]),
        ]
        for host in topo.agent_hosts_list:
            started.append(self._spawn(f"peer {host.name}", host, [
                *echo, "--bind", host.ipv4, host.ipv6, "--tcp", str(PEER_PORT)]))
        return started

    def _start_host(self, host: LabHost) -> None:
        """Enroll ``host`` as an operator would, then run its daemon until it enforces."""
        topo = self.topology
        where = {"netns": topo.netns(topo.controller)} if self.database == "postgres" else {}
        token = json.loads(procs.run_ok(procs.ztnet_argv(
            "controller", "token", "create", "--state", str(self.controller_state),
            "--host", host.name, "--json", *self._database_args()), "token create", **where))
        state = self.host_state(host)
        procs.run_ok(procs.ztnet_argv(
            "enroll", "--controller", topo.enroll_address, f"--token={token['token']}",
            "--ca-fingerprint", token["ca_fingerprint"], "--state", str(state),
            "--host", host.name), f"enroll {host.name}", netns=topo.netns(host))
        instance = topo.instance_name(host)
        daemon = self._spawn(f"daemon {host.name}", host, procs.ztnet_argv(
            "daemon", "--instance", instance, "--controller",
            replicas_mod.controller_list(topo, self.replicas),
            "--state", str(state), "--log-format", "json", "--backoff-max", "2",
            # hostname grants: ztnet's resolver, asking the inet host's upstream
            "--dns-upstream", topo.by_role(Role.INTERNET)[0].ipv4))
        procs.wait_log(daemon, procs.json_event("bundle applied"), READY_TIMEOUT,
                       "its first bundle")
        self.progress(f"{host.name}: enrolled, daemon (instance {instance}) enforcing")

    # --- down ------------------------------------------------------------------------------

    def instance_names(self) -> set[str]:
        """Instances this lab may have created: from its state file, and by name on disk (a
        lab killed before it wrote its state still left them findable)."""
        names = {self.topology.instance_name(h) for h in self.topology.agent_hosts_list}
        recorded = int((self.read_state() or {}).get("agent_hosts", 0))
        if recorded:
            earlier = Topology(self.topology.name, recorded)
            names |= {earlier.instance_name(h) for h in earlier.agent_hosts_list}
        pattern = re.compile(rf"^ztnet-({re.escape(self.topology.instance_name('host-'))}"
                             r"[a-z])$")
        with contextlib.suppress(Exception):
            for directory in (find_cgroup2_mount(), BPFFS, Path("/run")):
                for path in directory.glob("ztnet-*"):
                    match = pattern.match(path.name)
                    if match:
                        names.add(match.group(1))
        return names

    def leftovers(self) -> list[str]:
        found = [f"namespace {ns}" for ns in lab_namespaces(self.topology.name)]
        if self.run_dir.exists():
            found.append(str(self.run_dir))
        for name in sorted(self.instance_names()):
            instance = Instance.resolve(name)
            if any(p.exists() for p in (instance.cgroup_root, instance.bpffs_dir)):
                found.append(f"instance {name}")
        return found

    def down(self) -> list[str]:
        """Remove everything the lab owns, whatever state it is in. Returns what was removed."""
        from ztnet.datapath.datapath import teardown

        require_root()
        removed = []
        records = self.records() or self._records
        procs.stop(records)
        removed += [f"process {r.name} ({r.pid})" for r in records]
        removed += [f"namespace {ns}" for ns in remove_network(self.topology.name)]
        for name in sorted(self.instance_names()):
            instance = Instance.resolve(name)
            if any(p.exists() for p in (instance.cgroup_root, instance.bpffs_dir,
                                        instance.run_dir)):
                teardown(instance)
                removed.append(f"instance {name}")
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
            removed.append(str(self.run_dir))
        with contextlib.suppress(OSError):
            self.run_dir.parent.rmdir()  # only if no other lab uses it
        self._records = []
        return removed

    # --- status and helpers ----------------------------------------------------------------

    def status(self) -> list[HostStatus]:
        from ztnet.datapath.datapath import Datapath
        from ztnet.datapath.loader import is_enforcing

        names = set(lab_namespaces(self.topology.name))
        records = self.records()
        rows = []
        for host in self.topology.hosts:
            netns = self.topology.netns(host)
            mine = tuple((r.name, r.pid, procs.alive(r)) for r in records if r.netns == netns)
            enforcing: bool | None = None
            grants: dict[str, int] = {}
            if host.role == Role.AGENT_HOST:
                instance = self.instance(host)
                enforcing = is_enforcing(instance)
                if enforcing:
                    with Datapath.inspect(instance) as datapath:
                        grants = datapath.live_grant_counts()
            rows.append(HostStatus(host, netns in names, mine, enforcing, grants))
        return rows

    def host_argv(self, host: LabHost | str, argv: Sequence[str]) -> list[str]:
        """``argv`` inside ``host``'s namespace, unconfined (not an agent)."""
        return nsenter_argv(self.topology.netns(host), argv)

    def agent_argv(self, host: LabHost | str, agent: str, argv: Sequence[str], *,
                   user: str | None = DYNAMIC_USER) -> list[str]:
        """``argv`` as ``agent`` on ``host``: `ztnet run` with the host's daemon instance
        (``user``: see :func:`ztnet.identity.launch.run_user_flags`)."""
        run = procs.ztnet_argv("run", "--instance", self.topology.instance_name(host),
                               "--agent", agent, *run_user_flags(user))
        return self.host_argv(host, [*run, "--", *argv])

    def run_attempts(self, host: LabHost | str, agent: str | None,
                     attempts: Sequence[dict[str, Any]], *,
                     user: str | None = DYNAMIC_USER, timeout: float = 2.0) -> list[dict[str, Any]]:
        """Run ``attempts`` (see ztnet.lab.traffic.attempt) in one process on ``host``: as
        ``agent``, or unconfined if None. One result per attempt, in order."""
        argv = [sys.executable, "-m", "ztnet.lab.traffic", "many", "-",
                "--timeout", str(timeout)]
        full = self.agent_argv(host, agent, argv, user=user) if agent else \
            self.host_argv(host, argv)
        done = procs.run(full, stdin=json.dumps(list(attempts)), timeout=60 + timeout *
                         len(attempts))
        results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or len(results) != len(attempts):
            raise LabError(f"lab: traffic agent on {host} failed (exit {done.returncode}): "
                           f"{done.stderr.strip()}")
        return results

    def operator(self, *args: str, replica: int = 0) -> subprocess.CompletedProcess[str]:
        """``ztnet ARGS`` as the lab operator: from the controller's namespace, with the lab's
        admin credentials, through controller replica ``replica``."""
        address = replicas_mod.listen_addresses(self.topology, replica)[0]
        argv = procs.ztnet_argv(*args, "--controller", address,
                                "--credentials", str(self.admin_dir))
        return procs.run(argv, netns=self.topology.netns(self.topology.controller))


    def controller_flows(self, since: str = "1h") -> list[FlowRecord]:
        """Every flow record the hosts reported to the controller since ``since`` (a duration
        ago, or RFC 3339), oldest first: ``ztnet flows --controller … --json``."""
        done = self.operator("flows", "--json", "--limit", "10000", "--since", since)
        if done.returncode != 0:
            raise LabError(f"lab: ztnet flows failed (exit {done.returncode}): "
                           f"{done.stderr.strip()}")
        return [from_json(line) for line in done.stdout.splitlines() if line.startswith("{")]


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("lab: needs root (network namespaces, cgroups, BPF); try sudo")


def orphan_labs(prefix: str) -> list[str]:
    """Names of labs starting with ``prefix`` followed by the hex pid of a process that is
    gone: what crashed test runs left (tests name their labs ``<prefix><pid hex>``)."""
    names = {ns.split("-", 1)[0] for ns in list_netns(prefix)}
    with contextlib.suppress(OSError):
        names |= {p.name for p in Topology().run_dir.parent.iterdir()}
    orphans = []
    for name in sorted(names):
        suffix = name[len(prefix):]
        if name.startswith(prefix) and re.fullmatch(r"[0-9a-f]+", suffix) and \
                not Path(f"/proc/{int(suffix, 16)}").exists():
            orphans.append(name)
    return orphans

