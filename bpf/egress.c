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
#include "names.h"

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

/* The packet's socket storage (none for request and time-wait sockets). */
static __always_inline struct zt_sock *zt_skb_sock(struct __sk_buff *skb, int create)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 0;
	return zt_sock_get(sk, create);
}

/* The destination of a packet as its headers say, read in place (no helper
 * call), for checking it against the socket's stamp. Returns 0 when the
 * headers are not in the linear area or the packet is not plain TCP/UDP/ICMP
 * over IPv4/IPv6 without fragments: then the packet is judged in full. */
static __always_inline int zt_peek(struct __sk_buff *skb, struct zt_packet *pkt)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = data;
		if ((void *)(iph + 1) > end)
			return 0;
		if (bpf_ntohs(iph->frag_off) & ZT_IP_OFFSET_MASK)
			return 0;
		pkt->family = ZT_FAMILY_V4;
		pkt->proto = zt_fold_proto(iph->protocol);
		__builtin_memcpy(pkt->addr, &iph->daddr, 4);
		data += iph->ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6h = data;
		if ((void *)(ip6h + 1) > end)
			return 0;
		pkt->family = ZT_FAMILY_V6;
		pkt->proto = zt_fold_proto(ip6h->nexthdr);
		__builtin_memcpy(pkt->addr, &ip6h->daddr, 16);
		data += sizeof(*ip6h);
	} else {
		return 0;
	}
	if (pkt->proto == ZT_PROTO_TCP || pkt->proto == ZT_PROTO_UDP) {
		__be16 *ports = data;
		if ((void *)(ports + 2) > end)
			return 0;
		pkt->port = bpf_ntohs(ports[1]);
	} else if (pkt->proto != ZT_PROTO_ICMP) {
		return 0;
	}
	return 1;
}

/* Count a packet that passed on its agent and flow. */
static __always_inline void zt_count_pass(__u32 agent_index, __u32 len)
{
	zt_count(ZT_CNT_EGRESS_PASS);
	struct zt_agent_stats *stats = zt_stats(agent_index);
	if (stats) {
		stats->egress_packets += 1;
		stats->egress_bytes += len;
	}
}

static __always_inline void zt_count_drop(__u32 agent_index, int reason)
{
	int index = agent_index * ZT_DROP_SLOTS + reason;
	__u64 *count = zt_agent_drops_v1.lookup(&index);
	if (count)
		*count += 1;  /* percpu */
	zt_count(ZT_CNT_EGRESS_DROP);
	struct zt_agent_stats *stats = zt_stats(agent_index);
	if (stats)
		stats->egress_dropped += 1;
}

/* The flow's source, from its first packet: sock_release may not read it, and a
 * connect hook runs before the kernel picks it. */
static __always_inline void zt_learn_source(struct zt_sock *sock, const struct zt_packet *pkt)
{
	if (sock->flow.sport_be)
		return;
	sock->flow.sport_be = bpf_htons(pkt->sport);
	__builtin_memcpy(sock->flow.saddr, pkt->saddr, 16);
}

/* A packet a byte budget refuses: dropped, its flow cut. */
static __always_inline int zt_refuse(struct __sk_buff *skb, struct zt_sock *sock, __u64 now,
				     const struct zt_config *cfg)
{
	zt_count(ZT_CNT_BUDGET_DROP);
	zt_count_drop(sock->flow.agent, ZT_REASON_BUDGET);
	zt_cut(zt_socket_cookie(skb), sock, now, cfg);
	return 0;
}

/* Describe a flow no socket hook saw (raw sockets, sockets opened before
 * this program was loaded) from its first packet. */
static __always_inline void zt_describe_from_packet(struct zt_sock *sock,
						    const struct zt_subject *subject,
						    const struct zt_packet *pkt, __u64 cgroup_id,
						    __u64 grant_id, __u64 now)
{
	sock->flow.grant_id = grant_id;
	sock->flow.cgroup_id = cgroup_id;
	sock->flow.first_ns = now;
	sock->flow.agent = subject->agent.index;
	sock->flow.proto = pkt->proto;
	sock->flow.family = pkt->family;
	sock->flow.dport_be = bpf_htons(pkt->port);
	__builtin_memcpy(sock->flow.daddr, pkt->addr, 16);
	sock->flags |= ZT_SOCK_TRACKED;
}

/* Audit mode: what enforce mode drops passes, counted per agent (never on a
 * stamp: each such packet is judged); a socket no hook saw gets an audited
 * flow (its flow end says so). */
static __always_inline int zt_egress_audited(struct __sk_buff *skb,
					     const struct zt_subject *subject,
					     const struct zt_packet *pkt, __u64 cgroup_id, __u64 now)
{
	zt_count(ZT_CNT_EGRESS_PASS);
	int slot = subject->agent.index * ZT_DROP_SLOTS + ZT_DROP_SLOT_AUDIT;
	__u64 *audited = zt_agent_drops_v1.lookup(&slot);
	if (audited)
		*audited += 1;  /* percpu */
	struct zt_agent_stats *stats = zt_stats(subject->agent.index);
	if (stats) {
		stats->egress_packets += 1;
		stats->egress_bytes += skb->len;
	}
	struct zt_sock *sock = zt_skb_sock(skb, 1);
	if (!sock)
		return 1;
	if (!(sock->flags & ZT_SOCK_TRACKED)) {
		zt_describe_from_packet(sock, subject, pkt, cgroup_id, 0, now);
		sock->flow.flags = ZT_FLOW_AUDIT;
	}
	__sync_fetch_and_add(&sock->flow.bytes_out, skb->len);
	__sync_fetch_and_add(&sock->flow.packets_out, 1);
	sock->flow.last_ns = now;
	return 1;
}

/* The full judgement: agent, headers, grant trie. An allowed packet stamps its
 * socket, so that the flow's next packets are judged by zt_egress's fast path. */
static __always_inline int zt_egress_judge(struct __sk_buff *skb, struct zt_config *cfg,
					   __u64 now)
{
	struct zt_subject subject = {};
	__u64 cgroup_id = bpf_skb_ancestor_cgroup_id(skb, cfg->agent_level);
	if (!zt_find_agent(cgroup_id, cfg, &subject)) {
		zt_count(ZT_CNT_EGRESS_DROP);
		return 0;
	}
	struct zt_packet pkt = {};
	if (!zt_parse(skb, &pkt)) {
		zt_count(ZT_CNT_UNPARSED);
		zt_count_drop(subject.agent.index, ZT_REASON_UNPARSED);
		return 0;
	}
	struct zt_grant_value match = {};
	if (!zt_allowed(&subject, pkt.proto, pkt.family, pkt.addr, pkt.port, now, &match) &&
	    !zt_names_egress(&subject, pkt.proto, pkt.family, pkt.addr, pkt.port, now, &match)) {
		if (zt_audit_admits(&subject, pkt.family, pkt.addr))
			return zt_egress_audited(skb, &subject, &pkt, cgroup_id, now);
		zt_count_drop(subject.agent.index, zt_refusal(&subject));
		return 0;
	}
	struct zt_sock *sock = zt_skb_sock(skb, 1);
	if (!sock) {  /* no full socket, or no memory: passes untracked */
		zt_count_pass(subject.agent.index, skb->len);
		return 1;
	}
	if (sock->flags & ZT_SOCK_CUT)
		return zt_refuse(skb, sock, now, cfg);
	if (!(sock->flags & ZT_SOCK_TRACKED))
		zt_describe_from_packet(sock, &subject, &pkt, cgroup_id, match.grant_id, now);
	zt_learn_source(sock, &pkt);
	/* a packet whose port could not be read is never stamped */
	if (pkt.proto != ZT_PROTO_PORT_UNKNOWN)
		zt_stamp_set(&sock->egress, &match, cfg->generation, pkt.proto, pkt.family,
			     pkt.addr, pkt.port, cgroup_id);
	if (!zt_charge(sock, &sock->egress, skb->len, now))
		return zt_refuse(skb, sock, now, cfg);
	zt_count(ZT_CNT_EGRESS_JUDGED);
	zt_count_pass(subject.agent.index, skb->len);
	return 1;
}

int zt_egress(struct __sk_buff *skb)
{
	struct zt_config *cfg = zt_get_config();
	if (!cfg)
		return 0;
	__u64 now = bpf_ktime_get_boot_ns();
	struct zt_sock *sock = zt_skb_sock(skb, 0);
	struct zt_packet pkt = {};
	if (!sock || !(sock->egress.until_ns > now) || !zt_peek(skb, &pkt) ||
	    !zt_stamp_holds(&sock->egress, cfg->generation, now, pkt.proto, pkt.family,
			    pkt.addr, pkt.port))
		return zt_egress_judge(skb, cfg, now);
	/* the fast path: the socket's stamp stands for this packet */
	if (!sock->flow.sport_be) {
		/* stamped at connect (sock_addr.c): its first packet names the source */
		struct zt_packet full = {};
		if (zt_parse(skb, &full))
			zt_learn_source(sock, &full);
	}
	if (sock->flags & ZT_SOCK_CUT)
		return zt_refuse(skb, sock, now, cfg);
	if (!zt_charge(sock, &sock->egress, skb->len, now))
		return zt_refuse(skb, sock, now, cfg);
	zt_count_pass(sock->flow.agent, skb->len);
	return 1;
}
