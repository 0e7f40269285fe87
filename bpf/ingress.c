/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup_skb/ingress: accounting only (ztnet controls egress; what arrives
 * on an allowed flow is counted on it). Always passes the packet.
 */
#include "events.h"

int zt_ingress(struct __sk_buff *skb)
{
	__u64 cookie = zt_socket_cookie(skb);
	struct zt_flow *flow = zt_flows_v1.lookup(&cookie);
	if (!flow)
		return 1;
	__sync_fetch_and_add(&flow->packets_in, 1);
	__sync_fetch_and_add(&flow->bytes_in, skb->len);
	flow->last_ns = bpf_ktime_get_boot_ns();
	struct zt_agent_stats *stats = zt_stats(flow->agent);
	if (stats) {
		stats->ingress_packets += 1;
		stats->ingress_bytes += skb->len;
	}
	return 1;
}
