/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup/sock_release: the flow-end record of every tracked socket, with
 * its final counters (within the agent's allowed-side event budget).
 */
#include "events.h"

int zt_sock_release(struct bpf_sock *sk)
{
	__u64 cookie = zt_socket_cookie(sk);
	struct zt_flow *flow = zt_flows_v1.lookup(&cookie);
	if (!flow)
		return 1;
	/* flow ends share the agent's allowed-side budget: an agent opening and
	 * closing sockets in a loop gets no more of the ring than one sending */
	__u32 agent = flow->agent;
	__u32 suppressed = 0;
	struct zt_event *event = 0;
	if (zt_event_budget(agent, 0, &suppressed))
		event = zt_reserve_event(agent, 0, suppressed);
	if (!event) {
		zt_flows_v1.delete(&cookie);
		return 1;
	}
	__builtin_memset(event, 0, sizeof(*event));
	event->time_ns = bpf_ktime_get_boot_ns();
	event->cookie = cookie;
	event->suppressed = suppressed;
	event->kind = ZT_EV_FLOW_END;
	if (flow->flags & ZT_FLOW_AUDIT) {  /* no grant: audit mode let it through */
		event->verdict = ZT_VERDICT_AUDIT;
		event->reason = ZT_REASON_NO_GRANT;
	} else {
		event->verdict = ZT_VERDICT_ALLOWED;
	}
	/* the whole entry: counters, process, and the source the egress program
	 * learnt (sock_release may not read the socket's source; only post_bind
	 * may) */
	event->flow = *flow;
	zt_events_v1.ringbuf_submit(event, 0);
	zt_flows_v1.delete(&cookie);
	return 1;
}
