"""Packet capture inside a lab namespace, as a subprocess the test drives.

:class:`Sniffer` runs ``python -m ztnet.lab.sniff --iface IF [--bpf-filter EXPR] --out FILE``
inside a namespace (nsenter, see :mod:`ztnet.lab.netns`). The child opens the capture socket,
starts scapy's ``AsyncSniffer`` on it and prints ``READY`` from ``started_callback``: when
``Sniffer.start()`` returns, packets are being captured. Each packet becomes one JSON line in
FILE as it arrives (:class:`CapturedPacket`); on SIGTERM/SIGINT the child stops the sniffer,
then drains whatever is still queued on the socket before it exits, so stopping right after
the traffic loses nothing that reached the interface.

Proving that something did *not* arrive
---------------------------------------
An empty capture proves nothing on its own: the sniffer may have looked at the wrong
interface, started late or been stopped early. Tests that assert absence therefore follow
this pattern::

    with Sniffer(pair.b.netns, pair.b.iface, "udp or tcp") as sn:
        run_agent_traffic()                       # what must NOT reach b
        send_positive_control()                   # allowed traffic sent from outside the agent
        sn.wait_for(lambda p: p.dport == CONTROL_PORT)   # proves the capture sees the path
    assert not [p for p in sn.captured if p.dport == FORBIDDEN_PORT]

The positive control travels the same path *after* the traffic under test, so once it has
been captured, a forbidden packet that had left would have been captured before it.

A BPF filter expression needs libpcap (Debian: ``libpcap0.8``) to compile; without a filter
the capture works without it.
"""

from __future__ import annotations

import argparse
import json
import select
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from ztnet.lab.netns import poll_until
from ztnet.lab.servers import READY, NetnsProcess


@dataclass(frozen=True, slots=True)
class CapturedPacket:
    """One captured frame. For non-IP frames ``family`` is 0 and the IP fields are None.

    ``length`` is the IP packet length (header + payload), or the frame length for non-IP.
    ``proto`` is the upper-layer protocol after any IPv6 extension headers (6, 17, 1, 58 …).
    """

    time: float
    family: int
    src: str | None
    dst: str | None
    proto: int | None
    sport: int | None
    dport: int | None
    length: int
    tcp_flags: str | None  # scapy notation: "S", "SA", "PA", "R" …
    icmp_type: int | None
    summary: str

    @property
    def is_syn(self) -> bool:
        """A connection attempt: SYN without ACK."""
        return self.tcp_flags is not None and "S" in self.tcp_flags and "A" not in self.tcp_flags

    @property
    def is_bare_reset(self) -> bool:
        """A RST alone, without ACK: what a host's TCP stack answers (RFC 9293 3.10.7.1), from
        its per-namespace control socket, to an ACK-bearing segment for a socket that no longer
        exists, as when the peer of a connection ztnet cut keeps sending. No agent socket sends
        it (a socket's own abort sends RST+ACK), so no cgroup hook sees it, and it carries
        nothing of the agent's."""
        return self.tcp_flags == "R"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> CapturedPacket:
        return cls(**json.loads(line))


def read_capture(path: Path) -> list[CapturedPacket]:
    """Parse a capture file; a trailing line still being written is ignored."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    complete = text[: text.rfind("\n") + 1]
    return [CapturedPacket.from_json(line) for line in complete.splitlines() if line]


class Sniffer:
    """Capture on ``iface`` inside ``netns`` (None: the caller's namespace).

    ``start()``/``__enter__`` returns once capture is live; :meth:`wait_for` polls the growing
    capture; ``stop()``/``__exit__`` ends the child and leaves the full list in ``captured``.
    """

    def __init__(
        self,
        netns: str | None,
        iface: str,
        bpf_filter: str = "",
        *,
        ready_timeout: float = 30.0,
    ) -> None:
        self.netns = netns
        self.iface = iface
        self.bpf_filter = bpf_filter
        self.captured: list[CapturedPacket] = []
        self._dir = Path(tempfile.mkdtemp(prefix="ztnet-sniff-"))
        self.out = self._dir / "capture.jsonl"
        argv = [sys.executable, "-m", "ztnet.lab.sniff", "--iface", iface, "--out", str(self.out)]
        if bpf_filter:
            argv += ["--bpf-filter", bpf_filter]
        self._proc = NetnsProcess(netns, argv, ready_timeout=ready_timeout)
        self._stopped = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(check=exc_type is None)

    def start(self) -> Self:
        try:
            self._proc.start()
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        return self

    @property
    def pid(self) -> int:
        return self._proc.pid

    def packets(self) -> list[CapturedPacket]:
        """Everything captured so far (all of it, once stopped)."""
        return self.captured if self._stopped else read_capture(self.out)

    def wait_for(
        self,
        predicate: Callable[[CapturedPacket], bool],
        timeout: float = 10.0,
        what: str = "a matching packet",
    ) -> CapturedPacket:
        """The first captured packet satisfying ``predicate``; LabError after ``timeout``."""

        def check() -> CapturedPacket | None:
            return next((p for p in self.packets() if predicate(p)), None)

        return poll_until(check, timeout, f"{what} on {self.iface}")

    def stop(self, *, check: bool = True) -> list[CapturedPacket]:
        """Stop capturing (the child flushes first) and return every captured packet."""
        if not self._stopped:
            try:
                self._proc.stop(check=check)
                self.captured = read_capture(self.out)
            finally:
                self._stopped = True
                shutil.rmtree(self._dir, ignore_errors=True)
        return self.captured


# --- the capture process itself ------------------------------------------------------------


def _record(pkt: Any) -> CapturedPacket:
    # Imported here: the parent process only needs CapturedPacket, and scapy takes ~1 s to load.
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import (
        IPv6,
        IPv6ExtHdrDestOpt,
        IPv6ExtHdrFragment,
        IPv6ExtHdrHopByHop,
        IPv6ExtHdrRouting,
    )

    family, src, dst, proto, length = 0, None, None, None, len(pkt)
    upper: Any = None
    if IP in pkt:
        ip = pkt[IP]
        family, src, dst, proto, length = 4, ip.src, ip.dst, int(ip.proto), int(ip.len)
        upper = ip.payload
    elif IPv6 in pkt:
        ip6 = pkt[IPv6]
        family, src, dst, length = 6, ip6.src, ip6.dst, 40 + int(ip6.plen)
        proto, upper = int(ip6.nh), ip6.payload
        ext = (IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting, IPv6ExtHdrFragment)
        while isinstance(upper, ext):  # MLD reports hide ICMPv6 behind hop-by-hop options
            proto, upper = int(upper.nh), upper.payload
    sport = dport = icmp_type = None
    tcp_flags = None
    if isinstance(upper, TCP | UDP):
        sport, dport = int(upper.sport), int(upper.dport)
        if isinstance(upper, TCP):
            tcp_flags = str(upper.flags)
    elif proto in (1, 58) and upper is not None and "type" in upper.fields:
        icmp_type = int(upper.type)
    return CapturedPacket(
        time=float(pkt.time),
        family=family,
        src=src,
        dst=dst,
        proto=proto,
        sport=sport,
        dport=dport,
        length=length,
        tcp_flags=tcp_flags,
        icmp_type=icmp_type,
        summary=pkt.summary(),
    )


def capture(iface: str, bpf_filter: str, out: IO[str]) -> None:
    """Capture until SIGTERM/SIGINT, writing one JSON line per packet to ``out``."""
    # Registering the layers is what makes the socket dissect frames as Ether/IP/IPv6
    # instead of Raw; _record needs them anyway.
    import scapy.layers.inet6  # noqa: F401
    from scapy.config import conf
    from scapy.sendrecv import AsyncSniffer

    def write(pkt: Any) -> None:
        out.write(_record(pkt).to_json() + "\n")
        out.flush()  # the parent polls the file while we capture

    # Block the stop signals in every thread (the sniffer thread inherits the mask) and take
    # them synchronously below, so a signal can never interrupt a half-written line.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    # Our own socket (not sniff(iface=...)) so it outlives AsyncSniffer.stop(): scapy's loop
    # exits on stop without reading what is still queued, and we drain that below.
    sock = conf.L2listen(iface=iface, filter=bpf_filter or None)
    sniffer = AsyncSniffer(
        opened_socket=sock,
        prn=write,
        store=False,
        started_callback=lambda: print(READY, flush=True),
    )
    sniffer.start()
    signal.sigwait(stop_signals)
    sniffer.stop(join=True)
    if getattr(sniffer, "exception", None) is not None:
        raise sniffer.exception  # type: ignore[misc]
    while select.select([sock], [], [], 0)[0]:
        pkt = sock.recv()
        if pkt is not None:
            write(pkt)
    sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztnet.lab.sniff", description=__doc__)
    parser.add_argument("--iface", required=True)
    parser.add_argument("--bpf-filter", default="", help="tcpdump syntax; needs libpcap")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    with args.out.open("a") as out:
        capture(args.iface, args.bpf_filter, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
