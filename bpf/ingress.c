/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup_skb/ingress: accounting only (ztnet controls egress; what arrives
 * on an allowed flow is counted on it). Always passes the packet.
 */
#include "events.h"

int zt_ingress(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 1;
	struct zt_sock *sock = zt_sock_get(sk, 0);
	if (!sock || !(sock->flags & ZT_SOCK_TRACKED))
		return 1;
	__sync_fetch_and_add(&sock->packets_in, 1);
	__sync_fetch_and_add(&sock->bytes_in, skb->len);
	sock->last_in_ns = bpf_ktime_get_boot_ns();
	struct zt_agent_stats *stats = zt_stats(sock->flow.agent);
	if (stats) {
		stats->ingress_packets += 1;
		stats->ingress_bytes += skb->len;
	}
	return 1;
}
