"""Hostile agents (issue 10): each attack from an unprivileged agent with a uid of its own
(``--dynamic-user``), in a real agent cgroup under the real BPF programs and seccomp
filter, with a sniffer on the far side of the veth wherever a packet could leak.

Each test reports ``escape_attempts`` / ``escape_attempts_blocked`` (record_property, in
the JUnit XML) and asserts that every attempt was blocked; where a packet could leave,
the sniffer's positive control (see ztnet.lab.sniff) proves the capture saw the path.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kernel.hostile_support import Ledger, attempts, hostile_argv, run_argv, run_hostile
from tests.kernel.pair_fixtures import AGENT, ALLOWED, CONTROL, DENIED
from tests.kernel.support import grant
from ztnet.datapath.datapath import Datapath
from ztnet.grants.model import Proto
from ztnet.lab.netns import NetnsPair
from ztnet.lab.servers import ServerProcess
from ztnet.lab.sniff import CapturedPacket, Sniffer

Record = Callable[[str, object], None]


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A root-owned directory every agent uid can read and enter (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="ztnet-hostile-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def control(pair: NetnsPair, proto: str) -> None:
    subprocess.run(pair.a.argv([sys.executable, "-m", "ztnet.lab.traffic", proto, pair.b.ipv4,
                                str(CONTROL)]), check=True, capture_output=True)


def report(record: Record, ledger: Ledger) -> None:
    record("escape_attempts", ledger.made)
    record("escape_attempts_blocked", ledger.blocked)
    assert ledger.made == ledger.blocked


def leaked(packets: list[CapturedPacket]) -> list[CapturedPacket]:
    return [p for p in packets if p.dport == DENIED]


def test_sendmmsg_to_a_denied_peer_sends_nothing(
        datapath: Datapath, pair: NetnsPair, server: ServerProcess,
        record_property: Record) -> None:
    ledger = Ledger()
    datapath.install_unverified([grant(1, AGENT, Proto.UDP, f"{pair.b.ipv4}/32", str(ALLOWED))])
    with Sniffer(pair.b.netns, pair.b.iface, "udp") as sniffer:
        allowed = run_hostile(datapath.instance, AGENT, ["sendmmsg", pair.b.ipv4, str(ALLOWED)],
                              netns=pair.a.netns)["sendmmsg"]
        denied = {host: run_hostile(datapath.instance, AGENT, ["sendmmsg", host, str(DENIED)],
                                    netns=pair.a.netns)["sendmmsg"]
                  for host in (pair.b.ipv4, pair.b.ipv6, f"::ffff:{pair.b.ipv4}")}
        control(pair, "udp")
        sniffer.wait_for(lambda p: p.dport == CONTROL)
    packets = sniffer.stop()
    assert allowed["result"] == "OK" and allowed["sent"] == 8
    assert len([p for p in packets if p.dport == ALLOWED]) == 8
    for record in denied.values():
        ledger.blocked_attempt(record, "EPERM")
    assert not leaked(packets)
    report(record_property, ledger)


def test_tcp_fast_open_to_a_denied_peer_sends_no_syn(
        datapath: Datapath, pair: NetnsPair, server: ServerProcess,
        record_property: Record) -> None:
    ledger = Ledger()
    datapath.install_unverified([grant(2, AGENT, Proto.TCP, f"{pair.b.ipv4}/32", str(ALLOWED))])
    with Sniffer(pair.b.netns, pair.b.iface, "tcp") as sniffer:
        allowed = run_hostile(datapath.instance, AGENT, ["fastopen", pair.b.ipv4, str(ALLOWED)],
                              netns=pair.a.netns)["tcp fast open"]
        for host in (pair.b.ipv4, pair.b.ipv6):
            ledger.blocked_attempt(run_hostile(
                datapath.instance, AGENT, ["fastopen", host, str(DENIED)],
                netns=pair.a.netns)["tcp fast open"], "EPERM")
        control(pair, "tcp")
        sniffer.wait_for(lambda p: p.dport == CONTROL and p.is_syn)
    packets = sniffer.stop()
    assert allowed["result"] in ("OK", "EINPROGRESS"), allowed  # the SYN left
    assert any(p.dport == ALLOWED and p.is_syn for p in packets)
    assert not leaked(packets)
    report(record_property, ledger)


def test_io_uring_is_refused(datapath: Datapath, record_property: Record) -> None:
    """IORING_OP_SOCKET would create sockets without socket(): io_uring is off for agents
    (the connect/send it would do go through the same hooks, but the family filter would not)."""
    ledger = Ledger()
    ledger.blocked_attempt(run_hostile(datapath.instance, AGENT, ["io-uring"])["io_uring_setup"],
                           "EPERM")
    report(record_property, ledger)


def test_unshare_into_user_and_network_namespaces_is_refused(
        datapath: Datapath, pair: NetnsPair, server: ServerProcess,
        record_property: Record) -> None:
    ledger = Ledger()
    datapath.install_unverified([])
    with Sniffer(pair.b.netns, pair.b.iface, "udp") as sniffer:
        tried = run_hostile(datapath.instance, AGENT, ["unshare", pair.b.ipv4, str(DENIED)],
                            netns=pair.a.netns)
        control(pair, "udp")
        sniffer.wait_for(lambda p: p.dport == CONTROL)
    for name in ("unshare user", "unshare user+net"):
        ledger.blocked_attempt(tried[name], "EPERM")
    assert not leaked(sniffer.stop())
    report(record_property, ledger)


def test_setuid_and_file_capability_helpers_give_nothing(
        datapath: Datapath, public_dir: Path, record_property: Record) -> None:
    """no_new_privs: a setuid-root interpreter runs as the agent; a file capability
    (cap_net_raw) is not granted; the host's setuid mount(8) cannot mount."""
    ledger = Ledger()
    python = os.path.realpath(sys.executable)
    suid = public_dir / "python-suid"
    shutil.copy2(python, suid)
    os.chown(suid, 0, 0)
    suid.chmod(0o4755 | stat.S_IXGRP | stat.S_IXOTH)
    probe = "import json, os; print(json.dumps({'attempt': 'whoami', 'result': 'OK', " \
            "'euid': os.geteuid()}))"
    proc = subprocess.run(run_argv(datapath.instance, AGENT, ["--dynamic-user"],
                                   [str(suid), "-S", "-c", probe]),
                          capture_output=True, text=True, timeout=60)
    euid = attempts(proc.stdout)["whoami"]["euid"]
    ledger.blocked_attempt({"attempt": "setuid-root binary", "result": "OK" if euid == 0
                            else "NOT-ROOT"}, "NOT-ROOT")
    capped = public_dir / "python-cap"
    shutil.copy2(python, capped)
    capped.chmod(0o755)
    subprocess.run(["setcap", "cap_net_raw+ep", str(capped)], check=True)
    raw = ("import json, socket\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)"
           ".close(); r = 'OK'\nexcept OSError as e:\n    r = e.__class__.__name__\n"
           "print(json.dumps({'attempt': 'raw', 'result': r}))")
    proc = subprocess.run(run_argv(datapath.instance, AGENT, ["--dynamic-user"],
                                   [str(capped), "-S", "-c", raw]),
                          capture_output=True, text=True, timeout=60)
    ledger.blocked_attempt(attempts(proc.stdout)["raw"], "PermissionError")
    mount = shutil.which("mount")
    if mount and os.stat(mount).st_mode & stat.S_ISUID:
        target = public_dir / "mnt"
        target.mkdir(mode=0o777)
        target.chmod(0o777)
        proc = subprocess.run(run_argv(datapath.instance, AGENT, ["--dynamic-user"],
                                       [mount, "-t", "tmpfs", "ztnet-hostile", str(target)]),
                              capture_output=True, text=True, timeout=60)
        mounted = os.path.ismount(target)
        if mounted:
            subprocess.run(["umount", str(target)], check=False)
        ledger.blocked_attempt({"attempt": "setuid mount", "result": "MOUNTED" if mounted
                                else f"exit {proc.returncode}"}, f"exit {proc.returncode}")
        assert proc.returncode != 0
    report(record_property, ledger)


def test_agent_cannot_leave_its_cgroup(datapath: Datapath, record_property: Record) -> None:
    ledger = Ledger()
    instance = datapath.instance
    other = instance.agent_cgroup("other")
    other.mkdir(parents=True)
    targets = [instance.agents_dir, instance.cgroup_root, instance.cgroup_mount, other]
    tried = run_hostile(instance, AGENT, ["leave-cgroup", *map(str, targets)])
    for target in targets:
        ledger.blocked_attempt(tried[f"join {target}"], "EACCES", "EPERM")
    assert str(tried["cgroup after"]["cgroup"]).endswith(f"/agents/{AGENT}")
    report(record_property, ledger)


def _unix_listener(path: Path) -> tuple[socket.socket, list[bytes], threading.Thread]:
    """A local service on a world-writable AF_UNIX socket (like a resolver's)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    path.chmod(0o777)
    listener.listen()
    received: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                received.append(conn.recv(4096))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, received, thread


@pytest.mark.parametrize("flags", [["--dynamic-user"], ["--allow-root"]],
                         ids=["unprivileged", "root-agent"])
def test_socket_families_other_than_ip_are_refused(
        datapath: Datapath, public_dir: Path, flags: list[str], record_property: Record) -> None:
    """AF_UNIX to a local service, AF_VSOCK to the hypervisor, AF_PACKET, other netlink
    protocols, and a family hidden above bit 31; IP, route netlink and socketpair stay.
    Even a root agent (--allow-root) is held to this."""
    ledger = Ledger()
    path = public_dir / "resolver.sock"
    listener, received, thread = _unix_listener(path)
    try:
        proc = subprocess.run(run_argv(datapath.instance, AGENT, flags,
                                       hostile_argv("families", "--unix", str(path))),
                              capture_output=True, text=True, timeout=60)
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=10)
    assert proc.returncode == 0, proc.stderr
    tried = attempts(proc.stdout)
    for name in ("AF_UNIX connect", "AF_UNIX stream", "AF_UNIX datagram", "AF_VSOCK",
                 "AF_PACKET", "AF_NETLINK uevent", "socket(0x100000001)"):
        ledger.blocked_attempt(tried[name], "EAFNOSUPPORT")
    for name in ("keep AF_INET", "keep AF_INET6", "keep AF_NETLINK route", "keep socketpair"):
        assert tried[name]["result"] == "OK", tried[name]
    assert received == [], "the local service got the agent's bytes"
    report(record_property, ledger)


I386_SOCKET = r"""
#include <stdio.h>
int main(void) {
    long ret;
    /* i386 socket(AF_UNIX, SOCK_STREAM, 0) through int 0x80: another architecture */
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(359L), "b"(1L), "c"(1L), "d"(0L) : "memory");
    printf("{\"attempt\": \"i386 socket\", \"result\": \"%s\", \"ret\": %ld}\n",
           ret >= 0 ? "OK" : "ERR", ret);
    return 0;
}
"""


def test_system_calls_of_another_architecture_kill_the_agent(
        datapath: Datapath, public_dir: Path, record_property: Record) -> None:
    ledger = Ledger()
    source = public_dir / "i386_socket.c"
    source.write_text(I386_SOCKET)
    binary = public_dir / "i386_socket"
    subprocess.run(["gcc", "-O0", "-o", str(binary), str(source)], check=True)
    binary.chmod(0o755)
    outside = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30)
    assert attempts(outside.stdout)["i386 socket"]["result"] == "OK"  # the path exists here
    proc = subprocess.run(run_argv(datapath.instance, AGENT, ["--dynamic-user"], [str(binary)]),
                          capture_output=True, text=True, timeout=30)
    ledger.blocked_attempt({"attempt": "i386 socket", "result": proc.returncode},
                           -31, 128 + 31)  # SIGSYS
    assert "i386 socket" not in proc.stdout
    report(record_property, ledger)
