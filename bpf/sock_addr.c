/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Socket-level enforcement: cgroup/connect4, connect6, sendmsg4, sendmsg6.
 * Returning 0 makes the syscall fail with EPERM before any packet exists.
 */
#include <uapi/linux/in.h>   /* IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP */
#include <uapi/linux/in6.h>  /* IPPROTO_ICMPV6 */
#include "events.h"

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

static __always_inline int zt_decide(struct bpf_sock_addr *ctx, __u8 family,
				     const __u8 *addr, struct zt_hook_counters counters,
				     __u8 kind)
{
	struct zt_config *cfg = zt_get_config();
	if (!cfg)
		return 0;
	struct zt_decision d = {};
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

	struct zt_subject subject = {};
	if (!zt_find_agent(d.cgroup_id, cfg, &subject)) {
		zt_count(counters.denied);
		d.reason = ZT_REASON_NOT_AGENT;
		zt_emit_decision(ctx, &d);
		return 0;
	}
	d.agent = subject.agent.index;
	d.allowed = zt_allowed(&subject, d.proto, family, addr, d.dport, &d.grant_id);
	if (!d.allowed)
		d.reason = (subject.agent.flags & ZT_AGENT_QUARANTINED) ? ZT_REASON_QUARANTINED
									 : ZT_REASON_NO_GRANT;
	if (!d.allowed && zt_audit_admits(&subject, family, addr))
		d.allowed = d.audit = 1;
	zt_count(d.allowed ? counters.allowed : counters.denied);
	zt_account_decision(subject.agent.index, d.allowed);
	zt_emit_decision(ctx, &d);
	if (d.allowed)
		zt_track_flow(ctx, &d);
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
	return zt_decide4(ctx, ZT_CONNECT_COUNTERS, ZT_EV_CONNECT);
}

int zt_connect6(struct bpf_sock_addr *ctx)
{
	return zt_decide6(ctx, ZT_CONNECT_COUNTERS, ZT_EV_CONNECT);
}

int zt_sendmsg4(struct bpf_sock_addr *ctx)
{
	return zt_decide4(ctx, ZT_SENDMSG_COUNTERS, ZT_EV_SENDMSG);
}

int zt_sendmsg6(struct bpf_sock_addr *ctx)
{
	return zt_decide6(ctx, ZT_SENDMSG_COUNTERS, ZT_EV_SENDMSG);
}
