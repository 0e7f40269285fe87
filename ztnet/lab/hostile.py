"""What a hostile agent tries beyond plain connects, one JSON line per attempt.

Run under `ztnet run` by the kernel tests (tests/kernel/test_hostile_agents.py,
test_run_isolation.py): every attempt comes from a real unprivileged process in a real
agent cgroup, under the real BPF programs and the agent's seccomp filter. Each line is
``{"attempt": NAME, "result": "OK" | errno name, ...}``; "OK" means the attempt worked.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import os
import socket
import sys
import termios
import time

_libc = ctypes.CDLL(None, use_errno=True)
SYS_IO_URING_SETUP = 425
SYS_SOCKET = 41
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
MSG_FASTOPEN = 0x20000000
AF_VSOCK = 40
NETLINK_KOBJECT_UEVENT = 15


def _emit(attempt: str, result: str, **extra: object) -> None:
    print(json.dumps({"attempt": attempt, "result": result, **extra}), flush=True)


def _errname(number: int) -> str:
    return errno.errorcode.get(number, str(number))


def _try(attempt: str, action: object, **extra: object) -> str:
    try:
        action()  # type: ignore[operator]
    except OSError as exc:
        result = _errname(exc.errno or 0)
    else:
        result = "OK"
    _emit(attempt, result, **extra)
    return result


def _check(ret: int) -> None:
    if ret < 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


def tiocsti(command: str) -> None:
    """Type ``command`` into every terminal within reach: fds 0-2 and /dev/tty."""
    targets: dict[str, int] = {f"fd{fd}": fd for fd in (0, 1, 2) if os.isatty(fd)}
    try:
        targets["/dev/tty"] = os.open("/dev/tty", os.O_RDWR)
    except OSError as exc:
        _emit("tiocsti /dev/tty", _errname(exc.errno or 0))
    for name, fd in targets.items():
        def push(fd: int = fd) -> None:
            for char in (command + "\n").encode():
                fcntl.ioctl(fd, termios.TIOCSTI, bytes([char]))
        _try(f"tiocsti {name}", push)


def send_fd(fd: int) -> None:
    """Use a descriptor the caller left open (a socket made outside the agent cgroup)."""
    _try(f"send on inherited fd {fd}", lambda: os.write(fd, b"ztnet-inherited"))


def environment() -> None:
    _emit("environment", "OK", env=dict(os.environ))


def ptrace(pid: int) -> None:
    def attach() -> None:
        _check(_libc.ptrace(PTRACE_ATTACH, pid, None, None))
        _libc.ptrace(PTRACE_DETACH, pid, None, None)

    _try(f"ptrace attach {pid}", attach)

    def read_mem() -> None:
        with open(f"/proc/{pid}/mem", "rb") as handle:
            handle.read(1)

    _try(f"open /proc/{pid}/mem", read_mem)


def families(unix_path: str) -> None:
    """Socket families no cgroup hook judges; and the ones agents must keep."""
    def make(family: int, kind: int, proto: int = 0) -> object:
        return lambda: socket.socket(family, kind, proto).close()

    def unix_connect() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(unix_path)
            sock.sendall(b"ztnet-exfil.example.")

    if unix_path:
        _try("AF_UNIX connect", unix_connect, path=unix_path)
    _try("AF_UNIX stream", make(socket.AF_UNIX, socket.SOCK_STREAM))
    _try("AF_UNIX datagram", make(socket.AF_UNIX, socket.SOCK_DGRAM))
    _try("AF_VSOCK", make(AF_VSOCK, socket.SOCK_STREAM))
    _try("AF_PACKET", make(socket.AF_PACKET, socket.SOCK_RAW, 0x0300))
    _try("AF_NETLINK uevent", make(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT))
    # family 1 (AF_UNIX) with garbage above bit 31: the kernel reads an int
    _try("socket(0x100000001)", lambda: _check(_libc.syscall(
        ctypes.c_long(SYS_SOCKET), ctypes.c_long(0x100000001), ctypes.c_long(1),
        ctypes.c_long(0))))
    # what an agent keeps: IP, route netlink (getaddrinfo), socketpair (asyncio)
    _try("keep AF_INET", make(socket.AF_INET, socket.SOCK_STREAM))
    _try("keep AF_INET6", make(socket.AF_INET6, socket.SOCK_DGRAM))
    _try("keep AF_NETLINK route", make(socket.AF_NETLINK, socket.SOCK_RAW, 0))
    def pair() -> None:
        for end in socket.socketpair():
            end.close()

    _try("keep socketpair", pair)


def sendmmsg(host: str, port: int, count: int) -> None:
    """``count`` UDP datagrams in one sendmmsg call, unconnected, to host:port."""
    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    class Msghdr(ctypes.Structure):
        _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                    ("iov", ctypes.POINTER(Iovec)), ("iovlen", ctypes.c_size_t),
                    ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                    ("flags", ctypes.c_int)]

    class Mmsghdr(ctypes.Structure):
        _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    packed = socket.inet_pton(family, host)
    if family == socket.AF_INET:
        addr = (socket.AF_INET.to_bytes(2, "little") + port.to_bytes(2, "big") + packed
                + bytes(8))
    else:
        addr = (socket.AF_INET6.to_bytes(2, "little") + port.to_bytes(2, "big") + bytes(4)
                + packed + bytes(4))
    name = ctypes.create_string_buffer(addr, len(addr))
    payload = ctypes.create_string_buffer(b"ztnet-sendmmsg")
    iov = Iovec(ctypes.cast(payload, ctypes.c_void_p), len(payload.raw) - 1)
    msgs = (Mmsghdr * count)()
    for msg in msgs:
        msg.hdr = Msghdr(ctypes.cast(name, ctypes.c_void_p), len(addr), ctypes.pointer(iov),
                         1, None, 0, 0)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sent = _libc.sendmmsg(sock.fileno(), msgs, count, 0)
        result = "OK" if sent >= 0 else _errname(ctypes.get_errno())
    _emit("sendmmsg", result, sent=max(sent, 0), host=host, port=port)


def fastopen(host: str, port: int) -> None:
    """TCP Fast Open: the SYN carries data, sent by sendto without connect()."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def send() -> None:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.sendto(b"ztnet-tfo", MSG_FASTOPEN, (host, port))

    _try("tcp fast open", send, host=host, port=port)


def io_uring() -> None:
    """io_uring_setup: the ring's IORING_OP_SOCKET/CONNECT/SEND bypass socket()."""
    params = ctypes.create_string_buffer(120)

    def setup() -> None:
        fd = _libc.syscall(SYS_IO_URING_SETUP, 4, params)
        _check(fd)
        os.close(fd)

    _try("io_uring_setup", setup)


def unshare(host: str, port: int) -> None:
    """New user (and network) namespaces: capabilities of one's own, then connect out."""
    for flags, name in ((CLONE_NEWUSER, "user"), (CLONE_NEWUSER | CLONE_NEWNET, "user+net")):
        pid = os.fork()
        if pid == 0:
            ret = _libc.unshare(flags)
            if ret != 0:
                os._exit(ctypes.get_errno() or 255)
            # inside: try the path anyway (and a raw packet socket, now "permitted")
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.sendto(b"ztnet-unshare", (host, port))
            except OSError:
                pass
            try:
                socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0x0300).close()
            except OSError:
                pass
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        _emit(f"unshare {name}", "OK" if code == 0 else _errname(code))


def leave_cgroup(*targets: str) -> None:
    """Write our own pid into other cgroups' cgroup.procs."""
    for target in targets:
        def write(target: str = target) -> None:
            with open(os.path.join(target, "cgroup.procs"), "w") as handle:
                handle.write(f"{os.getpid()}\n")
        _try(f"join {target}", write)
    with open("/proc/self/cgroup") as handle:
        _emit("cgroup after", "OK", cgroup=handle.read().strip())


def whoami() -> None:
    _emit("whoami", "OK", uid=os.getuid(), euid=os.geteuid(), gid=os.getgid(),
          egid=os.getegid(), groups=os.getgroups())


def sleep(seconds: float) -> None:
    _emit("ready", "OK", pid=os.getpid(), uid=os.getuid())
    # stays alive for the test to aim at; ended by the test (SIGKILL / stdin EOF)
    sys.stdin.read() if not sys.stdin.isatty() else time.sleep(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztnet.lab.hostile")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("tiocsti").add_argument("command")
    sub.add_parser("send-fd").add_argument("fd", type=int)
    sub.add_parser("env")
    sub.add_parser("ptrace").add_argument("pid", type=int)
    sub.add_parser("families").add_argument("--unix", default="")
    for name in ("sendmmsg", "fastopen", "unshare"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        if name == "sendmmsg":
            p.add_argument("--count", type=int, default=8)
    sub.add_parser("io-uring")
    sub.add_parser("leave-cgroup").add_argument("targets", nargs="+")
    sub.add_parser("whoami")
    sub.add_parser("sleep").add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.cmd == "tiocsti":
        tiocsti(args.command)
    elif args.cmd == "send-fd":
        send_fd(args.fd)
    elif args.cmd == "env":
        environment()
    elif args.cmd == "ptrace":
        ptrace(args.pid)
    elif args.cmd == "families":
        families(args.unix)
    elif args.cmd == "sendmmsg":
        sendmmsg(args.host, args.port, args.count)
    elif args.cmd == "fastopen":
        fastopen(args.host, args.port)
    elif args.cmd == "unshare":
        unshare(args.host, args.port)
    elif args.cmd == "io-uring":
        io_uring()
    elif args.cmd == "leave-cgroup":
        leave_cgroup(*args.targets)
    elif args.cmd == "whoami":
        whoami()
    elif args.cmd == "sleep":
        sleep(args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
