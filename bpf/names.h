/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Hostname grants in the kernel: every DNS attempt of an agent goes to the resolver the
 * daemon runs for it, and the addresses that resolver handed the agent are allowed for as
 * long as the answer (new connects) and the grant (established sockets) live.
 *
 * Kept apart from the grant decision (verdict.h, sock_addr.c): the hooks call in here
 * only when no address grant matched, through zt_names_decide (socket hooks) and
 * zt_names_egress (egress backstop).
 */
#ifndef ZT_NAMES_H
#define ZT_NAMES_H

#include "events.h"

/* What zt_names_decide returns for a DNS attempt that the calling program must rewrite
 * to the agent's resolver (zt_dns_finish4/6): allowed, not yet sent where it may go. */
#define ZT_ALLOW_REDIRECT 2
/* How long a socket's stamp for its resolver's address stands before it is judged again. */
#define ZT_RESOLVER_STAMP_NS (10ULL * 1000000000ULL)

BPF_TABLE_PINNED("hash", struct zt_learned_key, struct zt_learned_value, zt_learned_v1,
		 ZT_MAX_LEARNED, ZT_PIN_DIR "/zt_learned_v1");
BPF_TABLE_PINNED("array", int, struct zt_resolver, zt_resolvers_v1, ZT_MAX_AGENTS,
		 ZT_PIN_DIR "/zt_resolvers_v1");
BPF_TABLE_PINNED("lru_hash", __u64, struct zt_dns_peer, zt_dns_peers_v1, ZT_MAX_DNS_PEERS,
		 ZT_PIN_DIR "/zt_dns_peers_v1");

static __always_inline __be16 zt_resolver_port(__u32 agent_index)
{
	int index = agent_index;
	struct zt_resolver *resolver = zt_resolvers_v1.lookup(&index);
	return resolver ? resolver->port_be : 0;
}

/* May this agent hold learned addresses at all? Only the agent's own resolver writes
 * them: no resolver, or one for an agent without hostname grants, means none can match,
 * and a refusal then costs one array lookup rather than four hash lookups. */
static __always_inline int zt_may_have_learned(__u32 agent_index)
{
	int index = agent_index;
	struct zt_resolver *resolver = zt_resolvers_v1.lookup(&index);
	return resolver && resolver->port_be && !(resolver->flags & ZT_RESOLVER_NO_NAMES);
}

/* Is (proto, family, addr, port) an address the resolver handed this agent, live at `now`?
 * ``established``: judge by the grant's end (packets of admitted sockets), else by the
 * answer's (new connects and datagrams). Four exact lookups: the protocol or any, the port
 * or any. On a match, `match` gets the grant and the deadline that applies, so that a
 * socket's stamp (socket.h) lapses exactly when the entry does. */
static __always_inline int zt_learned_allowed(__u32 agent_index, __u8 proto, __u8 family,
					      const __u8 *addr, __u16 port, __u64 now,
					      int established, struct zt_grant_value *match)
{
	if (!zt_may_have_learned(agent_index))
		return 0;
	struct zt_learned_key key = {};
	key.agent = agent_index;
	key.family = family;
	if (family == ZT_FAMILY_V4)
		__builtin_memcpy(key.addr, addr, 4);
	else
		__builtin_memcpy(key.addr, addr, 16);
#pragma unroll
	for (int i = 0; i < 4; i++) {
		key.proto = (i & 2) ? ZT_PROTO_ANY : proto;
		key.port_be = (i & 1) ? 0 : bpf_htons(port);
		struct zt_learned_value *value = zt_learned_v1.lookup(&key);
		if (!value)
			continue;
		__u64 until = established ? value->grant_not_after_ns : value->not_after_ns;
		if (now < until) {
			__builtin_memset(match, 0, sizeof(*match));
			match->not_after_ns = until;
			match->grant_id = value->grant_id;
			return 1;
		}
	}
	return 0;
}

/* A DNS attempt (TCP or UDP to port 53, any address): remember where it meant to go and
 * tell the program to send it to the agent's resolver. No resolver: denied. The match
 * stays empty, so no stamp ever lets a later datagram skip this redirect. */
static __always_inline int zt_dns_redirect(void *ctx, const struct zt_subject *subject,
					   struct zt_decision *d)
{
	__be16 port_be = zt_resolver_port(subject->agent.index);
	if (!port_be)
		return 0;
	struct zt_dns_peer peer = {};
	__builtin_memcpy(peer.addr, d->daddr, 16);
	peer.port_be = bpf_htons(d->dport);
	peer.redirect_port_be = port_be;
	peer.family = d->family;
	__u64 cookie = zt_socket_cookie(ctx);
	if (zt_dns_peers_v1.update(&cookie, &peer) < 0)
		return 0;
	d->reason = ZT_REASON_DNS_REDIRECT;
	return ZT_ALLOW_REDIRECT;
}

/* The socket hooks' fallback when no address grant matched: 0 (denied), 1 (a learned
 * address; `match` filled) or ZT_ALLOW_REDIRECT. */
static __always_inline int zt_names_decide(void *ctx, const struct zt_subject *subject,
					   struct zt_decision *d, struct zt_grant_value *match)
{
	if (subject->agent.flags & ZT_AGENT_QUARANTINED)
		return 0;
	if ((d->proto == ZT_PROTO_TCP || d->proto == ZT_PROTO_UDP) && d->dport == ZT_DNS_PORT)
		return zt_dns_redirect(ctx, subject, d);
	return zt_learned_allowed(subject->agent.index, d->proto, d->family, d->daddr, d->dport,
				  d->now, 0, match);
}

static __always_inline int zt_is_loopback6(const __u32 *addr)
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == bpf_htonl(1);
}

/* The egress backstop's fallback: packets to the agent's own resolver, and packets of
 * sockets to learned addresses while their grant lives. */
static __always_inline int zt_names_egress(const struct zt_subject *subject, __u8 proto,
					   __u8 family, const __u8 *addr, __u16 port, __u64 now,
					   struct zt_grant_value *match)
{
	if (subject->agent.flags & ZT_AGENT_QUARANTINED)
		return 0;
	if (proto == ZT_PROTO_TCP || proto == ZT_PROTO_UDP) {
		__be16 resolver = zt_resolver_port(subject->agent.index);
		if (resolver && bpf_htons(port) == resolver) {
			__u32 words[4];
			__builtin_memcpy(words, addr, 16);
			if ((family == ZT_FAMILY_V4 && words[0] == bpf_htonl(0x7f000001)) ||
			    (family == ZT_FAMILY_V6 && zt_is_loopback6(words))) {
				__builtin_memset(match, 0, sizeof(*match));
				match->not_after_ns = now + ZT_RESOLVER_STAMP_NS;
				return 1;
			}
		}
	}
	return zt_learned_allowed(subject->agent.index, proto, family, addr, port, now, 1, match);
}

/* After zt_decide: rewrite a redirected attempt to 127.0.0.1:<resolver port>. */
static __always_inline int zt_dns_finish4(struct bpf_sock_addr *ctx, int verdict)
{
	if (verdict != ZT_ALLOW_REDIRECT)
		return verdict;
	__u64 cookie = zt_socket_cookie(ctx);
	struct zt_dns_peer *peer = zt_dns_peers_v1.lookup(&cookie);
	if (!peer)
		return 0;
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = peer->redirect_port_be;
	return 1;
}

/* The same for IPv6 sockets: ::1, or ::ffff:127.0.0.1 when the socket meant IPv4. */
static __always_inline int zt_dns_finish6(struct bpf_sock_addr *ctx, int verdict)
{
	if (verdict != ZT_ALLOW_REDIRECT)
		return verdict;
	__u64 cookie = zt_socket_cookie(ctx);
	struct zt_dns_peer *peer = zt_dns_peers_v1.lookup(&cookie);
	if (!peer)
		return 0;
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	if (peer->family == ZT_FAMILY_V4) {
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	} else {
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = peer->redirect_port_be;
	return 1;
}

#endif /* ZT_NAMES_H */
