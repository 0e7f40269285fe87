/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Flow tracing: verdict events into the zt_events_v1 ring buffer, per-socket
 * accounting in the socket's storage (struct zt_sock.flow). Losses are never
 * silent, and no agent can push another agent's events out:
 *  - each agent has two budgets per second, one for deny events and one for
 *    allowed-side events (allowed verdicts and flow ends); what a budget
 *    drops is counted and carried by that agent's next event of the same side;
 *  - deny events go to a ring buffer of their own (zt_denials_v1), so a
 *    flood of allowed events left unread cannot crowd them out;
 *  - an event that finds no room is counted for its agent and side
 *    (zt_agent_events_v1) as well as globally (ZT_CNT_EVENTS_LOST).
 */
#ifndef ZT_EVENTS_H
#define ZT_EVENTS_H

#include "socket.h"

#define ZT_SECOND_NS 1000000000ULL

/* Take one event from a per-second budget. Returns 1 and sets *reported to
 * the number of events the budget dropped since its last emitted one, or
 * returns 0 and counts this one as dropped. Concurrent CPUs may overshoot the
 * budget slightly, never hide a drop (the dropped count moves atomically). */
static __always_inline int zt_take_budget(struct zt_deny_budget *budget, __u32 per_second,
					  __u64 now, __u32 *reported)
{
	if (now - budget->window_start_ns >= ZT_SECOND_NS) {
		budget->window_start_ns = now;
		budget->sent = 0;
	}
	if (budget->sent >= per_second) {
		__sync_fetch_and_add(&budget->suppressed, 1);
		return 0;
	}
	budget->sent += 1;
	__u32 pending = budget->suppressed;
	if (pending)
		__sync_fetch_and_add(&budget->suppressed, -pending);
	*reported = pending;
	return 1;
}

static __always_inline struct zt_agent_events *zt_agent_events(__u32 agent_index)
{
	int index = agent_index;
	return zt_agent_events_v1.lookup(&index);
}

/* The budget of the agent's side (deny or allowed), or NULL. */
static __always_inline struct zt_deny_budget *zt_budget(__u32 agent_index, int deny)
{
	int index = agent_index;
	if (deny)
		return zt_deny_budget_v1.lookup(&index);
	return zt_allow_budget_v1.lookup(&index);
}

/* May the agent's next event of this side be emitted? (see zt_take_budget) */
static __always_inline int zt_event_budget(__u32 agent_index, int deny, __u64 now,
					   __u32 *reported)
{
	struct zt_deny_budget *budget = zt_budget(agent_index, deny);
	if (!budget || zt_take_budget(budget, deny ? ZT_DENY_EVENTS_PER_SEC
					      : ZT_ALLOW_EVENTS_PER_SEC, now, reported))
		return 1;
	if (deny) {
		zt_count(ZT_CNT_EVENTS_SUPPRESSED);
		struct zt_agent_stats *stats = zt_stats(agent_index);
		if (stats)
			stats->events_suppressed += 1;
	} else {
		struct zt_agent_events *lost = zt_agent_events(agent_index);
		if (lost)
			lost->allow_suppressed += 1;
	}
	return 0;
}

/* A ring-buffer slot for an event of this agent and side that passed its
 * budget, or NULL: then the event is counted as lost, and the drops it was
 * to report go back to the budget, for the next event to report. */
static __always_inline struct zt_event *zt_reserve_event(__u32 agent_index, int deny,
							 __u32 reported)
{
	struct zt_event *event;
	if (deny)
		event = zt_denials_v1.ringbuf_reserve(sizeof(struct zt_event));
	else
		event = zt_events_v1.ringbuf_reserve(sizeof(struct zt_event));
	if (event)
		return event;
	zt_count(ZT_CNT_EVENTS_LOST);
	struct zt_agent_events *lost = zt_agent_events(agent_index);
	if (lost) {
		if (deny)
			lost->deny_lost += 1;
		else
			lost->allow_lost += 1;
	}
	struct zt_deny_budget *budget = zt_budget(agent_index, deny);
	if (budget && reported)
		__sync_fetch_and_add(&budget->suppressed, reported);
	return 0;
}

/*
 * Hand a filled record to its reader. Deny records (and cuts) wake the reader
 * at once; allowed-side records follow the wake-up policy the daemon wrote
 * (zt_config.reserved[ZT_CFG_WAKEUP_RECORDS]): a CPU wakes the reader with
 * every that-many-th record it submits and submits the others silently; the
 * reader's poll timer collects what waits in between. 0: wake on every
 * record. (A wake-up per record costs the agent an interrupt per connect.)
 */
static __always_inline void zt_submit(struct zt_event *event, int deny,
				      const struct zt_config *cfg)
{
	if (deny) {
		zt_denials_v1.ringbuf_submit(event, 0);
		return;
	}
	__u64 every = cfg->reserved[ZT_CFG_WAKEUP_RECORDS];
	__u64 flags = 0;
	if (every) {
		int zero = 0;
		__u64 *silent = zt_ring_silent_v1.lookup(&zero);
		flags = BPF_RB_FORCE_WAKEUP;
		if (silent && ++*silent < every)  /* percpu */
			flags = BPF_RB_NO_WAKEUP;
		else if (silent)
			*silent = 0;
	}
	zt_events_v1.ringbuf_submit(event, flags);
}

/* A verdict being made by a socket hook: the facts it was made on, each
 * fetched once (time, cgroup) and shared by the decision, the flow and the
 * event. */
struct zt_decision {
	__u64 now;            /* bpf_ktime_get_boot_ns() */
	__u64 cgroup_id;
	__u64 grant_id;
	__u32 agent;
	__u8 kind;
	__u8 allowed;         /* the syscall goes ahead (granted, or audited) */
	__u8 audit;           /* no grant: let through by audit mode */
	__u8 reason;
	__u8 proto;
	__u8 family;
	__u8 flags;           /* ZT_EVF_* of the event */
	__u16 dport;
	__u8 daddr[16];
};

/* The socket fields of a decision, as a flow entry and an event carry them
 * (the process facts are read here, once per decision). */
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
	flow->flags = d->audit ? ZT_FLOW_AUDIT : 0;
	__builtin_memcpy(flow->daddr, d->daddr, 16);
	bpf_get_current_comm(flow->comm, sizeof(flow->comm));
}

/* The verdict event of a decision. `described`: the flow this decision just
 * described in the socket's storage (copied whole, nothing fetched again),
 * or NULL to describe it here. */
static __always_inline void zt_emit_decision(void *ctx, const struct zt_decision *d,
					     const struct zt_flow *described,
					     const struct zt_config *cfg)
{
	__u32 suppressed = 0;
	/* audit events are what enforce mode would have denied: the deny side's
	 * budget and ring, so an audited agent's allowed traffic cannot hide them */
	int deny = !d->allowed || d->audit;
	if (!zt_event_budget(d->agent, deny, d->now, &suppressed))
		return;
	struct zt_event *event = zt_reserve_event(d->agent, deny, suppressed);
	if (!event)
		return;
	event->time_ns = d->now;
	event->cookie = zt_socket_cookie(ctx);
	event->suppressed = suppressed;
	event->kind = d->kind;
	event->verdict = d->audit ? ZT_VERDICT_AUDIT
				  : d->allowed ? ZT_VERDICT_ALLOWED : ZT_VERDICT_DENIED;
	event->reason = d->reason;
	event->flags = d->flags;
	if (described) {
		event->flow = *described;
	} else {
		__builtin_memset(&event->flow, 0, sizeof(event->flow));
		zt_describe_flow(&event->flow, d);
	}
	zt_submit(event, deny, cfg);
}

/* A record of the socket's flow as it stands (flow ends, budget cuts). */
static __always_inline void zt_emit_flow(__u64 cookie, const struct zt_sock *sock, __u8 kind,
					 __u8 verdict, __u8 reason, __u8 flags, __u64 now,
					 const struct zt_config *cfg)
{
	__u32 agent = sock->flow.agent;
	__u32 suppressed = 0;
	int deny = verdict == ZT_VERDICT_DENIED;  /* cuts; audited flow ends stay allowed-side */
	/* flow ends share the agent's allowed-side budget: an agent opening and
	 * closing sockets in a loop gets no more of the ring than one sending */
	if (!zt_event_budget(agent, deny, now, &suppressed))
		return;
	struct zt_event *event = zt_reserve_event(agent, deny, suppressed);
	if (!event)
		return;
	event->time_ns = now;
	event->cookie = cookie;
	event->suppressed = suppressed;
	event->kind = kind;
	event->verdict = verdict;
	event->reason = reason;
	event->flags = flags;
	event->flow = sock->flow;
	event->flow.packets_in = sock->packets_in;
	event->flow.bytes_in = sock->bytes_in;
	if (sock->last_in_ns > event->flow.last_ns)
		event->flow.last_ns = sock->last_in_ns;
	zt_submit(event, deny, cfg);
}

/* Cut a socket's flow: a byte budget refused its packet. Every later packet
 * is dropped and every datagram refused; the cut is recorded once (a deny
 * record with ZT_EVF_CUT, which tells the daemon to destroy the socket so the
 * holder sees an error rather than a stall). */
static __always_inline void zt_cut(__u64 cookie, struct zt_sock *sock, __u64 now,
				   const struct zt_config *cfg)
{
	if (sock->flags & ZT_SOCK_CUT)
		return;
	sock->flags |= ZT_SOCK_CUT;
	zt_count(ZT_CNT_BUDGET_CUT);
	__u8 kind = sock->flow.proto == ZT_PROTO_UDP ? ZT_EV_SENDMSG : ZT_EV_CONNECT;
	zt_emit_flow(cookie, sock, kind, ZT_VERDICT_DENIED, ZT_REASON_BUDGET, ZT_EVF_CUT,
		     now, cfg);
}

#endif /* ZT_EVENTS_H */
