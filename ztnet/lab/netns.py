"""Network namespaces for tests, demos and benchmarks.

Everything here creates throw-away namespaces under ``/run/netns`` whose names start with a
caller-chosen prefix, so a crashed run's leftovers can be found and removed by name
(:func:`cleanup_stale`) before the next run reuses the prefix.

* :class:`NetnsPair` -- ``<prefix>-a`` and ``<prefix>-b`` joined by a veth pair, IPv4 and IPv6
  (no DAD) on both ends; the usual "agent host / peer host" shape.
* :class:`BlackholeNetns` -- ``<prefix>-bh``: default routes into a dummy interface, so every
  non-blocking ``connect()`` reports ``EINPROGRESS`` and every UDP ``sendto()`` succeeds while
  no packet reaches anything. Used by tests that compare errnos only.

Processes enter namespaces with ``nsenter --net=/run/netns/NAME`` (:func:`nsenter_argv`), not
``ip netns exec``: the latter remounts /sys inside the command, which hides a hybrid
``/sys/fs/cgroup/unified`` mount that agent cgroups live in.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import count
from types import TracebackType
from typing import Any, Self, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from ztnet.errors import LabError

NETNS_DIR = "/run/netns"
IFNAMSIZ = 16  # includes the trailing NUL, so names have at most 15 characters
# Each lab object names its namespaces "<prefix>-<role>" with roles of at most 2 characters,
# and uses the same names for host-side links, so the prefix must leave room for "-xx".
MAX_PREFIX_LEN = IFNAMSIZ - 1 - 3
_PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9.]*$")

_IFF_UP = 0x1
_IFF_RUNNING = 0x40  # set once the kernel considers the link operational (linkwatch ran)
_IFA_F_NODAD = 0x02
_IFA_F_DADFAILED = 0x08
_IFA_F_TENTATIVE = 0x40

_instances = count(1)
T = TypeVar("T")


def netns_path(name: str) -> str:
    """The bind-mount path of a named namespace, as ``ip netns`` and nsenter use it."""
    if not name or "/" in name:
        raise ValueError(f"lab: bad namespace name {name!r}")
    return f"{NETNS_DIR}/{name}"


def nsenter_argv(name: str, argv: Sequence[str]) -> list[str]:
    """An argv running ``argv`` inside namespace ``name`` (network namespace only)."""
    return ["nsenter", f"--net={netns_path(name)}", "--", *argv]


def default_prefix() -> str:
    """A prefix unique to this process and call: ``zt<pid hex>n<counter hex>``.

    The pid makes concurrent runs disjoint; the counter makes instances in one run disjoint. A
    crashed run's leftovers can only collide with a later process reusing the same pid, and
    :func:`cleanup_stale` removes those before the new objects are created.
    """
    return f"zt{os.getpid():x}n{next(_instances):x}"


_DEFAULT_PREFIX_RE = re.compile(r"^zt([0-9a-f]+)n[0-9a-f]+-")


def cleanup_orphans() -> list[str]:
    """Remove namespaces with a :func:`default_prefix` name whose creating
    process is gone (a run that crashed or was killed before its cleanup)."""
    removed = []
    for name in list_netns("zt"):
        match = _DEFAULT_PREFIX_RE.match(name)
        if match and not os.path.exists(f"/proc/{int(match.group(1), 16)}"):
            if remove_netns(name):
                removed.append(name)
    return removed


def check_prefix(prefix: str) -> str:
    if len(prefix) > MAX_PREFIX_LEN or not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"lab: prefix {prefix!r} must match {_PREFIX_RE.pattern} and have at most "
            f"{MAX_PREFIX_LEN} characters (interface names are limited to {IFNAMSIZ - 1})"
        )
    return prefix


def list_netns(prefix: str = "") -> list[str]:
    return sorted(n for n in pr_netns.listnetns(NETNS_DIR) if n.startswith(prefix))


def create_netns(name: str) -> None:
    try:
        pr_netns.create(netns_path(name))
    except OSError as exc:
        raise LabError(f"lab: create namespace {name} failed: {exc}") from exc


def _pids_in_netns(path: str) -> list[int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return []
    # Never sweep our own or the host's namespace, even if someone bind-mounted it under a
    # lab name ("ip netns attach"): that would kill every process on the host.
    for pid in ("self", "1"):
        with contextlib.suppress(OSError):
            own = os.stat(f"/proc/{pid}/ns/net")
            if (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino):
                return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):  # the process may exit while we look
            ns = os.stat(f"/proc/{entry}/ns/net")
            if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
                pids.append(int(entry))
    return pids


def remove_netns(name: str) -> bool:
    """Remove a namespace and kill what still runs in it; False if it did not exist.

    Unmounting only drops the name: a process left inside (a server of a crashed run) would
    keep the namespace, its links and sockets alive forever. Namespaces with our prefixes are
    created by this module, so whatever runs in them was started by a lab user.
    """
    path = netns_path(name)
    for pid in _pids_in_netns(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        pr_netns.remove(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise LabError(f"lab: remove namespace {name} failed: {exc}") from exc
    return True


def cleanup_stale(prefix: str) -> list[str]:
    """Remove namespaces and host-side links whose names start with ``prefix``.

    Returns what was removed (namespaces, then links). Safe to call when nothing matches.
    """
    if not prefix:
        raise ValueError("lab: cleanup_stale needs a non-empty prefix")
    return _cleanup(lambda name: name.startswith(prefix))


def _cleanup(match: Callable[[str], bool]) -> list[str]:
    removed = [name for name in list_netns() if match(name) and remove_netns(name)]
    with IPRoute() as ipr:
        for link in ipr.get_links():
            ifname = link.get("IFLA_IFNAME") or ""
            if match(ifname):
                with contextlib.suppress(NetlinkError):  # a veth peer vanishes with its twin
                    ipr.link("del", index=link["index"])
                    removed.append(ifname)
    return removed


def poll_until(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Call ``check`` until it returns non-None; raise LabError naming ``what`` at the deadline.

    For state the kernel changes asynchronously (link carrier, DAD) or another process writes
    (capture files), where there is no event to wait on cheaply. The short, growing interval
    keeps the common case fast without spinning.
    """
    deadline = time.monotonic() + timeout
    interval = 0.002
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise LabError(f"lab: timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 2, 0.05)


def _ipr(name: str) -> Any:
    # flags=0: never create the namespace behind our back (pyroute2's default is O_CREAT).
    return IPRoute(netns=netns_path(name), flags=0)


def _ifindex(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"lab: interface {ifname} not found")
    return int(found[0])


def _wait_link_running(ipr: Any, ifname: str, timeout: float = 10.0) -> None:
    """Wait until the kernel reports the link operational.

    A veth end only gets carrier once its peer is up, and the qdisc is attached later by
    linkwatch; until then packets are dropped silently, so "set up" is not "ready".
    """
    index = _ifindex(ipr, ifname)

    def running() -> bool | None:
        flags = int(ipr.get_links(index)[0]["flags"])
        return True if flags & _IFF_UP and flags & _IFF_RUNNING else None

    poll_until(running, timeout, f"link {ifname} to be running")


def _wait_addresses_usable(
    ipr: Any, ifname: str, addrs: Sequence[str], timeout: float = 10.0
) -> None:
    """Wait until every address is present and out of the tentative (DAD) state."""
    index = _ifindex(ipr, ifname)
    wanted = {ipaddress.ip_address(a) for a in addrs}

    def usable() -> bool | None:
        ready = set()
        for msg in ipr.get_addr(index=index):
            flags = int(msg.get("IFA_FLAGS") or msg["flags"])
            if flags & _IFA_F_DADFAILED:
                raise LabError(f"lab: duplicate address detection failed on {ifname}")
            if not flags & _IFA_F_TENTATIVE:
                ready.add(ipaddress.ip_address(msg.get("IFA_ADDRESS")))
        return True if wanted <= ready else None

    poll_until(usable, timeout, f"addresses {sorted(addrs)} on {ifname}")


def _add_address(
    ipr: Any, ifname: str, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
) -> None:
    kwargs: dict[str, Any] = {}
    if iface.version == 6:
        # nodad: the address is usable at once instead of after ~1 s of duplicate detection;
        # nothing else can own an address inside a namespace we just created.
        kwargs["flags"] = _IFA_F_NODAD
    ipr.addr(
        "add",
        index=_ifindex(ipr, ifname),
        address=str(iface.ip),
        prefixlen=iface.network.prefixlen,
        **kwargs,
    )


def _loopback_up(ipr: Any) -> None:
    ipr.link("set", index=_ifindex(ipr, "lo"), state="up")
    _wait_link_running(ipr, "lo")


class _Lab:
    """Shared life cycle: clean stale names, build transactionally, always tear down."""

    ROLES: tuple[str, ...] = ()

    def __init__(self, prefix: str | None) -> None:
        self.prefix = check_prefix(prefix if prefix is not None else default_prefix())
        self.namespaces = tuple(f"{self.prefix}-{role}" for role in self.ROLES)
        self._created: list[str] = []

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def create(self) -> Self:
        # Exactly our own names, not a prefix match: "P-b" must not take "P-bh" of a
        # BlackholeNetns sharing the prefix, nor prefix "zt1" the namespaces of "zt12".
        own = set(self.namespaces)
        _cleanup(own.__contains__)
        try:
            for name in self.namespaces:
                create_netns(name)
                self._created.append(name)
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove every namespace (and with it every link) this object created. Idempotent."""
        errors = []
        while self._created:
            name = self._created.pop()
            try:
                remove_netns(name)
            except LabError as exc:
                errors.append(str(exc))
        if errors:
            raise LabError("; ".join(errors))

    def _build(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One side of a :class:`NetnsPair`: its namespace, interface and addresses."""

    netns: str
    iface: str
    ipv4: str
    ipv6: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this endpoint's namespace."""
        return nsenter_argv(self.netns, argv)


class NetnsPair(_Lab):
    """Two namespaces joined by a veth pair.

    ``a`` has 10.199.N.1/24 and fd00:199:N::1/64 on ``veth-a``; ``b`` has .2 / ::2 on
    ``veth-b`` (N = ``index``). The veth is created with its peer directly in ``b``, so it
    never exists in the host namespace and removing the namespaces removes it.
    """

    ROLES = ("a", "b")

    def __init__(self, prefix: str | None = None, *, index: int = 1) -> None:
        super().__init__(prefix)
        if not 0 <= index <= 255:
            raise ValueError(f"lab: index {index} out of range 0..255")
        self.ipv4_net = ipaddress.IPv4Network(f"10.199.{index}.0/24")
        self.ipv6_net = ipaddress.IPv6Network(f"fd00:199:{index:x}::/64")
        ns_a, ns_b = self.namespaces
        self.a = Endpoint(ns_a, "veth-a", str(self.ipv4_net[1]), str(self.ipv6_net[1]))
        self.b = Endpoint(ns_b, "veth-b", str(self.ipv4_net[2]), str(self.ipv6_net[2]))

    def _build(self) -> None:
        a, b = self.a, self.b
        with _ipr(a.netns) as ipa, _ipr(b.netns) as ipb:
            ipa.link(
                "add",
                ifname=a.iface,
                kind="veth",
                peer={"ifname": b.iface, "net_ns_fd": netns_path(b.netns)},
            )
            for ipr, end in ((ipa, a), (ipb, b)):
                _loopback_up(ipr)
                _add_address(ipr, end.iface, ipaddress.ip_interface(f"{end.ipv4}/24"))
                _add_address(ipr, end.iface, ipaddress.ip_interface(f"{end.ipv6}/64"))
                ipr.link("set", index=_ifindex(ipr, end.iface), state="up")
            for ipr, end in ((ipa, a), (ipb, b)):
                _wait_link_running(ipr, end.iface)
                _wait_addresses_usable(ipr, end.iface, [end.ipv4, end.ipv6])


def _add_discard_link(ipr: Any, ifname: str) -> str:
    """Add a link that silently discards what is sent through it; returns its kind.

    ``dummy`` is the usual choice but some kernels (ours) are built without it. ``ifb`` drops
    every packet that was not redirected to it by tc, is NOARP (no neighbour resolution to
    stall on) and always has carrier, so for routed traffic it behaves exactly like dummy.
    """
    for kind in ("dummy", "ifb"):
        try:
            ipr.link("add", ifname=ifname, kind=kind)
        except NetlinkError as exc:
            if exc.code != errno.EOPNOTSUPP:
                raise LabError(f"lab: add {kind} link {ifname} failed: {exc}") from exc
        else:
            return kind
    raise LabError("lab: the kernel has neither dummy nor ifb links for a blackhole namespace")


class BlackholeNetns(_Lab):
    """One namespace whose default routes (v4 and v6) point into a discarding interface.

    A dummy (or ifb) device accepts and discards every packet, so the socket layer behaves as
    if a real, silent network were there: a non-blocking TCP ``connect()`` to any address
    returns ``EINPROGRESS`` and UDP ``sendto()`` succeeds, while nothing leaves the namespace.
    """

    ROLES = ("bh",)
    IFACE = "bh0"

    def __init__(
        self,
        prefix: str | None = None,
        *,
        ipv4: str = "10.254.0.1/24",
        ipv6: str = "fd00:254::1/64",
    ) -> None:
        super().__init__(prefix)
        (self.netns,) = self.namespaces
        self.iface = self.IFACE
        self.kind = ""  # "dummy" or "ifb", known once created
        self.ipv4_iface = ipaddress.IPv4Interface(ipv4)
        self.ipv6_iface = ipaddress.IPv6Interface(ipv6)
        # Source addresses the kernel will pick for any destination.
        self.ipv4 = str(self.ipv4_iface.ip)
        self.ipv6 = str(self.ipv6_iface.ip)

    def argv(self, argv: Sequence[str]) -> list[str]:
        return nsenter_argv(self.netns, argv)

    def _build(self) -> None:
        with _ipr(self.netns) as ipr:
            _loopback_up(ipr)
            self.kind = _add_discard_link(ipr, self.iface)
            _add_address(ipr, self.iface, self.ipv4_iface)
            _add_address(ipr, self.iface, self.ipv6_iface)
            index = _ifindex(ipr, self.iface)
            ipr.link("set", index=index, state="up")
            _wait_link_running(ipr, self.iface)
            _wait_addresses_usable(ipr, self.iface, [self.ipv4, self.ipv6])
            ipr.route("add", dst="0.0.0.0/0", oif=index)
            ipr.route("add", family=10, dst="::/0", oif=index)  # 10 = AF_INET6
