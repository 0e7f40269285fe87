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
	event->kind = ZT_EV_FLOW_END;
	event->verdict = ZT_VERDICT_ALLOWED;
	/* the whole entry: counters, process, and the source the egress program
	 * learnt (sock_release may not read the socket's source; only post_bind
	 * may) */
	event->flow = *flow;
	zt_events_v1.ringbuf_submit(event, 0);
	zt_flows_v1.delete(&cookie);
	return 1;
}
