"""`ztnet run` gives the agent nothing of the operator's (issue 10, items 2 and 5).

Each test is an attack that worked against the earlier `ztnet run`, made by a real
unprivileged agent under the real BPF programs: typing into the operator's root shell
with TIOCSTI, using a socket inherited from outside the agent cgroup, reading root's
environment, running as root, and ptrace between two agents that share a uid.
"""

from __future__ import annotations

import fcntl
import os
import select
import shlex
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kernel.hostile_support import (
    Ledger,
    attempts,
    hostile_argv,
    run_argv,
    scratch_user,
)
from tests.kernel.support import grant
from ztnet.datapath.datapath import Datapath
from ztnet.grants.model import Proto
from ztnet.identity import uids
from ztnet.identity.environment import BASE_NAMES
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair, nsenter_argv
from ztnet.lab.sniff import Sniffer

AGENT = "bot"
DENIED, CONTROL = 9090, 7070


@pytest.fixture
def datapath(instance: Instance) -> Iterator[Datapath]:
    with Datapath.open(instance) as dp:
        yield dp


@pytest.fixture
def user() -> Iterator[str]:
    with scratch_user("u") as name:
        yield name


def _read_until(fd: int, done: Callable[[str], bool], timeout: float) -> str:
    """Read a pty master until ``done(text)`` or EOF; fail at the deadline."""
    text = ""
    deadline = time.monotonic() + timeout
    while not done(text):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out; terminal so far: {text!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the shell and everything on the pty are gone
            break
        if not chunk:
            break
        text += chunk.decode(errors="replace")
    return text


def test_agent_cannot_type_into_the_operator_root_shell(
        datapath: Datapath, user: str, tmp_path: Path) -> None:
    """A root shell on a terminal runs `ztnet run`; the agent pushes `touch MARKER` into
    every terminal it can reach (TIOCSTI, legacy_tiocsti=1 here). Before the fix the
    shell ran it as root once the agent exited."""
    marker = tmp_path / "typed-by-agent"
    master, slave = os.openpty()

    def controlling_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    shell = subprocess.Popen(["sh", "-i"], stdin=slave, stdout=slave, stderr=slave,
                             start_new_session=True, preexec_fn=controlling_terminal,
                             env={**os.environ, "PS1": "$ "})
    os.close(slave)
    try:
        run = shlex.join(run_argv(datapath.instance, AGENT, ["--user", user],
                                  hostile_argv("tiocsti", f"touch {marker}")))
        os.write(master, f"{run}; echo RUN-$((40+2))\n".encode())
        transcript = _read_until(master, lambda text: "RUN-42" in text, 60)
        os.write(master, b"exit\n")
        transcript += _read_until(master, lambda text: False, 30)
        shell.wait(timeout=30)
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()
        os.close(master)
    results = attempts(transcript)
    tried = [r for name, r in results.items() if name.startswith("tiocsti")]
    assert tried, transcript
    assert all(r["result"] != "OK" for r in tried), tried
    assert not marker.exists(), f"the agent's keystrokes ran in the root shell: {transcript}"


def test_socket_inherited_from_outside_the_agent_is_closed(
        datapath: Datapath, user: str) -> None:
    """A UDP socket made outside any agent cgroup (so no hook judges it), left open
    across `ztnet run`: before the fix the agent sent through it to a denied peer."""
    with NetnsPair() as pair:
        datapath.install_unverified([grant(1, AGENT, Proto.TCP, f"{pair.b.ipv4}/32", "8080")])
        wrapper = ("import os, socket, sys\n"
                   "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                   "s.connect((sys.argv[1], int(sys.argv[2])))\n"
                   "os.set_inheritable(s.fileno(), True)\n"
                   "argv = [a.replace('@FD@', str(s.fileno())) for a in sys.argv[3:]]\n"
                   "os.execv(argv[0], argv)\n")
        agent = run_argv(datapath.instance, AGENT, ["--user", user],
                         hostile_argv("send-fd", "@FD@"))
        argv = nsenter_argv(pair.a.netns, [sys.executable, "-c", wrapper, pair.b.ipv4,
                                           str(DENIED), *agent])
        with Sniffer(pair.b.netns, pair.b.iface, "udp") as sniffer:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            subprocess.run(pair.a.argv([sys.executable, "-m", "ztnet.lab.traffic", "udp",
                                        pair.b.ipv4, str(CONTROL)]), check=True,
                           capture_output=True)
            sniffer.wait_for(lambda p: p.dport == CONTROL)
        packets = sniffer.stop()
    results = attempts(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    (sent,) = [r for name, r in results.items() if name.startswith("send on inherited")]
    assert sent["result"] == "EBADF", sent
    assert not [p for p in packets if p.dport == DENIED], "the inherited socket leaked"


def test_agent_environment_is_the_documented_minimum(datapath: Datapath, user: str) -> None:
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "root-secret", "GITHUB_TOKEN": "ghp-root"}
    proc = subprocess.run(run_argv(datapath.instance, AGENT, ["--user", user],
                                   hostile_argv("env")),
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    agent_env = attempts(proc.stdout)["environment"]["env"]
    assert isinstance(agent_env, dict)
    assert "AWS_SECRET_ACCESS_KEY" not in agent_env and "GITHUB_TOKEN" not in agent_env
    assert set(agent_env) <= set(BASE_NAMES), sorted(agent_env)
    assert agent_env["USER"] == user and agent_env["ZTNET_AGENT"] == AGENT
    assert agent_env["PATH"] == "/usr/local/bin:/usr/bin:/bin"


def test_env_flag_passes_named_variables_only_and_refuses_unset_ones(
        datapath: Datapath) -> None:
    env = {**os.environ, "ZT_PASSED": "yes", "ZT_KEPT_BACK": "no"}
    proc = subprocess.run(run_argv(datapath.instance, AGENT, ["--dynamic-user", "--env",
                                                              "ZT_PASSED"], hostile_argv("env")),
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    agent_env = attempts(proc.stdout)["environment"]["env"]
    assert isinstance(agent_env, dict)
    assert agent_env["ZT_PASSED"] == "yes" and "ZT_KEPT_BACK" not in agent_env
    for bad, why in (("ZT_NOT_SET", "not set"), ("1BAD", "not a variable name")):
        proc = subprocess.run(run_argv(datapath.instance, AGENT, ["--dynamic-user", "--env", bad],
                                       hostile_argv("env")),
                              capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 4 and why in proc.stderr and "environment" not in proc.stdout


@pytest.mark.parametrize("flags", [[], ["--user", "root"]], ids=["no-user", "user-root"])
def test_root_agent_refused_without_allow_root(datapath: Datapath, flags: list[str]) -> None:
    proc = subprocess.run(run_argv(datapath.instance, AGENT, flags, hostile_argv("whoami")),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 4, proc
    assert "refusing to run agent 'bot' as root" in proc.stderr
    assert "leave its cgroup" in proc.stderr and "--allow-root" in proc.stderr
    assert "whoami" not in proc.stdout
    assert not datapath.instance.agent_cgroup(AGENT).exists()  # nothing changed
    allowed = subprocess.run(run_argv(datapath.instance, AGENT, [*flags, "--allow-root"],
                                      hostile_argv("whoami")),
                             capture_output=True, text=True, timeout=60)
    assert attempts(allowed.stdout)["whoami"]["uid"] == 0, allowed.stderr


def _start_sleeper(instance: Instance, agent: str,
                   flags: list[str]) -> tuple[subprocess.Popen[str], dict[str, object]]:
    proc = subprocess.Popen(run_argv(instance, agent, flags, hostile_argv("sleep")),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready = attempts(proc.stdout.readline()).get("ready")
    assert ready, proc.stderr.read() if proc.stderr else ""
    return proc, ready


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin:
        proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_second_agent_with_the_same_uid_is_refused(
        datapath: Datapath, user: str, record_property: Callable[[str, object], None]) -> None:
    """Before the fix agent b, sharing a's uid, PTRACE_ATTACHed to a and read its memory."""
    sleeper, ready = _start_sleeper(datapath.instance, "agent-a", ["--user", user])
    try:
        proc = subprocess.run(run_argv(datapath.instance, "agent-b", ["--user", user],
                                       hostile_argv("ptrace", str(ready["pid"]))),
                              capture_output=True, text=True, timeout=60)
        again = subprocess.run(run_argv(datapath.instance, "agent-a", ["--user", user],
                                        hostile_argv("whoami")),
                               capture_output=True, text=True, timeout=60)
    finally:
        _stop(sleeper)
    tried = attempts(proc.stdout)
    assert not [r for r in tried.values() if r["result"] == "OK"], tried
    assert proc.returncode == 4, proc
    assert "already used by" in proc.stderr and "agent-a" not in proc.stderr.split("cgroup")[0]
    assert again.returncode == 0, again.stderr  # the same agent may start more processes
    record_property("escape_attempts", 1)


def test_dynamic_users_are_distinct_and_cannot_ptrace_each_other(
        datapath: Datapath, record_property: Callable[[str, object], None]) -> None:
    ledger = Ledger()
    sleeper, ready = _start_sleeper(datapath.instance, "agent-a", ["--dynamic-user"])
    try:
        proc = subprocess.run(run_argv(datapath.instance, "agent-b", ["--dynamic-user"],
                                       hostile_argv("ptrace", str(ready["pid"]))),
                              capture_output=True, text=True, timeout=60)
        same = subprocess.run(run_argv(datapath.instance, "agent-a", ["--dynamic-user"],
                                       hostile_argv("whoami")),
                              capture_output=True, text=True, timeout=60)
        other = subprocess.run(run_argv(datapath.instance, "agent-b", ["--dynamic-user"],
                                        hostile_argv("whoami")),
                               capture_output=True, text=True, timeout=60)
    finally:
        _stop(sleeper)
    assert proc.returncode == 0, proc.stderr
    tried = attempts(proc.stdout)
    ledger.blocked_attempt(tried[f"ptrace attach {ready['pid']}"], "EPERM")
    ledger.blocked_attempt(tried[f"open /proc/{ready['pid']}/mem"], "EACCES", "EPERM")
    uid_a = int(str(ready["uid"]))
    assert attempts(same.stdout)["whoami"]["uid"] == uid_a  # stable per agent
    uid_b = int(str(attempts(other.stdout)["whoami"]["uid"]))
    assert uid_a != uid_b
    for uid in (uid_a, uid_b):
        assert uids.DYNAMIC_BASE <= uid < uids.DYNAMIC_BASE + uids.DYNAMIC_SIZE
    record_property("escape_attempts", ledger.made)
    record_property("escape_attempts_blocked", ledger.blocked)


def test_teardown_releases_dynamic_uids(instance: Instance) -> None:
    from ztnet.datapath.datapath import teardown

    with uids.launch_lock():
        user = uids.dynamic_user(instance, "agent-x")
    assert (uids.ALLOCATIONS / str(user.uid)).read_text() == f"{instance.name}/agent-x\n"
    with Datapath.open(instance):
        pass
    teardown(instance)
    assert not (uids.ALLOCATIONS / str(user.uid)).exists()
