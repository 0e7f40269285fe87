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
/* Socket accounting by cookie; LRU so a full table evicts the oldest flow
 * instead of refusing new ones (an eviction loses that flow's end record,
 * which zt_counters_v1[ZT_CNT_FLOWS_UNTRACKED] does not see: the table is
 * sized well above the sockets agents hold). */
BPF_TABLE_PINNED("lru_hash", __u64, struct zt_flow, zt_flows_v1, ZT_MAX_FLOWS,
		 ZT_PIN_DIR "/zt_flows_v1");
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
