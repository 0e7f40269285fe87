/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Socket-level enforcement: cgroup/connect4, connect6, sendmsg4, sendmsg6.
 * Returning 0 makes the syscall fail with EPERM before any packet exists.
 */
#include <uapi/linux/in.h>   /* IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP */
#include <uapi/linux/in6.h>  /* IPPROTO_ICMPV6 */
#include "names.h"

static __always_inline __u8 zt_socket_proto(struct bpf_sock_addr *ctx)
{
	__u32 protocol = ctx->protocol;
	if (protocol == IPPROTO_TCP)
		return ZT_PROTO_TCP;
	if (protocol == IPPROTO_UDP)
		return ZT_PROTO_UDP;
	if (protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6)
		return ZT_PROTO_ICMP;
	return (__u8)protocol;
}

/* The counters a hook's verdicts go to (enum zt_counter), named by the hook
 * rather than derived from the enum's order. */
struct zt_hook_counters {
	int allowed;
	int denied;
};

#define ZT_CONNECT_COUNTERS ((struct zt_hook_counters){ZT_CNT_CONNECT_ALLOW, ZT_CNT_CONNECT_DENY})
#define ZT_SENDMSG_COUNTERS ((struct zt_hook_counters){ZT_CNT_SENDMSG_ALLOW, ZT_CNT_SENDMSG_DENY})

/* Unconnected UDP: a datagram to the destination this socket's last allowed
 * datagram went to, from the same agent, passes on the socket's stamp without
 * another trie walk or event; the flow counts it (egress). */
static __always_inline int zt_send_stamped(struct bpf_sock_addr *ctx, struct zt_config *cfg,
					   struct zt_decision *d, const __u8 *addr,
					   struct zt_sock **sock_out)
{
	struct zt_sock *sock = zt_sock_get(ctx->sk, 0);
	*sock_out = sock;
	if (!sock)
		return 0;
	if (sock->flags & ZT_SOCK_CUT)
		return -1;
	if (!zt_stamp_holds(&sock->send, cfg->generation, d->now, d->proto, d->family, addr,
			    d->dport) || sock->send.cgroup_id != d->cgroup_id)
		return 0;
	zt_count(ZT_CNT_SENDMSG_ALLOW);
	zt_count(ZT_CNT_SENDMSG_STAMPED);
	zt_account_decision(sock->flow.agent, 1);
	return 1;
}

/* The verdict on an allowed socket: describe its flow in its storage (the
 * first allowed decision wins) and, for sendmsg, stamp the destination. */
static __always_inline const struct zt_flow *zt_track_socket(struct bpf_sock_addr *ctx,
							     struct zt_sock *sock,
							     const struct zt_decision *d,
							     const struct zt_grant_value *match,
							     __u32 generation, const __u8 *addr,
							     int by_grant)
{
	if (!sock)
		sock = zt_sock_get(ctx->sk, 1);
	if (!sock) {
		zt_count(ZT_CNT_FLOWS_UNTRACKED);
		return 0;
	}
	/* audited datagrams are never stamped: each one is recorded */
	if (d->kind == ZT_EV_SENDMSG && !d->audit)
		zt_stamp_set(&sock->send, match, generation, d->proto, d->family, addr, d->dport,
			     d->cgroup_id);
	/* a connected socket's packets all go to this destination: stamp the
	 * egress verdict now, so that its first packet is not judged again
	 * (trie walk, agent lookup, a second storage lookup). Only a verdict the
	 * egress judgement would give: an address grant (learned addresses
	 * stamp by the answer's deadline at connect, by the grant's in egress),
	 * not audited. The stamp is the verdict of the agent that connected (a
	 * socket hook cannot read the socket's own cgroup, which egress judges
	 * by); they differ only for a socket handed between agents before its
	 * first packet, and one handed over connected carries its stamp anyway. */
	if (d->kind == ZT_EV_CONNECT && by_grant && !d->audit &&
	    (d->proto == ZT_PROTO_TCP || d->proto == ZT_PROTO_UDP))
		zt_stamp_set(&sock->egress, match, generation, d->proto, d->family, addr, d->dport,
			     d->cgroup_id);
	if (sock->flags & ZT_SOCK_TRACKED)
		return 0;
	zt_describe_flow(&sock->flow, d);
	sock->flow.first_ns = d->now;
	sock->flow.last_ns = d->now;
	sock->flags |= ZT_SOCK_TRACKED;
	return &sock->flow;
}

static __always_inline int zt_decide(struct bpf_sock_addr *ctx, __u8 family,
				     const __u8 *addr, struct zt_hook_counters counters,
				     __u8 kind)
{
	struct zt_config *cfg = zt_get_config();
	if (!cfg)
		return 0;
	struct zt_decision d = {};
	d.now = bpf_ktime_get_boot_ns();
	d.kind = kind;
	d.family = family;
	d.proto = zt_socket_proto(ctx);
	if (family == ZT_FAMILY_V4)
		__builtin_memcpy(d.daddr, addr, 4);
	else
		__builtin_memcpy(d.daddr, addr, 16);
	if (d.proto == ZT_PROTO_TCP || d.proto == ZT_PROTO_UDP)
		d.dport = bpf_ntohs((__u16)ctx->user_port);
	d.cgroup_id = bpf_get_current_ancestor_cgroup_id(cfg->agent_level);

	struct zt_sock *sock = 0;
	if (kind == ZT_EV_SENDMSG) {
		int stamped = zt_send_stamped(ctx, cfg, &d, addr, &sock);
		if (stamped > 0)
			return 1;
		if (stamped < 0) {  /* a byte budget cut this socket */
			zt_count(counters.denied);
			return 0;
		}
	}

	struct zt_subject subject = {};
	if (!zt_find_agent(d.cgroup_id, cfg, &subject)) {
		zt_count(counters.denied);
		d.reason = ZT_REASON_NOT_AGENT;
		zt_emit_decision(ctx, &d, 0, cfg);
		return 0;
	}
	d.agent = subject.agent.index;
	struct zt_grant_value match = {};
	d.allowed = zt_allowed(&subject, d.proto, family, addr, d.dport, d.now, &match);
	int by_grant = d.allowed;
	if (!d.allowed)  /* DNS redirect, learned addresses (names.h) */
		d.allowed = zt_names_decide(ctx, &subject, &d, &match);
	if (!d.allowed) {
		d.reason = zt_refusal(&subject);
		if (zt_audit_admits(&subject, family, addr))
			d.allowed = d.audit = 1;
	} else if (zt_window_spent(&match, d.now)) {
		d.allowed = 0;
		d.reason = ZT_REASON_BUDGET;
	}
	by_grant = by_grant && d.allowed == 1;
	d.grant_id = match.grant_id;
	zt_count(d.allowed ? counters.allowed : counters.denied);
	zt_account_decision(subject.agent.index, d.allowed);
	const struct zt_flow *described = 0;
	if (d.allowed)
		described = zt_track_socket(ctx, sock, &d, &match, cfg->generation, addr,
					    by_grant);
	zt_emit_decision(ctx, &d, described, cfg);
	return d.allowed;
}

static __always_inline int zt_decide4(struct bpf_sock_addr *ctx,
				      struct zt_hook_counters counters, __u8 kind)
{
	__u32 daddr = ctx->user_ip4;
	return zt_decide(ctx, ZT_FAMILY_V4, (const __u8 *)&daddr, counters, kind);
}

static __always_inline int zt_decide6(struct bpf_sock_addr *ctx,
				      struct zt_hook_counters counters, __u8 kind)
{
	__u32 daddr[4];
	daddr[0] = ctx->user_ip6[0];
	daddr[1] = ctx->user_ip6[1];
	daddr[2] = ctx->user_ip6[2];
	daddr[3] = ctx->user_ip6[3];
	if (zt_is_v4_mapped(daddr))
		return zt_decide(ctx, ZT_FAMILY_V4, (const __u8 *)&daddr[3], counters, kind);
	return zt_decide(ctx, ZT_FAMILY_V6, (const __u8 *)daddr, counters, kind);
}

int zt_connect4(struct bpf_sock_addr *ctx)
{
	return zt_dns_finish4(ctx, zt_decide4(ctx, ZT_CONNECT_COUNTERS, ZT_EV_CONNECT));
}

int zt_connect6(struct bpf_sock_addr *ctx)
{
	return zt_dns_finish6(ctx, zt_decide6(ctx, ZT_CONNECT_COUNTERS, ZT_EV_CONNECT));
}

int zt_sendmsg4(struct bpf_sock_addr *ctx)
{
	return zt_dns_finish4(ctx, zt_decide4(ctx, ZT_SENDMSG_COUNTERS, ZT_EV_SENDMSG));
}

int zt_sendmsg6(struct bpf_sock_addr *ctx)
{
	return zt_dns_finish6(ctx, zt_decide6(ctx, ZT_SENDMSG_COUNTERS, ZT_EV_SENDMSG));
}
