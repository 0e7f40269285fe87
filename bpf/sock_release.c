/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup/sock_release: the flow-end record of every tracked socket, with
 * its final counters.
 */
#include "events.h"

int zt_sock_release(struct bpf_sock *sk)
{
	__u64 cookie = zt_socket_cookie(sk);
	struct zt_flow *flow = zt_flows_v1.lookup(&cookie);
	if (!flow)
		return 1;
	struct zt_event *event = zt_events_v1.ringbuf_reserve(sizeof(struct zt_event));
	if (!event) {
		zt_count(ZT_CNT_EVENTS_LOST);
		zt_flows_v1.delete(&cookie);
		return 1;
	}
	__builtin_memset(event, 0, sizeof(*event));
	event->time_ns = bpf_ktime_get_boot_ns();
	event->cookie = cookie;
	event->cgroup_id = flow->cgroup_id;
	event->grant_id = flow->grant_id;
	event->packets_out = flow->packets_out;
	event->bytes_out = flow->bytes_out;
	event->packets_in = flow->packets_in;
	event->bytes_in = flow->bytes_in;
	event->first_ns = flow->first_ns;
	event->last_ns = flow->last_ns;
	event->pid = flow->pid;
	event->tgid = flow->tgid;
	event->uid = flow->uid;
	event->agent = flow->agent;
	event->kind = ZT_EV_FLOW_END;
	event->verdict = ZT_VERDICT_ALLOWED;
	event->proto = flow->proto;
	event->family = flow->family;
	event->dport_be = flow->dport_be;
	/* sock_release may not read the socket's source (only post_bind may),
	 * so it comes from what the egress program saw */
	event->sport_be = flow->sport_be;
	__builtin_memcpy(event->saddr, flow->saddr, 16);
	__builtin_memcpy(event->daddr, flow->daddr, 16);
	__builtin_memcpy(event->comm, flow->comm, 16);
	zt_events_v1.ringbuf_submit(event, 0);
	zt_flows_v1.delete(&cookie);
	return 1;
}
