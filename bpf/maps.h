/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Map declarations (bcc macros). Every map is pinned under ZT_PIN_DIR, which
 * the loader passes as a -D flag: bcc opens a pinned map when the path exists
 * and creates and pins it otherwise, which is how a restarted loader adopts
 * the enforcement state a previous one left behind.
 */
#ifndef ZT_MAPS_H
#define ZT_MAPS_H

#include "ztnet.h"

#ifndef ZT_PIN_DIR
#error "ZT_PIN_DIR must be defined by the loader"
#endif

/* agent cgroup id -> agent */
BPF_TABLE_PINNED("hash", __u64, struct zt_agent, zt_agents_v1, ZT_MAX_AGENTS,
		 ZT_PIN_DIR "/zt_agents_v1");

/* Both generations of grants; zt_config_v1.generation says which is live.
 * (One map per kind rather than one per generation: choosing between two
 * maps at run time makes clang emit an indirect call the verifier rejects.) */
BPF_TABLE_PINNED("lpm_trie", struct zt_grant_key, struct zt_grant_value,
		 zt_grants_v1, ZT_MAX_ENTRIES, ZT_PIN_DIR "/zt_grants_v1",
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", int, struct zt_levels, zt_levels_v1, 2 * ZT_MAX_AGENTS,
		 ZT_PIN_DIR "/zt_levels_v1");

BPF_TABLE_PINNED("array", int, struct zt_config, zt_config_v1, 1,
		 ZT_PIN_DIR "/zt_config_v1");
BPF_TABLE_PINNED("percpu_array", int, __u64, zt_counters_v1, ZT_CNT_COUNT,
		 ZT_PIN_DIR "/zt_counters_v1");
BPF_TABLE_PINNED("percpu_array", int, struct zt_agent_stats, zt_agent_stats_v1,
		 ZT_MAX_AGENTS, ZT_PIN_DIR "/zt_agent_stats_v1");

/* Egress drops per agent and reason (index: agent * ZT_DROP_SLOTS + reason). */
BPF_TABLE_PINNED("percpu_array", int, __u64, zt_agent_drops_v1,
		 ZT_MAX_AGENTS * ZT_DROP_SLOTS, ZT_PIN_DIR "/zt_agent_drops_v1");
/* What ztnet knows about each socket (flow record, stamped verdicts, budget
 * state), in the socket's own storage: no table to fill up or evict from,
 * freed with the socket. Pinned like every map, so a restarted daemon's
 * programs see the same storage (the per-connection byte counts survive). */
struct zt_socks_v1_table_t {
	int key;
	struct zt_sock leaf;
	void *(*sk_storage_get)(void *, void *, int);
	int (*sk_storage_delete)(void *);
	__u32 flags;
};
__attribute__((section("maps/sk_storage:" ZT_PIN_DIR "/zt_socks_v1")))
struct zt_socks_v1_table_t zt_socks_v1 = { .flags = BPF_F_NO_PREALLOC };
BPF_ANNOTATE_KV_PAIR(zt_socks_v1, int, struct zt_sock);

/* Window byte budgets by grant id: what each budgeted grant's sockets sent in
 * its current window. Pinned, so the count survives a daemon restart. */
BPF_TABLE_PINNED("hash", __u64, struct zt_window, zt_budgets_v1, ZT_MAX_BUDGETS,
		 ZT_PIN_DIR "/zt_budgets_v1");
BPF_TABLE_PINNED("array", int, struct zt_deny_budget, zt_deny_budget_v1, ZT_MAX_AGENTS,
		 ZT_PIN_DIR "/zt_deny_budget_v1");
BPF_TABLE_PINNED("array", int, struct zt_deny_budget, zt_allow_budget_v1, ZT_MAX_AGENTS,
		 ZT_PIN_DIR "/zt_allow_budget_v1");
BPF_TABLE_PINNED("percpu_array", int, struct zt_agent_events, zt_agent_events_v1,
		 ZT_MAX_AGENTS, ZT_PIN_DIR "/zt_agent_events_v1");

/* The event ring buffer, pinned like every map so an adopting daemon reads
 * the same buffer (bcc's BPF_RINGBUF_OUTPUT has no pinned form). */
struct zt_events_v1_table_t {
	int key;
	__u32 leaf;
	int (*ringbuf_output)(void *, __u64, __u64);
	void *(*ringbuf_reserve)(__u64);
	void (*ringbuf_discard)(void *, __u64);
	void (*ringbuf_submit)(void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/ringbuf:" ZT_PIN_DIR "/zt_events_v1")))
struct zt_events_v1_table_t zt_events_v1 = { .max_entries = ZT_EVENTS_BYTES };

/* Records each CPU submitted to zt_events_v1 since it last woke the reader
 * (the wake-up policy, zt_config.reserved[ZT_CFG_WAKEUP_RECORDS]). */
BPF_TABLE_PINNED("percpu_array", int, __u64, zt_ring_silent_v1, 1,
		 ZT_PIN_DIR "/zt_ring_silent_v1");

/* Deny events have a ring of their own: however many allowed-side events
 * wait unread in zt_events_v1, no agent's budgeted deny events are pushed out
 * by them. (Same layout as zt_events_v1; bcc wants one type per table.) */
struct zt_denials_v1_table_t {
	int key;
	__u32 leaf;
	int (*ringbuf_output)(void *, __u64, __u64);
	void *(*ringbuf_reserve)(__u64);
	void (*ringbuf_discard)(void *, __u64);
	void (*ringbuf_submit)(void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/ringbuf:" ZT_PIN_DIR "/zt_denials_v1")))
struct zt_denials_v1_table_t zt_denials_v1 = { .max_entries = ZT_DENIALS_BYTES };

#endif /* ZT_MAPS_H */
