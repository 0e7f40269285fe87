"""Faults to survive (issue 10): each is injected into a real daemon on a real kernel with
a sniffer on the far side of the agent's network, which counts every packet no grant
allowed (the hardening figures' "packets leaked"). Nothing here may fail open.

Marked ``fault``: the hardening summary counts each one that passes as survived.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hardening import figures
from ztnet.datapath import loader
from ztnet.grants.keys import generate_keypair, load_private_key
from ztnet.identity import cgroups
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair
from ztnet.lab.servers import ServerProcess
from ztnet.lab.sniff import CapturedPacket, Sniffer
from ztnet.testing.agents import LineProcess, agent_argv, traffic_argv
from ztnet.testing.daemon import BundleFileHost, bundle_applied

ALLOWED, DENIED = 8080, 9090
AGENT = "bot"
pytestmark = pytest.mark.fault


@dataclass
class Setup(BundleFileHost):
    sniffer: Sniffer

    def enforcing_v1(self) -> None:
        """Version 1 in force: the allowed port works, the other is refused."""
        assert (self.attempt(ALLOWED), self.attempt(DENIED)) == ("OK", "EPERM")

    def leaks(self) -> list[CapturedPacket]:
        """Packets that reached the far side on the port no grant ever allowed."""
        return [p for p in self.sniffer.packets() if p.dport == DENIED]


@pytest.fixture
def setup(instance: Instance, tmp_path: Path) -> Iterator[Setup]:
    key_path, pub = generate_keypair(tmp_path / "keys")
    with NetnsPair() as pair, ServerProcess(pair.b.netns, bind=[pair.b.ipv4],
                                            tcp=[ALLOWED, DENIED]), \
            Sniffer(pair.b.netns, pair.b.iface, "tcp") as sniffer:
        setup = Setup(instance, pair, load_private_key(key_path), pub,
                      tmp_path / "bundle.json", tmp_path / "state", sniffer)
        yield setup
        leaked = setup.leaks()
        figures.leaked(len(leaked))
        assert not leaked, f"{len(leaked)} packets to the ungranted port left the host"


def test_daemon_sigkilled_under_connect_load_and_restarted(setup: Setup) -> None:
    setup.publish(1, [ALLOWED])
    looper = None
    with setup.daemon() as daemon:
        daemon.wait_event(bundle_applied(1))
        looper = LineProcess.start(agent_argv(setup.instance, AGENT, traffic_argv(
            "loop", setup.pair.b.ipv4, str(DENIED)), netns=setup.pair.a.netns, user="nobody"))
        assert looper.read()["event"] == "started"
        daemon.signal(signal.SIGKILL)
        assert daemon.proc is not None and daemon.proc.wait(timeout=10) == -signal.SIGKILL
    try:
        setup.enforcing_v1()  # daemon dead: the kernel still enforces, allowed flows work
        with setup.daemon() as restarted:
            restarted.wait_event(lambda e: str(e.get("event", "")).startswith("bundle "))
            setup.enforcing_v1()
        looper.proc.send_signal(signal.SIGUSR1)
        done = looper.read()
    finally:
        looper.kill()
    assert set(done["outcomes"]) == {"EPERM"}, done  # type: ignore[arg-type]
    assert done["outcomes"]["EPERM"] > 100  # type: ignore[index]


STATE_DAMAGE = {
    "bundle truncated": ("applied-bundle.json", lambda data: data[: len(data) // 2]),
    "bundle emptied": ("applied-bundle.json", lambda data: b""),
    "bundle garbage": ("applied-bundle.json", lambda data: b"\x00\xff" * 100),
    "version truncated": ("applied.json", lambda data: data[: len(data) // 2]),
    "version garbage": ("applied.json", lambda data: b'{"version": "lots"}'),
}


# `make test` runs one kind of damage, `make test-hardening` (HARDENING_FULL=1) all
QUICK_DAMAGE = ["bundle truncated"]
DAMAGE = sorted(STATE_DAMAGE) if os.environ.get("HARDENING_FULL") == "1" else QUICK_DAMAGE


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_state_file_keeps_the_kernel_state_and_never_fails_open(
        setup: Setup, damage: str) -> None:
    name, corrupt = STATE_DAMAGE[damage]
    setup.publish(1, [ALLOWED])
    with setup.daemon() as daemon:
        daemon.wait_event(bundle_applied(1))
    path = setup.state / name
    path.write_bytes(corrupt(path.read_bytes()))
    setup.enforcing_v1()
    daemon = setup.daemon()
    try:
        with daemon:
            # it may start (and re-apply the bundle file) or refuse with a clear message;
            # either way nothing opens up
            daemon.wait_event(lambda e: str(e.get("event", "")).startswith("bundle "))
            setup.enforcing_v1()
    except AssertionError as exc:
        if "never said READY" not in str(exc):
            raise
        text = daemon.stderr()
        assert "Traceback" not in text and name in text, text
    assert "Traceback" not in daemon.stderr(), daemon.stderr()
    setup.enforcing_v1()


@pytest.fixture
def small_state_dir(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "ztnet-full", str(state)],
                   check=True)
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=True)


def _fill(directory: Path) -> None:
    with open(directory / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_disk_full_in_the_state_dir(setup: Setup, small_state_dir: Path) -> None:
    setup.state = small_state_dir
    setup.publish(1, [ALLOWED])
    with setup.daemon() as daemon:
        daemon.wait_event(bundle_applied(1))
        _fill(small_state_dir)
        mark = daemon.mark()
        setup.publish(2, [ALLOWED, DENIED + 1])  # a new version that cannot be recorded
        event = daemon.wait_event(lambda e: str(e.get("event", "")).startswith("bundle "),
                                  start=mark)
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.stderr()
        assert "Traceback" not in daemon.stderr(), daemon.stderr()
        if event["event"] != "bundle applied":
            assert "space" in str(event).lower(), event  # says why
        assert setup.attempt(DENIED) == "EPERM" and setup.attempt(ALLOWED) == "OK"
        (small_state_dir / "filler").unlink()
        setup.publish(3, [ALLOWED])
        daemon.wait_event(bundle_applied(3))
    setup.enforcing_v1()


def test_bpffs_missing_at_start(setup: Setup) -> None:
    """In a mount namespace without /sys/fs/bpf the daemon mounts a bpf filesystem
    itself (datapath.probe.ensure_bpffs), pins there and enforces as usual."""
    setup.publish(1, [ALLOWED])
    daemon = setup.daemon()
    daemon.argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'umount -l /sys/fs/bpf && ! grep -q " /sys/fs/bpf bpf" /proc/self/mounts '
                   '&& exec "$@"', "sh", *daemon.argv]
    with daemon:
        daemon.wait_event(bundle_applied(1))
        assert daemon.proc is not None
        mount_ns = f"--mount=/proc/{daemon.proc.pid}/ns/mnt"

        def attempt_beside_daemon(port: int) -> str:
            argv = ["nsenter", mount_ns, *agent_argv(setup.instance, AGENT, traffic_argv(
                "tcp", setup.pair.b.ipv4, str(port)), netns=setup.pair.a.netns,
                user="nobody")]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            return str(json.loads(out.stdout.splitlines()[-1])["result"])

        assert (attempt_beside_daemon(ALLOWED), attempt_beside_daemon(DENIED)) == ("OK", "EPERM")
        assert all(n > 0 for n in loader.attached_counts(setup.instance).values())
        # where the pins cannot be seen, `ztnet run` refuses rather than start an agent
        refused = subprocess.run(agent_argv(setup.instance, AGENT, ["true"]),
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "refusing to start agent" in refused.stderr
        assert "Traceback" not in daemon.stderr()


def test_agent_cgroup_removed_while_its_processes_run(setup: Setup) -> None:
    """The kernel refuses to remove a populated cgroup (EBUSY), so the agent stays
    confined; once it is gone, a new cgroup of the same name inherits nothing."""
    setup.publish(1, [ALLOWED])
    with setup.daemon("--resync", "1") as daemon:
        daemon.wait_event(bundle_applied(1))
        holder = LineProcess.start(agent_argv(setup.instance, AGENT, traffic_argv(
            "hold", setup.pair.b.ipv4, str(ALLOWED), "--limit", "60"),
            netns=setup.pair.a.netns, user="nobody"))
        try:
            assert holder.read()["event"] in {"connected", "started", "holding"}
            path = cgroups.agent_cgroups(setup.instance)[AGENT]
            with pytest.raises(OSError) as busy:
                path.rmdir()
            assert busy.value.errno == errno.EBUSY
            assert setup.attempt(DENIED) == "EPERM"
        finally:
            holder.kill()
        old_id = cgroups.cgroup_id(path)
        (path / "cgroup.kill").write_text("1")
        _rmdir_when_empty(path)
        path.mkdir()  # root recreates the name: a new cgroup, judged afresh
        try:
            assert cgroups.cgroup_id(path) != old_id
        finally:
            path.rmdir()
        # `ztnet run` registers the agent again, under a new cgroup: until the daemon
        # re-installs the grant set for it (its next resync) it is denied, never open
        mark = daemon.mark()
        assert setup.attempt(DENIED) == "EPERM"
        daemon.wait_event(lambda e: e.get("event") == "resync changed the kernel", start=mark)
        setup.enforcing_v1()


def _rmdir_when_empty(path: Path) -> None:
    import select

    events = path / "cgroup.events"
    with open(events) as handle:
        poller = select.poll()
        poller.register(handle, select.POLLPRI)
        for _ in range(100):
            handle.seek(0)
            if "populated 0" in handle.read():
                path.rmdir()
                return
            poller.poll(100)
    raise AssertionError(f"{path} still populated")
