"""The agent never gets the operator's terminal or session.

An agent in the operator's session could open ``/dev/tty`` (or use an inherited terminal
descriptor) and push characters into its input queue with TIOCSTI: the root shell that
started it reads them as a command when the agent exits. So the agent always starts in a
new session (setsid: it has no controlling terminal, and cannot take one that already
belongs to another session). When the caller is on a terminal, the agent gets a new
pseudo-terminal of its own, like ``su --pty`` and sudo's ``use_pty``: the agent's session
is on the pty, and the `ztnet run` parent, outside the agent's cgroup, relays bytes between
the operator's terminal and the pty master. Anything the agent types into its own pty
comes back only to itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import sys
import termios
import tty
from collections.abc import Callable, Iterator
from typing import NoReturn

from ztnet.errors import IdentityError, ZtnetError

STDIO = (0, 1, 2)
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)


def terminal_fds() -> list[int]:
    return [fd for fd in STDIO if _isatty(fd)]


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def run_child(start: Callable[[], NoReturn]) -> NoReturn:
    """In a forked child: run ``start`` (which execs); report a failure as the CLI would."""
    try:
        start()
    except ZtnetError as exc:
        _report(f"ztnet: {exc}\n")
        os._exit(exc.exit_code)
    except BaseException as exc:  # noqa: BLE001 - a forked child must never return
        _report(f"ztnet: identity: agent start failed: {exc!r}\n")
        os._exit(1)


def _report(text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, text.encode(errors="replace"))


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


@contextlib.contextmanager
def _forwarding(pid: int) -> Iterator[None]:
    """Signals sent to `ztnet run` reach the agent, as they would if it had exec'd."""
    previous = {sig: signal.signal(sig, lambda signum, _frame: _kill(pid, signum))
                for sig in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def supervise(start: Callable[[], NoReturn]) -> int:
    """No terminal, but the caller leads its process group (a shell job), so it cannot
    call setsid itself: fork, and the child starts the agent in a new session."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        run_child(start)
    with _forwarding(pid):
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                return exit_code(status)
            except InterruptedError:
                continue


def relay(start: Callable[[], NoReturn]) -> int:
    """Run the agent on a new pty in a new session; relay until the agent exits."""
    try:
        master, slave = os.openpty()
    except OSError as exc:
        raise IdentityError(f"identity: cannot allocate a pseudo-terminal for the agent: "
                            f"{exc.strerror}") from exc
    ttys = terminal_fds()
    _copy_terminal(ttys[0], slave)
    pid = os.fork()
    if pid == 0:
        os.close(master)
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in ttys:
            os.dup2(slave, fd)
        if slave not in STDIO:
            os.close(slave)
        run_child(start)
    os.close(slave)
    out_fd = 1 if 1 in ttys else 2
    in_fd = 0 if 0 in ttys else None
    pidfd = os.pidfd_open(pid)
    saved = termios.tcgetattr(in_fd) if in_fd is not None else None
    winch = signal.signal(signal.SIGWINCH, lambda *_: _copy_size(ttys[0], master))
    try:
        if in_fd is not None:
            tty.setraw(in_fd)
        with _forwarding(pid):
            _pump(master, in_fd, out_fd, pidfd)
        _, status = os.waitpid(pid, 0)
        return exit_code(status)
    finally:
        signal.signal(signal.SIGWINCH, winch)
        if saved is not None and in_fd is not None:
            termios.tcsetattr(in_fd, termios.TCSAFLUSH, saved)
        os.close(pidfd)
        os.close(master)  # hangs up the agent's pty: what is left of its session gets SIGHUP


def _copy_terminal(source: int, target: int) -> None:
    with contextlib.suppress(termios.error, OSError):
        termios.tcsetattr(target, termios.TCSANOW, termios.tcgetattr(source))
    _copy_size(source, target)


def _copy_size(source: int, target: int) -> None:
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(source, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(target, termios.TIOCSWINSZ, size)


def _pump(master: int, in_fd: int | None, out_fd: int, pidfd: int) -> None:
    """Copy pty output to the terminal and keystrokes to the pty until the agent exits,
    then drain what it wrote before exiting."""
    watched = [master, pidfd] + ([in_fd] if in_fd is not None else [])
    while True:
        try:
            ready, _, _ = select.select(watched, [], [])
        except InterruptedError:
            continue
        if master in ready and not _copy(master, out_fd):
            return
        if in_fd is not None and in_fd in ready and not _copy(in_fd, master):
            watched.remove(in_fd)
            in_fd = None
        if pidfd in ready:
            os.set_blocking(master, False)
            while _copy(master, out_fd):
                pass
            return


def _copy(source: int, target: int) -> bool:
    try:
        data = os.read(source, 65536)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno == errno.EIO:  # every descriptor of the pty's other side is closed
            return False
        raise
    if not data:
        return False
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(target, view):]
        except BlockingIOError:
            select.select([], [target], [])
    return True


def flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
