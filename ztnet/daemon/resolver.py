"""ztnet's own resolver: the only source of kernel entries for hostname grants.

The socket hooks send every DNS attempt of an agent (UDP and TCP port 53, any address) to
this resolver, on a loopback port of the agent's own (``zt_resolvers_v1``), so the port a
query arrives on says exactly which agent asked; a DNS transaction id says nothing (16 bits,
chosen by the agent). For each query:

* a name that matches none of the agent's live hostname grants is answered REFUSED (and
  traced): no grant, no lookup, which also stops tunnelling data out through query names;
* a matching A/AAAA query is resolved upstream (from a random port, over TCP when the UDP
  answer is truncated); the CNAME chain is followed from the query name only
  (ztnet.daemon.dnsanswer), private/metadata answers are stripped unless the grant opts
  in, at most ``max_addresses`` addresses per (agent, name) are live at once, and an agent
  holds at most ``max_entries_per_agent`` kernel entries (the map is every agent's);
* every kept address becomes a kernel entry for that agent, each port and the protocol of
  each matching grant, valid for ``min(max(TTL, floor), grant remaining)``; the answer is
  sent only after every entry is in the kernel, its TTLs capped so that no client caches
  longer than the entries live; anything that fails on the way is SERVFAIL.
Other query types for a granted name get an empty answer (NOERROR, no records).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype

from ztnet import logs
from ztnet.daemon.dnsanswer import Chain, build_reply, follow_chain, strip_reason
from ztnet.daemon.resolverconf import QueryRecord, ResolverSettings
from ztnet.datapath.learned import LearnedKey, LearnedTable, LearnedValue, boot_ns
from ztnet.errors import DatapathError
from ztnet.grants.model import IPAddress
from ztnet.grants.names import NameGrant, matching, normalize_query_name

UDP_PAYLOAD = 512          # without EDNS, what a UDP reply may carry
MAX_UDP_PAYLOAD = 1232     # the most we send over UDP even if the client offers more
MAX_QUERY_BYTES = 4096     # a query larger than this is not a stub resolver's
TCP_IDLE_SECONDS = 5.0
MAX_TCP_QUERIES = 32       # per connection
_LENGTH = struct.Struct("!H")


@dataclass
class _Agent:
    index: int
    name: str
    port: int
    sockets: list[socket.socket] = field(default_factory=list)


class Resolver:
    """Per-agent listeners on loopback and the workers that answer them."""

    def __init__(self, table: LearnedTable, deadline_ns: Callable[[float], int],
                 settings: ResolverSettings,
                 on_query: Callable[[QueryRecord], None] | None = None) -> None:
        self.table = table
        self.deadline_ns = deadline_ns
        self.settings = settings
        self.on_query = on_query
        self._grants: tuple[NameGrant, ...] = ()
        self._grant_end_ns: dict[int, int] = {}
        self._agents: dict[int, _Agent] = {}
        self._by_socket: dict[int, _Agent] = {}  # listening socket's fd -> its agent
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._pool = ThreadPoolExecutor(max_workers=settings.workers,
                                        thread_name_prefix="ztnet-dns")
        self._thread: threading.Thread | None = None
        self._stop = False
        # (agent index, name) -> address -> boot ns until which new connects may use it
        self._live: dict[tuple[int, str], dict[IPAddress, int]] = {}
        # (agent index, address) -> the name it was learned for (flow records)
        self._hostnames: collections.OrderedDict[tuple[int, str], str] = \
            collections.OrderedDict()

    # --- configuration -------------------------------------------------------------------

    def configure(self, grants: Sequence[NameGrant], bundle_expires: float,
                  agents: Mapping[int, str], *, kernel_not_after: Callable[[float, float], float],
                  ) -> int:
        """Take a new set of hostname grants and agents (index -> name): listeners for new
        agents (ports into the kernel after they are bound), learned entries of vanished
        grants or agents removed, the rest following their grant's end. Returns how many
        learned entries were removed."""
        ends = {g.grant_id: self.deadline_ns(kernel_not_after(g.not_after, bundle_expires))
                for g in grants}
        with self._lock:
            self._grants = tuple(grants)
            self._grant_end_ns = ends
            kernel_ports = self.table.resolver_ports()
            for index, name in agents.items():
                agent = self._agents.get(index)
                if agent is None or agent.name != name:
                    if agent is not None:
                        self._close_agent(agent)
                    self._agents[index] = self._open_agent(index, name, kernel_ports.get(index))
            for index in [i for i in self._agents if i not in agents]:
                self._close_agent(self._agents.pop(index))
                self.table.set_resolver_port(index, 0)
            # before the lock is released, so no answer for a new name precedes its flag
            named = {grant.agent for grant in grants}
            for index, agent in self._agents.items():
                self.table.set_resolver_port(index, agent.port, names=agent.name in named)
        self._wake()
        return self.table.reconcile(ends, agents.keys())

    def ports(self) -> dict[str, int]:
        with self._lock:
            return {agent.name: agent.port for agent in self._agents.values()}

    @property
    def hostnames(self) -> Mapping[tuple[int, str], str]:
        """(agent index, address) -> the name that agent last resolved to it through this
        resolver; live (read it, do not keep a copy), at most 65,536 entries."""
        return self._hostnames

    def _open_agent(self, index: int, name: str, port: int | None) -> _Agent:
        sockets: list[socket.socket] | None = None
        if port:
            sockets = self._bind_all(port)
        for _ in range(32):
            if sockets is not None:
                break
            sockets = self._bind_all(0)
        if sockets is None:
            raise DatapathError(f"dns: no free loopback port for agent {name}'s resolver")
        bound = sockets[0].getsockname()[1]
        agent = _Agent(index, name, bound, sockets)
        for sock in sockets:
            self._by_socket[sock.fileno()] = agent
            self._selector.register(sock, selectors.EVENT_READ)
        # only now, with every socket listening, may the kernel send the agent's DNS here
        self.table.set_resolver_port(index, bound)
        logs.event("dns resolver listening", agent=name, port=bound)
        return agent

    def _bind_all(self, port: int) -> list[socket.socket] | None:
        """UDP and TCP on 127.0.0.1 and ::1, one port number; None if it is taken."""
        made: list[socket.socket] = []
        try:
            udp4 = _socket(socket.AF_INET, socket.SOCK_DGRAM)
            made.append(udp4)
            udp4.bind((self.settings.bind4, port))
            port = udp4.getsockname()[1]
            tcp4 = _socket(socket.AF_INET, socket.SOCK_STREAM)
            made.append(tcp4)
            tcp4.bind((self.settings.bind4, port))
            tcp4.listen(128)
            try:
                udp6 = _socket(socket.AF_INET6, socket.SOCK_DGRAM)
                made.append(udp6)
                udp6.bind((self.settings.bind6, port))
                tcp6 = _socket(socket.AF_INET6, socket.SOCK_STREAM)
                made.append(tcp6)
                tcp6.bind((self.settings.bind6, port))
                tcp6.listen(128)
            except OSError as exc:
                if exc.errno == 98:  # EADDRINUSE: someone has this port on ::1
                    raise
                for sock in made[2:]:  # no IPv6 loopback here: IPv4 only
                    sock.close()
                del made[2:]
            for sock in made:
                sock.setblocking(False)
            return made
        except OSError:
            for sock in made:
                sock.close()
            return None

    def _close_agent(self, agent: _Agent) -> None:
        for sock in agent.sockets:
            self._by_socket.pop(sock.fileno(), None)
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ztnet-dns-listen", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for agent in self._agents.values():
                self._close_agent(agent)
            self._agents.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def sweep(self, in_use: Callable[[LearnedKey], bool] | None = None) -> int:
        """Free kernel room held by entries past their grant, and (given ``in_use``: is a
        socket of the key's agent connected to its address?) by lapsed answers no socket
        needs; forget lapsed answers."""
        now = boot_ns()
        with self._lock:
            for key in list(self._live):
                live = {a: t for a, t in self._live[key].items() if t > now}
                if live:
                    self._live[key] = live
                else:
                    del self._live[key]
        return self.table.sweep(now, in_use=in_use)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _loop(self) -> None:
        while not self._stop:
            for key, _ in self._selector.select(1.0):
                sock = key.fileobj
                if sock is self._wake_r:
                    try:
                        self._wake_r.recv(512)
                    except OSError:
                        pass
                    continue
                assert isinstance(sock, socket.socket)
                agent = self._agent_of(sock)
                if agent is None:
                    continue
                try:
                    if sock.type == socket.SOCK_DGRAM:
                        data, peer = sock.recvfrom(MAX_QUERY_BYTES)
                        self._pool.submit(self._serve_udp, agent, sock, data, peer)
                    else:
                        conn, _ = sock.accept()
                        self._pool.submit(self._serve_tcp, agent, conn)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    logs.event("dns receive failed", logging.WARNING, agent=agent.name,
                               reason=str(exc))

    def _agent_of(self, sock: socket.socket) -> _Agent | None:
        with self._lock:
            return self._by_socket.get(sock.fileno())

    # --- serving -------------------------------------------------------------------------

    def _serve_udp(self, agent: _Agent, sock: socket.socket, data: bytes,
                   peer: tuple[str, int]) -> None:
        reply = self._safe_answer(agent, data, "udp")
        if reply is None:
            return
        message, wire = reply
        limit = UDP_PAYLOAD
        if message is not None and message.edns >= 0:
            limit = max(UDP_PAYLOAD, min(MAX_UDP_PAYLOAD, message.payload))
        if len(wire) > limit and message is not None:
            wire = _truncated(message)
        try:
            sock.sendto(wire, peer)
        except OSError:
            pass

    def _serve_tcp(self, agent: _Agent, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(True)
            conn.settimeout(TCP_IDLE_SECONDS)
            for _ in range(MAX_TCP_QUERIES):
                try:
                    header = _recv_exact(conn, 2)
                    if header is None:
                        return
                    data = _recv_exact(conn, _LENGTH.unpack(header)[0])
                    if data is None:
                        return
                except OSError:
                    return
                reply = self._safe_answer(agent, data, "tcp")
                if reply is None:
                    return
                try:
                    conn.sendall(_LENGTH.pack(len(reply[1])) + reply[1])
                except OSError:
                    return

    def _safe_answer(self, agent: _Agent, data: bytes,
                     transport: str) -> tuple[dns.message.Message | None, bytes] | None:
        """The reply (the query as parsed, and the wire bytes), or None to stay silent. No
        query, however hostile, takes a worker down."""
        try:
            return self.answer(agent.index, agent.name, data, transport)
        except Exception as exc:  # noqa: BLE001 - hostile input: log and drop, never crash
            logs.event("dns query failed", logging.ERROR, agent=agent.name,
                       reason=f"{type(exc).__name__}: {exc}")
            return None

    def answer(self, index: int, agent: str, data: bytes,
               transport: str = "udp") -> tuple[dns.message.Message | None, bytes] | None:
        """Decide one query of agent ``agent`` (index ``index``); see the module docstring."""
        if len(data) < 12 or len(data) > MAX_QUERY_BYTES:
            return None
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None, _formerr(data)
        if query.flags & dns.flags.QR:
            return None  # a response sent to us: nothing to answer
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            return query, build_reply(query, dns.rcode.NOTIMP).to_wire()
        question = query.question[0]
        qtype = dns.rdatatype.to_text(question.rdtype)
        name = normalize_query_name(question.name.to_text(omit_final_dot=True))
        shown = name or question.name.to_text()[:80]
        grants = matching(self._grants, agent, name, time.time()) if name else []
        if not grants:
            return self._finish(query, dns.rcode.REFUSED, QueryRecord(
                agent, shown, qtype, "refused", reason="no hostname grant matches",
                transport=transport))
        ids = tuple(g.grant_id for g in grants)
        if question.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
            return self._finish(query, dns.rcode.NOERROR, QueryRecord(
                agent, shown, qtype, "nodata", grant_ids=ids, transport=transport,
                reason="only A and AAAA are resolved"))
        started = time.monotonic()
        upstream, why = self._ask_upstream(question.name, question.rdtype)
        upstream_ms = (time.monotonic() - started) * 1000
        if upstream is None:
            return self._finish(query, dns.rcode.SERVFAIL, QueryRecord(
                agent, shown, qtype, "servfail", grant_ids=ids, reason=why,
                upstream_ms=upstream_ms, transport=transport))
        if upstream.rcode() != dns.rcode.NOERROR:
            verdict = dns.rcode.to_text(upstream.rcode()).lower()
            return self._finish(query, upstream.rcode(), QueryRecord(
                agent, shown, qtype, verdict, grant_ids=ids, upstream_ms=upstream_ms,
                transport=transport))
        chain = follow_chain(upstream, question.name, question.rdtype, self.settings.max_chain)
        if chain.broken:
            return self._finish(query, dns.rcode.SERVFAIL, QueryRecord(
                agent, shown, qtype, "servfail", chain=chain.names, grant_ids=ids,
                reason=f"CNAME chain loops or is longer than {self.settings.max_chain}",
                upstream_ms=upstream_ms, transport=transport))
        return self._install_and_reply(query, index, agent, name or shown, qtype, grants, chain,
                                       upstream_ms, transport)

    def _install_and_reply(self, query: dns.message.Message, index: int, agent: str, name: str,
                           qtype: str, grants: list[NameGrant], chain: Chain,
                           upstream_ms: float, transport: str,
                           ) -> tuple[dns.message.Message | None, bytes]:
        started = time.monotonic()
        ids = tuple(g.grant_id for g in grants)
        now_ns = boot_ns()
        floor = max(chain.ttl, self.settings.floor_seconds)
        stripped: list[str] = []
        per_grant: dict[int, list[IPAddress]] = {g.grant_id: [] for g in grants}
        kept: list[IPAddress] = []
        for address, _ttl in chain.addresses:
            reason = strip_reason(address)
            takers = [g for g in grants if reason is None or g.allow_private]
            if not takers:
                stripped.append(f"{address} ({reason})")
                continue
            if address not in kept:
                kept.append(address)
            for g in takers:
                per_grant[g.grant_id].append(address)
        with self._lock:
            live = self._live.setdefault((index, name), {})
            others = {a for a, until in live.items() if until > now_ns and a not in kept}
            room = max(0, self.settings.max_addresses - len(others))
            if len(kept) > room:
                stripped += [f"{a} (over the cap of {self.settings.max_addresses} addresses "
                             "per name)" for a in kept[room:]]
                kept = kept[:room]
            ends = dict(self._grant_end_ns)
        entries: dict[LearnedKey, LearnedValue] = {}
        valid_ns: list[int] = []
        for g in grants:
            end = ends.get(g.grant_id, 0)
            until = min(now_ns + int(floor * 1e9), end)
            if until <= now_ns:
                continue
            for address in per_grant[g.grant_id]:
                if address not in kept:
                    continue
                valid_ns.append(until)
                for port in g.port_list:
                    entries[LearnedKey(index, int(g.proto), address, port)] = \
                        LearnedValue(until, end, g.grant_id)
        try:
            refused = self.table.add(entries, per_agent=self.settings.max_entries_per_agent)
        except DatapathError as exc:
            return self._finish(query, dns.rcode.SERVFAIL, QueryRecord(
                agent, name, qtype, "servfail", chain=chain.names, grant_ids=ids,
                reason=f"kernel entries not installed: {exc}", upstream_ms=upstream_ms,
                transport=transport))
        install_ms = (time.monotonic() - started) * 1000
        if refused:
            entries = {k: v for k, v in entries.items() if k not in refused}
            valid_ns = [v.not_after_ns for v in entries.values()]
        answered = [a for a in kept if any(k.address == a for k in entries)]
        stripped += [f"{a} (over the agent's cap of {self.settings.max_entries_per_agent} "
                     "kernel entries)" for a in kept if a not in answered]
        with self._lock:
            for key, value in entries.items():
                live[key.address] = max(live.get(key.address, 0), value.not_after_ns)
                self._remember(index, str(key.address), name)
        # no client may cache longer than the shortest entry it was given lives
        cap = math.floor((min(valid_ns) - now_ns) / 1e9) if valid_ns else 0
        ttl = max(0, min(chain.ttl, cap))
        final_name = dns.name.from_text(chain.names[-1])
        reply = build_reply(query, dns.rcode.NOERROR, cnames=chain.cnames,
                            addresses=tuple(answered), address_name=final_name,
                            rdtype=query.question[0].rdtype, ttl_cap=ttl)
        record = QueryRecord(agent, name, qtype, "answered",
                             answers=tuple(str(a) for a in answered), stripped=tuple(stripped),
                             chain=chain.names, grant_ids=ids, ttl=ttl,
                             upstream_ms=round(upstream_ms, 3), install_ms=round(install_ms, 3),
                             transport=transport, rcode="NOERROR")
        self._trace(record)
        return query, reply.to_wire()

    def _remember(self, index: int, address: str, name: str) -> None:
        key = (index, address)
        self._hostnames[key] = name
        self._hostnames.move_to_end(key)
        while len(self._hostnames) > 65536:
            self._hostnames.popitem(last=False)

    def _finish(self, query: dns.message.Message, rcode: int,
                record: QueryRecord) -> tuple[dns.message.Message, bytes]:
        self._trace(dataclasses.replace(record, rcode=dns.rcode.Rcode.to_text(rcode)))
        return query, build_reply(query, rcode).to_wire()

    def _trace(self, record: QueryRecord) -> None:
        if self.on_query is not None:
            try:
                self.on_query(record)
            except Exception as exc:  # noqa: BLE001 - a sink must not stop answers
                logs.event("dns trace failed", logging.WARNING, reason=str(exc))

    def _ask_upstream(self, qname: dns.name.Name,
                      rdtype: int) -> tuple[dns.message.Message | None, str]:
        if not self.settings.upstreams:
            return None, "no upstream resolver configured"
        request = dns.message.make_query(qname, dns.rdatatype.RdataType.make(rdtype))
        request.flags |= dns.flags.RD
        why = ""
        for host, port in self.settings.upstreams:
            try:
                response = dns.query.udp(request, host, port=port, timeout=self.settings.timeout)
                if response.flags & dns.flags.TC:
                    response = dns.query.tcp(request, host, port=port,
                                             timeout=self.settings.timeout)
                return response, ""
            except (dns.exception.DNSException, OSError, EOFError) as exc:
                why = f"upstream {host}:{port}: {type(exc).__name__}: {exc}"
        return None, why


def _socket(family: int, kind: int) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = conn.recv(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def _truncated(query: dns.message.Message) -> bytes:
    """The question alone with TC set: the client retries over TCP."""
    reply = dns.message.make_response(query)
    reply.flags |= dns.flags.TC | dns.flags.RA
    return reply.to_wire()


def _formerr(data: bytes) -> bytes:
    """FORMERR for a query that does not parse: its id, no question."""
    ident = data[:2]
    return ident + struct.pack("!HHHHH", 0x8001, 0, 0, 0, 0)
