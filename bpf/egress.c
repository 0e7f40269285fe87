/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Packet-level backstop: cgroup_skb/egress. Every packet an agent's sockets
 * emit (TCP, UDP, ICMP, raw IP, IPv4 and IPv6) must be covered by a live
 * grant, so a grant that is removed or expires also stops the established
 * flows it allowed, and paths the socket hooks never see (raw sockets,
 * connected UDP after expiry) are closed too.
 */
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include "events.h"

#define ZT_IPV6_NEXTHDR_TCP 6
#define ZT_IPV6_NEXTHDR_UDP 17
#define ZT_IPV6_NEXTHDR_ICMP 58
#define ZT_IP_OFFSET_MASK 0x1fff

struct zt_packet {
	__u8 family;
	__u8 proto;
	__u16 port;
	__u16 sport;
	__u8 addr[16];
	__u8 saddr[16];
};

static __always_inline __u8 zt_fold_proto(__u8 proto)
{
	if (proto == IPPROTO_ICMPV6)
		return ZT_PROTO_ICMP;
	return proto;
}

static __always_inline void zt_load_port(struct __sk_buff *skb, __u32 l4_offset,
					 struct zt_packet *pkt)
{
	__be16 ports[2] = {};
	if (pkt->proto != ZT_PROTO_TCP && pkt->proto != ZT_PROTO_UDP)
		return;
	/* source and destination port: bytes 0..3 of both TCP and UDP headers */
	if (bpf_skb_load_bytes(skb, l4_offset, ports, sizeof(ports)) < 0) {
		/* truncated: no port, so only port-agnostic grants can match */
		pkt->proto = ZT_PROTO_PORT_UNKNOWN;
		return;
	}
	pkt->sport = bpf_ntohs(ports[0]);
	pkt->port = bpf_ntohs(ports[1]);
}

/* Returns 0 when the packet cannot be parsed at all. */
static __always_inline int zt_parse(struct __sk_buff *skb, struct zt_packet *pkt)
{
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr iph;
		if (bpf_skb_load_bytes(skb, 0, &iph, sizeof(iph)) < 0)
			return 0;
		pkt->family = ZT_FAMILY_V4;
		pkt->proto = zt_fold_proto(iph.protocol);
		__builtin_memcpy(pkt->addr, &iph.daddr, 4);
		__builtin_memcpy(pkt->saddr, &iph.saddr, 4);
		/* later fragments carry no L4 header: port unknown */
		if (bpf_ntohs(iph.frag_off) & ZT_IP_OFFSET_MASK) {
			if (pkt->proto == ZT_PROTO_TCP || pkt->proto == ZT_PROTO_UDP)
				pkt->proto = ZT_PROTO_PORT_UNKNOWN;
			return 1;
		}
		zt_load_port(skb, iph.ihl * 4, pkt);
		return 1;
	}
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6h;
		if (bpf_skb_load_bytes(skb, 0, &ip6h, sizeof(ip6h)) < 0)
			return 0;
		__u32 *d = (__u32 *)&ip6h.daddr;
		__u32 *src = (__u32 *)&ip6h.saddr;
		if (zt_is_v4_mapped(d)) {
			pkt->family = ZT_FAMILY_V4;
			__builtin_memcpy(pkt->addr, &d[3], 4);
			__builtin_memcpy(pkt->saddr, &src[3], 4);
		} else {
			pkt->family = ZT_FAMILY_V6;
			__builtin_memcpy(pkt->addr, &ip6h.daddr, 16);
			__builtin_memcpy(pkt->saddr, &ip6h.saddr, 16);
		}
		/* Extension headers are not walked: such a packet is judged as
		 * its first next-header with no port, so only grants for any
		 * protocol and any port can admit it. */
		pkt->proto = zt_fold_proto(ip6h.nexthdr);
		zt_load_port(skb, sizeof(ip6h), pkt);
		return 1;
	}
	return 0;
}

/* Count the packet on its socket's flow; sockets no hook saw (raw sockets,
 * or opened before this program was loaded) get a flow record here. */
static __always_inline void zt_account_egress(struct __sk_buff *skb,
					      const struct zt_subject *subject,
					      const struct zt_packet *pkt, __u64 cgroup_id,
					      __u64 grant_id, __u16 flow_flags)
{
	__u64 cookie = zt_socket_cookie(skb);
	__u64 now = bpf_ktime_get_boot_ns();
	struct zt_flow *flow = zt_flows_v1.lookup(&cookie);
	if (flow) {
		__sync_fetch_and_add(&flow->packets_out, 1);
		__sync_fetch_and_add(&flow->bytes_out, skb->len);
		flow->last_ns = now;
		if (!flow->sport_be) {
			flow->sport_be = bpf_htons(pkt->sport);
			__builtin_memcpy(flow->saddr, pkt->saddr, 16);
		}
		return;
	}
	struct zt_flow fresh = {};
	fresh.grant_id = grant_id;
	fresh.cgroup_id = cgroup_id;
	fresh.packets_out = 1;
	fresh.bytes_out = skb->len;
	fresh.first_ns = now;
	fresh.last_ns = now;
	fresh.agent = subject->agent.index;
	fresh.proto = pkt->proto;
	fresh.family = pkt->family;
	fresh.dport_be = bpf_htons(pkt->port);
	fresh.sport_be = bpf_htons(pkt->sport);
	fresh.flags = flow_flags;
	__builtin_memcpy(fresh.daddr, pkt->addr, 16);
	__builtin_memcpy(fresh.saddr, pkt->saddr, 16);
	if (zt_flows_v1.insert(&cookie, &fresh) < 0)
		zt_count(ZT_CNT_FLOWS_UNTRACKED);
}

static __always_inline void zt_count_drop(__u32 agent_index, int reason)
{
	int index = agent_index * ZT_DROP_SLOTS + reason;
	__u64 *count = zt_agent_drops_v1.lookup(&index);
	if (count)
		*count += 1;  /* percpu */
}

int zt_egress(struct __sk_buff *skb)
{
	struct zt_config *cfg = zt_get_config();
	if (!cfg)
		return 0;
	struct zt_subject subject = {};
	__u64 cgroup_id = bpf_skb_ancestor_cgroup_id(skb, cfg->agent_level);
	if (!zt_find_agent(cgroup_id, cfg, &subject)) {
		zt_count(ZT_CNT_EGRESS_DROP);
		return 0;
	}
	struct zt_agent_stats *stats = zt_stats(subject.agent.index);

	struct zt_packet pkt = {};
	if (!zt_parse(skb, &pkt)) {
		zt_count(ZT_CNT_UNPARSED);
		zt_count(ZT_CNT_EGRESS_DROP);
		zt_count_drop(subject.agent.index, ZT_REASON_UNPARSED);
		if (stats)
			stats->egress_dropped += 1;
		return 0;
	}
	__u64 grant_id = 0;
	if (zt_allowed(&subject, pkt.proto, pkt.family, pkt.addr, pkt.port, &grant_id)) {
		zt_count(ZT_CNT_EGRESS_PASS);
		if (stats) {
			stats->egress_packets += 1;
			stats->egress_bytes += skb->len;
		}
		zt_account_egress(skb, &subject, &pkt, cgroup_id, grant_id, 0);
		return 1;
	}
	if (zt_audit_admits(&subject, pkt.family, pkt.addr)) {
		/* audit mode: what enforce mode drops passes, counted per agent;
		 * a socket no hook saw gets an audited flow (its flow end says so) */
		zt_count(ZT_CNT_EGRESS_PASS);
		zt_count_drop(subject.agent.index, ZT_DROP_SLOT_AUDIT);
		if (stats) {
			stats->egress_packets += 1;
			stats->egress_bytes += skb->len;
		}
		zt_account_egress(skb, &subject, &pkt, cgroup_id, 0, ZT_FLOW_AUDIT);
		return 1;
	}
	zt_count(ZT_CNT_EGRESS_DROP);
	zt_count_drop(subject.agent.index, (subject.agent.flags & ZT_AGENT_QUARANTINED)
						   ? ZT_REASON_QUARANTINED : ZT_REASON_NO_GRANT);
	if (stats)
		stats->egress_dropped += 1;
	return 0;
}
