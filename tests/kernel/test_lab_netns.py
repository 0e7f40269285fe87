"""The lab's namespaces, helper processes and sniffer, exercised for real (root needed).

Synchronisation is always on an observable state (a READY line, a captured packet, a reaped
process), never on a sleep; every assertion checks something the lab could get wrong.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import ip_address
from typing import Any

import pytest

from tests.kernel.conftest import require, require_tools
from ztnet.errors import LabError
from ztnet.lab.netns import (
    IFNAMSIZ,
    BlackholeNetns,
    NetnsPair,
    _pids_in_netns,
    check_prefix,
    cleanup_stale,
    default_prefix,
    list_netns,
    netns_path,
    nsenter_argv,
)
from ztnet.lab.servers import NetnsProcess, ServerProcess
from ztnet.lab.sniff import CapturedPacket, Sniffer

TCP_PORT, UDP_PORT = 7000, 7001
PAYLOAD_TCP, PAYLOAD_UDP = b"hello-tcp", b"hello-udp"

# Runs in namespace a: one TCP echo and one UDP echo; reports the ports it used.
CLIENT = r"""
import json, socket, sys
host, tport, uport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
out = {}
with socket.create_connection((host, tport), timeout=5) as t:
    out["tcp_sport"] = t.getsockname()[1]
    t.sendall(b"hello-tcp")
    buf = b""
    while len(buf) < 9:
        chunk = t.recv(64)
        if not chunk:
            break
        buf += chunk
    out["tcp_echo"] = buf.decode()
with socket.socket(family, socket.SOCK_DGRAM) as u:
    u.settimeout(5)
    u.sendto(b"hello-udp", (host, uport))
    out["udp_sport"] = u.getsockname()[1]
    out["udp_echo"] = u.recvfrom(64)[0].decode()
print(json.dumps(out))
"""

# ICMP echo over a raw socket (root inside the namespace; no ping binary needed).
PING = r"""
import json, os, socket, struct, sys
dst = sys.argv[1]
v6 = ":" in dst
ident = os.getpid() & 0xFFFF
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
if v6:  # the kernel computes ICMPv6 checksums on raw sockets
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    msg, reply = struct.pack("!BBHHH", 128, 0, 0, ident, 1) + b"ztnet!", 129
else:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"ztnet!"
    msg, reply = body[:2] + struct.pack("!H", csum(body)) + body[4:], 0
sock.settimeout(3)
sock.sendto(msg, (dst, 0))
got = False
try:
    while not got:
        data = sock.recv(2048)
        icmp = data if v6 else data[(data[0] & 0xF) * 4:]
        typ, _, _, rid, _ = struct.unpack("!BBHHH", icmp[:8])
        got = typ == reply and rid == ident
except TimeoutError:
    pass
print(json.dumps({"reply": got}))
"""

# Non-blocking TCP connects and UDP sends; reports errno names (or bytes sent).
ERRNOS = r"""
import errno, json, socket
out = {}
for family, addr in ((socket.AF_INET, "10.55.1.1"), (socket.AF_INET6, "fd00:55::1")):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        out["tcp " + addr] = errno.errorcode.get(s.connect_ex((addr, 80)), "OK")
    with socket.socket(family, socket.SOCK_DGRAM) as u:
        try:
            out["udp " + addr] = u.sendto(b"x", (addr, 53))
        except OSError as exc:
            out["udp " + addr] = errno.errorcode[exc.errno]
print(json.dumps(out))
"""


def run_py(netns: str, code: str, *args: str) -> Any:
    """Run Python ``code`` in ``netns`` and return the JSON it prints."""
    proc = subprocess.run(
        nsenter_argv(netns, [sys.executable, "-c", code, *args]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module", autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield
    # Every default prefix of this process starts like this; nothing may survive the module.
    assert list_netns(f"zt{os.getpid():x}n") == []


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    require_tools("nsenter", "ip")
    with NetnsPair() as p:
        yield p


def test_pair_has_named_namespaces_running_links_and_usable_addresses(pair: NetnsPair) -> None:
    assert list_netns(pair.prefix + "-") == [pair.a.netns, pair.b.netns]
    for end in (pair.a, pair.b):
        assert os.path.exists(netns_path(end.netns))
        assert len(end.netns) < IFNAMSIZ and len(end.iface) < IFNAMSIZ
        # Cross-check with iproute2, not the pyroute2 code that configured it.
        shown = subprocess.run(
            end.argv(["ip", "-j", "addr", "show"]), capture_output=True, text=True, check=True
        )
        links = {link["ifname"]: link for link in json.loads(shown.stdout)}
        assert set(links) == {"lo", end.iface}
        assert "UP" in links["lo"]["flags"]
        link = links[end.iface]
        assert link["operstate"] == "UP"
        addrs = {a["local"]: a for a in link["addr_info"]}
        assert end.ipv4 in addrs and addrs[end.ipv4]["prefixlen"] == 24
        assert end.ipv6 in addrs and addrs[end.ipv6]["prefixlen"] == 64
        assert not addrs[end.ipv6].get("tentative", False)
    assert ip_address(pair.a.ipv4) in pair.ipv4_net and ip_address(pair.b.ipv6) in pair.ipv6_net


@pytest.mark.parametrize("family", [4, 6])
def test_ping_between_namespaces(pair: NetnsPair, family: int) -> None:
    a_addr, b_addr = (pair.a.ipv4, pair.b.ipv4) if family == 4 else (pair.a.ipv6, pair.b.ipv6)
    assert run_py(pair.a.netns, PING, b_addr) == {"reply": True}
    assert run_py(pair.b.netns, PING, a_addr) == {"reply": True}


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_and_udp_echo_between_namespaces(pair: NetnsPair, family: int) -> None:
    a_addr, b_addr = (pair.a.ipv4, pair.b.ipv4) if family == 4 else (pair.a.ipv6, pair.b.ipv6)
    with ServerProcess(
        pair.b.netns, bind=[pair.b.ipv4, pair.b.ipv6], tcp=[TCP_PORT], udp=[UDP_PORT]
    ) as server:
        assert sorted(server.listening()) == sorted(
            (proto, addr, port)
            for addr in (pair.b.ipv4, pair.b.ipv6)
            for proto, port in (("tcp", TCP_PORT), ("udp", UDP_PORT))
        )
        out = run_py(pair.a.netns, CLIENT, b_addr, str(TCP_PORT), str(UDP_PORT))
        assert out["tcp_echo"] == PAYLOAD_TCP.decode()
        assert out["udp_echo"] == PAYLOAD_UDP.decode()
        data = server.wait_event(lambda e: e.kind == "data")
        assert data.peer == (a_addr, out["tcp_sport"]) and data.data == PAYLOAD_TCP
        datagram = server.wait_event(lambda e: e.kind == "udp")
        assert datagram.peer == (a_addr, out["udp_sport"]) and datagram.data == PAYLOAD_UDP
        assert datagram.local == (b_addr, UDP_PORT)
    assert server.returncode == 0  # SIGTERM is a clean exit, not a kill


@pytest.mark.parametrize("family", [4, 6])
def test_sniffer_captures_tcp_syn_and_udp_with_correct_fields(pair: NetnsPair, family: int) -> None:
    a_addr, b_addr = (pair.a.ipv4, pair.b.ipv4) if family == 4 else (pair.a.ipv6, pair.b.ipv6)
    with (
        ServerProcess(pair.b.netns, bind=[b_addr], tcp=[TCP_PORT], udp=[UDP_PORT]),
        Sniffer(pair.b.netns, pair.b.iface) as sniffer,
    ):
        out = run_py(pair.a.netns, CLIENT, b_addr, str(TCP_PORT), str(UDP_PORT))
        syn = sniffer.wait_for(lambda p: p.is_syn and p.dport == TCP_PORT, what="the SYN")
    assert (syn.family, syn.src, syn.dst, syn.proto) == (family, a_addr, b_addr, 6)
    assert (syn.sport, syn.dport, syn.tcp_flags) == (out["tcp_sport"], TCP_PORT, "S")
    assert "TCP" in syn.summary
    udp = [p for p in sniffer.captured if p.proto == 17 and p.dport == UDP_PORT]
    assert len(udp) == 1, sniffer.captured
    (dgram,) = udp
    ip_header = 20 if family == 4 else 40
    assert (dgram.family, dgram.src, dgram.dst) == (family, a_addr, b_addr)
    assert dgram.sport == out["udp_sport"]
    assert dgram.length == ip_header + 8 + len(PAYLOAD_UDP)
    # The echo came back through the same interface, so both directions are captured.
    assert any(p.proto == 17 and p.sport == UDP_PORT and p.dst == a_addr for p in sniffer.captured)
    assert syn.time <= dgram.time


def test_sniffer_stop_keeps_packets_queued_before_stop(pair: NetnsPair) -> None:
    burst = 100
    sender = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for i in range({burst}): s.sendto(b'%04d' % i, ('{pair.b.ipv4}', 7002))\n"
        "print('{}')\n"
    )
    sniffer = Sniffer(pair.b.netns, pair.b.iface).start()
    try:
        # Freeze the capture process so the whole burst is queued on its socket when it is
        # told to stop: scapy's loop alone would exit without reading those packets.
        os.kill(sniffer.pid, signal.SIGSTOP)
        run_py(pair.a.netns, sender)
        os.kill(sniffer.pid, signal.SIGCONT)
    finally:
        captured = sniffer.stop()
    got = [p for p in captured if p.proto == 17 and p.dport == 7002]
    assert len(got) == burst


def test_wait_for_raises_when_nothing_matches(pair: NetnsPair) -> None:
    with Sniffer(pair.b.netns, pair.b.iface) as sniffer:
        with pytest.raises(LabError, match="never-sent"):
            sniffer.wait_for(lambda p: p.dport == 1, timeout=0.3, what="never-sent")


def test_bpf_filter_drops_other_traffic_with_positive_control(pair: NetnsPair) -> None:
    require(ctypes.util.find_library("pcap") is not None, "BPF filters need libpcap0.8")
    send = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.sendto(b'filtered', ('{pair.b.ipv4}', 7004))\n"
        f"s.sendto(b'control', ('{pair.b.ipv4}', 7003))\n"
        "print('{}')\n"
    )
    with Sniffer(pair.b.netns, pair.b.iface, "udp dst port 7003") as sniffer:
        run_py(pair.a.netns, send)
        # The control was sent after the filtered datagram on the same path: once it is
        # captured, the other one would have been too if the filter let it through.
        sniffer.wait_for(lambda p: p.dport == 7003, what="the positive control")
    assert [p.dport for p in sniffer.captured] == [7003]


def test_blackhole_netns_gives_einprogress_and_udp_sends() -> None:
    require_tools("nsenter")
    with BlackholeNetns() as bh:
        out = run_py(bh.netns, ERRNOS)
        assert bh.kind in ("dummy", "ifb")
    assert out == {
        "tcp 10.55.1.1": "EINPROGRESS",
        "udp 10.55.1.1": 1,
        "tcp fd00:55::1": "EINPROGRESS",
        "udp fd00:55::1": 1,
    }
    # Contrast: without the default routes the same calls fail at once, so the result above
    # is the blackhole's doing.
    with NetnsPair() as pair:
        out = run_py(pair.a.netns, ERRNOS)
    assert out["tcp 10.55.1.1"] == "ENETUNREACH" and out["udp fd00:55::1"] == "ENETUNREACH"


def test_cleanup_stale_removes_prefixed_namespaces_links_and_processes() -> None:
    require_tools("ip", "nsenter")
    base = f"ztcl{os.getpid():x}"
    stale = [f"{base}-a", f"{base}-b"]
    keep = f"{base}x-keep"  # starts with base but not with the cleanup prefix "base-"
    host_link = f"{base}-h"
    for name in [*stale, keep]:
        subprocess.run(["ip", "netns", "add", name], check=True)
    sleeper = None
    try:
        subprocess.run(["ip", "link", "add", host_link, "type", "ifb"], check=True)
        # A process left inside would keep the namespace alive after its name is gone.
        sleeper = subprocess.Popen(
            nsenter_argv(stale[0], ["sh", "-c", "echo inside; exec sleep 300"]),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sleeper.stdout is not None
        assert sleeper.stdout.readline() == "inside\n"  # it is in the namespace now
        removed = cleanup_stale(f"{base}-")
        assert sorted(removed) == sorted([*stale, host_link])
        assert list_netns(base) == [keep]
        links = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True)
        assert host_link not in {link["ifname"] for link in json.loads(links.stdout)}
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
        assert cleanup_stale(f"{base}-") == []
    finally:
        if sleeper is not None:
            if sleeper.poll() is None:
                sleeper.kill()
                sleeper.wait()
            assert sleeper.stdout is not None
            sleeper.stdout.close()
        subprocess.run(["ip", "link", "del", host_link], capture_output=True)
        for name in [*stale, keep]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert list_netns(base) == []


def test_cleanup_never_sweeps_the_host_namespace_bound_under_a_lab_name() -> None:
    require_tools("ip")
    name = f"ztho{os.getpid():x}-a"
    # Our own namespace is the host's (pid 1 may not be ours to inspect in a container).
    subprocess.run(["ip", "netns", "attach", name, str(os.getpid())], check=True)
    try:
        # Listing only: a regression here must not be tested by actually killing the host.
        assert _pids_in_netns(netns_path(name)) == []
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def test_create_replaces_leftovers_of_a_crashed_run_with_the_same_prefix() -> None:
    require_tools("ip")
    prefix = f"ztcr{os.getpid():x}"
    subprocess.run(["ip", "netns", "add", f"{prefix}-a"], check=True)
    subprocess.run(["ip", "netns", "add", f"{prefix}-bh"], check=True)
    with NetnsPair(prefix) as pair, BlackholeNetns(prefix) as bh:
        assert list_netns(prefix) == sorted([pair.a.netns, pair.b.netns, bh.netns])
        assert run_py(pair.a.netns, PING, pair.b.ipv4) == {"reply": True}
    assert list_netns(prefix) == []


def test_everything_is_removed_when_the_body_raises() -> None:
    require_tools("nsenter")
    with pytest.raises(RuntimeError, match="boom"):
        with NetnsPair() as pair:
            names = [pair.a.netns, pair.b.netns]
            with (
                ServerProcess(pair.b.netns, bind=[pair.b.ipv4], tcp=[TCP_PORT]) as server,
                Sniffer(pair.b.netns, pair.b.iface) as sniffer,
            ):
                pids, capture_dir = [server.pid, sniffer.pid], sniffer.out.parent
                raise RuntimeError("boom")
    assert [n for n in names if n in list_netns(pair.prefix)] == []
    assert all(gone(pid) for pid in pids)
    assert not capture_dir.exists()


def test_names_are_unique_short_and_validated() -> None:
    prefixes = {default_prefix() for _ in range(50)}
    assert len(prefixes) == 50
    assert all(len(f"{check_prefix(p)}-bh") < IFNAMSIZ for p in prefixes)
    with pytest.raises(ValueError):
        NetnsPair("a-very-long-prefix")
    with pytest.raises(ValueError):
        NetnsPair("bad/name")
    with NetnsPair() as one, NetnsPair() as two:
        assert {one.a.netns, one.b.netns}.isdisjoint({two.a.netns, two.b.netns})


def test_server_that_cannot_bind_fails_fast_with_its_error(pair: NetnsPair) -> None:
    with pytest.raises(LabError, match="Cannot assign requested address"):
        ServerProcess(pair.b.netns, bind=["10.199.1.77"], tcp=[TCP_PORT]).start()


def test_sniffer_on_a_missing_interface_fails_with_its_error(pair: NetnsPair) -> None:
    with pytest.raises(LabError, match="nosuch0"):
        Sniffer(pair.b.netns, "nosuch0").start()


def test_process_that_never_gets_ready_times_out_and_is_killed() -> None:
    # The child just waits for a signal: it never prints READY.
    proc = NetnsProcess(
        None, [sys.executable, "-c", "import signal; signal.pause()"], ready_timeout=0.5
    )
    with pytest.raises(LabError, match="not ready"):
        proc.start()
    assert gone(proc.pid)


def test_captured_packet_json_round_trip() -> None:
    pkt = CapturedPacket(1.5, 4, "10.0.0.1", "10.0.0.2", 6, 1, 2, 60, "S", None, "x")
    assert CapturedPacket.from_json(pkt.to_json()) == pkt
    assert pkt.is_syn


def test_cleanup_orphans_removes_only_namespaces_of_dead_creators() -> None:
    from ztnet.lab.netns import cleanup_orphans, create_netns, list_netns, remove_netns

    dead = f"zt{0x3ffffff0:x}n1-a"  # above pid_max: no such process can exist
    alive = f"zt{os.getpid():x}n7f-a"
    create_netns(dead)
    create_netns(alive)
    try:
        removed = cleanup_orphans()
        assert dead in removed and dead not in list_netns("zt")
        assert alive in list_netns("zt")
    finally:
        remove_netns(dead)
        remove_netns(alive)
