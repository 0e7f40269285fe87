/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The grant decision shared by every hook. Its cost is bounded by the number
 * of port block sizes an agent uses (at most 2 x ZT_PORT_LEVELS LPM lookups),
 * never by the number of grants.
 */
#ifndef ZT_VERDICT_H
#define ZT_VERDICT_H

#include "maps.h"

/* bcc 0.26 declares bpf_get_socket_cookie() as returning u32, which would
 * truncate every cookie; the helper returns 64 bits. */
static __u64 (*zt_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

/* ::ffff:a.b.c.d (addr: 4 words, network order) is IPv4 on the wire, so it
 * is judged by the IPv4 grants, as family 4 with addr[3]. */
static __always_inline int zt_is_v4_mapped(const __u32 *addr)
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0x0000ffff);
}

struct zt_subject {
	struct zt_agent agent;
	__u32 generation;
};

static __always_inline void zt_count(int counter)
{
	__u64 *value = zt_counters_v1.lookup(&counter);
	if (value)
		*value += 1;  /* percpu: no atomics needed */
}

static __always_inline struct zt_agent_stats *zt_stats(__u32 agent_index)
{
	int index = agent_index;
	return zt_agent_stats_v1.lookup(&index);
}

static __always_inline struct zt_config *zt_get_config(void)
{
	int zero = 0;
	return zt_config_v1.lookup(&zero);
}

static __always_inline int zt_find_agent(__u64 cgroup_id, struct zt_config *cfg,
					 struct zt_subject *subject)
{
	struct zt_agent *agent = zt_agents_v1.lookup(&cgroup_id);
	if (!agent) {
		zt_count(ZT_CNT_NO_AGENT);
		return 0;
	}
	subject->agent = *agent;
	subject->generation = cfg->generation & 1;
	return 1;
}

static __always_inline int zt_proto_class(__u8 proto)
{
	/* if-chains, not switch: clang turns such a switch into a lookup
	 * table in .rodata, which bcc cannot relocate */
	if (proto == ZT_PROTO_TCP)
		return ZT_CLASS_TCP;
	if (proto == ZT_PROTO_UDP)
		return ZT_CLASS_UDP;
	if (proto == ZT_PROTO_ICMP)
		return ZT_CLASS_ICMP;
	return -1;
}

static __always_inline struct zt_levels *zt_lookup_levels(__u32 generation,
							   __u32 agent_index)
{
	int index = generation * ZT_MAX_AGENTS + agent_index;
	return zt_levels_v1.lookup(&index);
}

static __always_inline int zt_match_class(struct zt_grant_key *key, __u32 mask,
					  __u16 port, __u64 now, struct zt_grant_value *match)
{
#pragma unroll
	for (int bits = 16; bits >= 0; bits--) {
		if (!(mask & (1u << bits)))
			continue;
		__u16 port_mask = bits ? (__u16)(0xffffu << (16 - bits)) : 0;
		key->port_bits = bits;
		key->port_be = bpf_htons(port & port_mask);
		struct zt_grant_value *value = zt_grants_v1.lookup(key);
		if (value && now >= value->not_before_ns && now < value->not_after_ns) {
			*match = *value;
			return 1;
		}
	}
	return 0;
}

/*
 * Is (proto, family, addr, port) allowed for the subject at `now`
 * (bpf_ktime_get_boot_ns(), read once by the caller)? `proto` is the
 * packet's IP protocol number folded to enum zt_proto (ICMPv6 counts as
 * ZT_PROTO_ICMP); `port` is the destination port in host order, 0 for
 * protocols without ports. Returns 1 and copies the matching entry into
 * *match (grant id, window, budgets).
 */
static __always_inline int zt_allowed(const struct zt_subject *subject, __u8 proto,
				      __u8 family, const __u8 *addr, __u16 port, __u64 now,
				      struct zt_grant_value *match)
{
	if (subject->agent.flags & ZT_AGENT_QUARANTINED) {
		zt_count(ZT_CNT_QUARANTINED);
		return 0;
	}
	struct zt_levels *levels = zt_lookup_levels(subject->generation,
						    subject->agent.index);
	if (!levels)
		return 0;

	struct zt_grant_key key = {};
	key.prefixlen = ZT_KEY_FIXED_BITS + (family == ZT_FAMILY_V4 ? 32 : 128);
	key.agent = subject->agent.index;
	key.family = family;
	key.generation = subject->generation;
	if (family == ZT_FAMILY_V4)
		__builtin_memcpy(key.addr, addr, 4);
	else
		__builtin_memcpy(key.addr, addr, 16);

	int cls = zt_proto_class(proto);
	if (cls >= 0) {
		key.proto = proto;
		if (zt_match_class(&key, levels->mask[cls], port, now, match))
			return 1;
	}
	key.proto = ZT_PROTO_ANY;
	return zt_match_class(&key, levels->mask[ZT_CLASS_ANY], port, now, match);
}

/* The denial reason for a subject zt_allowed() refused. */
static __always_inline __u8 zt_refusal(const struct zt_subject *subject)
{
	return (subject->agent.flags & ZT_AGENT_QUARANTINED) ? ZT_REASON_QUARANTINED
							     : ZT_REASON_NO_GRANT;
}

/*
 * Destinations audit mode never opens (only a grant does): loopback and the
 * addresses that reach the local host (0.0.0.0/8, ::, ::1), and link-local,
 * where every cloud's metadata service lives (169.254.0.0/16: AWS, GCP, Azure,
 * ECS task metadata; fe80::/10; fd00:ec2::254, AWS's IPv6 metadata address).
 * `addr` is in network order (4 bytes for family 4, 16 for family 6).
 */
static __always_inline int zt_audit_protected(__u8 family, const __u8 *addr)
{
	if (family == ZT_FAMILY_V4)
		return addr[0] == 127 || addr[0] == 0 || (addr[0] == 169 && addr[1] == 254);
	const __u32 *w = (const __u32 *)addr;
	if (w[0] == 0 && w[1] == 0 && w[2] == 0 && (w[3] == 0 || w[3] == bpf_htonl(1)))
		return 1;
	if (addr[0] == 0xfe && (addr[1] & 0xc0) == 0x80)
		return 1;
	return w[0] == bpf_htonl(0xfd000ec2) && w[1] == 0 && w[2] == 0 &&
	       w[3] == bpf_htonl(0x254);
}

/* Does audit mode let through what the grants refused (zt_allowed() == 0)?
 * Never for a quarantined agent, never toward a protected destination. */
static __always_inline int zt_audit_admits(const struct zt_subject *subject, __u8 family,
					   const __u8 *addr)
{
	__u32 flags = subject->agent.flags;
	if (!(flags & ZT_AGENT_AUDIT) || (flags & ZT_AGENT_QUARANTINED))
		return 0;
	return !zt_audit_protected(family, addr);
}

static __always_inline void zt_account_decision(__u32 agent_index, int allowed)
{
	struct zt_agent_stats *stats = zt_stats(agent_index);
	if (!stats)
		return;
	if (allowed)
		stats->allowed += 1;
	else
		stats->denied += 1;
}

#endif /* ZT_VERDICT_H */
