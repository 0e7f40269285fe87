/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Flow tracing: verdict events into the zt_events_v1 ring buffer, per-socket
 * accounting in zt_flows_v1. Losses are never silent: a full ring buffer is
 * counted (ZT_CNT_EVENTS_LOST), and deny events beyond an agent's budget are
 * counted and reported with that agent's next deny event.
 */
#ifndef ZT_EVENTS_H
#define ZT_EVENTS_H

#include "verdict.h"

#define ZT_SECOND_NS 1000000000ULL

/* May this agent's deny event be emitted? Sets *suppressed to the number of
 * deny events dropped since its last emitted one. The budget is per agent
 * and per second; concurrent CPUs may overshoot it slightly, never hide a
 * drop (the suppressed count is updated atomically). */
static __always_inline int zt_deny_budget(__u32 agent_index, __u32 *suppressed)
{
	int index = agent_index;
	struct zt_deny_budget *budget = zt_deny_budget_v1.lookup(&index);
	if (!budget)
		return 1;
	__u64 now = bpf_ktime_get_boot_ns();
	if (now - budget->window_start_ns >= ZT_SECOND_NS) {
		budget->window_start_ns = now;
		budget->sent = 0;
	}
	if (budget->sent >= ZT_DENY_EVENTS_PER_SEC) {
		__sync_fetch_and_add(&budget->suppressed, 1);
		zt_count(ZT_CNT_EVENTS_SUPPRESSED);
		struct zt_agent_stats *stats = zt_stats(agent_index);
		if (stats)
			stats->events_suppressed += 1;
		return 0;
	}
	budget->sent += 1;
	__u32 pending = budget->suppressed;
	if (pending)
		__sync_fetch_and_add(&budget->suppressed, -pending);
	*suppressed = pending;
	return 1;
}

struct zt_decision {
	__u64 cgroup_id;
	__u64 grant_id;
	__u32 agent;
	__u8 kind;
	__u8 allowed;
	__u8 reason;
	__u8 proto;
	__u8 family;
	__u16 dport;
	__u8 daddr[16];
};

/* The socket fields of a decision, as a flow entry and an event carry them. */
static __always_inline void zt_describe_flow(struct zt_flow *flow, const struct zt_decision *d)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	flow->grant_id = d->grant_id;
	flow->cgroup_id = d->cgroup_id;
	flow->agent = d->agent;
	flow->pid = (__u32)pid_tgid;
	flow->tgid = pid_tgid >> 32;
	flow->uid = (__u32)bpf_get_current_uid_gid();
	flow->proto = d->proto;
	flow->family = d->family;
	flow->dport_be = bpf_htons(d->dport);
	__builtin_memcpy(flow->daddr, d->daddr, 16);
	bpf_get_current_comm(flow->comm, sizeof(flow->comm));
}

static __always_inline void zt_emit_decision(void *ctx, const struct zt_decision *d)
{
	__u32 suppressed = 0;
	if (!d->allowed && !zt_deny_budget(d->agent, &suppressed))
		return;
	struct zt_event *event = zt_events_v1.ringbuf_reserve(sizeof(struct zt_event));
	if (!event) {
		zt_count(ZT_CNT_EVENTS_LOST);
		return;
	}
	__builtin_memset(event, 0, sizeof(*event));
	event->time_ns = bpf_ktime_get_boot_ns();
	event->cookie = zt_socket_cookie(ctx);
	event->suppressed = suppressed;
	event->kind = d->kind;
	event->verdict = d->allowed ? ZT_VERDICT_ALLOWED : ZT_VERDICT_DENIED;
	event->reason = d->reason;
	zt_describe_flow(&event->flow, d);
	zt_events_v1.ringbuf_submit(event, 0);
}

/* Start accounting for an allowed socket (first allowed decision wins). */
static __always_inline void zt_track_flow(void *ctx, const struct zt_decision *d)
{
	__u64 cookie = zt_socket_cookie(ctx);
	struct zt_flow flow = {};
	zt_describe_flow(&flow, d);
	flow.first_ns = bpf_ktime_get_boot_ns();
	flow.last_ns = flow.first_ns;
	zt_flows_v1.insert(&cookie, &flow);
}

#endif /* ZT_EVENTS_H */
