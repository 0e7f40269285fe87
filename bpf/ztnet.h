/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ztnet kernel ABI: every struct, enum and constant shared between the BPF
 * programs and user space. ztnet/datapath/abi.py mirrors this file and
 * tests/unit/test_abi.py compiles it on the host to check sizes and offsets,
 * so it must stay free of kernel-only types.
 *
 * Layout changes bump ZT_ABI_VERSION, which is part of the bpffs pin
 * directory (/sys/fs/bpf/ztnet/v<N>/): a new layout never opens old maps.
 */
#ifndef ZTNET_H
#define ZTNET_H

#ifdef ZT_HOST_PROBE
#include <stdint.h>
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
typedef uint16_t __be16;
#endif

#define ZT_ABI_VERSION 2

/* Port prefix lengths 0 (any port) .. 16 (one port): a port range is
 * decomposed into aligned power-of-two blocks, one LPM entry per block. */
#define ZT_PORT_LEVELS 17

/* Bits of struct zt_grant_key after `prefixlen` that are always matched
 * exactly: agent, proto, family, port_bits, generation, port_be, pad2. */
#define ZT_KEY_FIXED_BITS 96

#ifndef ZT_MAX_AGENTS
#define ZT_MAX_AGENTS 4096
#endif
/* Trie entries across both generations. */
#ifndef ZT_MAX_ENTRIES
#define ZT_MAX_ENTRIES 524288
#endif

/* Protocol classes as stored in the key. ICMP stands for ICMP and ICMPv6. */
enum zt_proto {
	ZT_PROTO_ANY = 0,
	ZT_PROTO_ICMP = 1,
	ZT_PROTO_TCP = 6,
	ZT_PROTO_UDP = 17,
};

/* The protocol a TCP or UDP packet is judged as when its port cannot be read
 * (a truncated header, a later IPv4 fragment). No grant is stored with it,
 * so only grants for any protocol and any port can admit such a packet.
 * 255 is IANA's reserved protocol number: no real packet carries it. */
#define ZT_PROTO_PORT_UNKNOWN 0xff

/* Index into struct zt_levels.mask. */
enum zt_proto_class {
	ZT_CLASS_ANY = 0,
	ZT_CLASS_ICMP = 1,
	ZT_CLASS_TCP = 2,
	ZT_CLASS_UDP = 3,
	ZT_CLASS_COUNT = 4,
};

enum zt_family {
	ZT_FAMILY_V4 = 4,
	ZT_FAMILY_V6 = 6,
};

/*
 * LPM key of the grant tries. Everything before `addr` is matched exactly
 * (ZT_KEY_FIXED_BITS); the address prefix comes last because only the last
 * field of an LPM key can be a prefix. Ports therefore cannot be a prefix of
 * their own: a grant's port range becomes one entry per aligned block, and
 * the program looks up each block size (`port_bits`) the agent uses.
 * IPv4 addresses (and IPv4-mapped IPv6) use family 4 and addr[0..3].
 */
struct zt_grant_key {
	__u32 prefixlen;
	__u32 agent;      /* agent index (struct zt_agent.index), host order */
	__u8 proto;       /* enum zt_proto */
	__u8 family;      /* enum zt_family */
	__u8 port_bits;   /* 0..16: how many leading bits of port_be count */
	__u8 generation;  /* 0 or 1: which grant set this entry belongs to */
	__be16 port_be;   /* destination port masked to port_bits, network order */
	__u16 pad2;
	__u8 addr[16];    /* destination, network order */
};

/*
 * Value of a grant entry. Times are CLOCK_BOOTTIME nanoseconds so that the
 * program can compare them with bpf_ktime_get_boot_ns(): grants lapse on
 * time even when no ztnet process is alive. User space folds every grant
 * whose prefix covers this entry's prefix into the entry (an LPM lookup only
 * returns the longest match), so one hit answers the question.
 */
struct zt_grant_value {
	__u64 not_before_ns;
	__u64 not_after_ns;
	__u64 grant_id;
	/* Byte budgets of that grant (issue 12), egress bytes as skb->len counts
	 * them (headers and retransmissions included); 0: no budget. */
	__u64 max_bytes_conn;    /* per connection (socket) */
	__u64 max_bytes_window;  /* all of the grant's sockets on this host, per window */
	__u64 window_ns;         /* that window's length */
};

/* Which port_bits levels hold entries, per protocol class, for one agent
 * and generation (index: generation * ZT_MAX_AGENTS + agent index): lets the
 * program skip lookups that cannot match. */
struct zt_levels {
	__u32 mask[ZT_CLASS_COUNT];
};

#define ZT_AGENT_QUARANTINED (1u << 0)
/* Audit mode (the policy's mode = "audit"): what enforce mode would refuse is
 * let through and recorded with ZT_VERDICT_AUDIT, except toward the
 * destinations zt_audit_protected() names. Quarantine overrides it. */
#define ZT_AGENT_AUDIT (1u << 1)

/* Value of zt_agents_v1 (key: the agent cgroup's id, __u64). */
struct zt_agent {
	__u32 index;
	__u32 flags;
};

/*
 * Single entry of zt_config_v1. Two grant sets live side by side in the
 * grant trie and the level table, told apart by their generation; the
 * programs only look at the one `generation & 1` names, so writing this one
 * word swaps the whole grant set at once.
 *
 * The word is a counter, not just the bit: user space adds 1 to flip to the
 * other set and 2 when anything else a verdict depends on changes (an agent
 * quarantined, released or removed). A socket's stamped verdict (struct
 * zt_stamp) names the whole word it was judged under, so any such change
 * makes every stamp stale at once and the next packet is judged afresh.
 */
struct zt_config {
	__u32 generation;
	__u32 agent_level;  /* cgroup v2 level of <root>/agents/<name> */
	/* reserved[ZT_CFG_CLOCK_OFFSET]: the Unix-minus-boot-time offset (ns) user
	 * space wrote the grant windows with; never read by the programs.
	 * reserved[ZT_CFG_WAKEUP_RECORDS]: the wake-up policy of the
	 * allowed-side ring (zt_events_v1): each CPU wakes the reader with every
	 * that-many-th record and submits the others without a wake-up, the
	 * reader polls on a timer for them; 0: wake on every record. Deny
	 * records always wake the reader. */
	__u64 reserved[3];
};

#define ZT_CFG_CLOCK_OFFSET 0
#define ZT_CFG_WAKEUP_RECORDS 1

/*
 * Event budgets, per agent and per second, so that no agent can drown the
 * trace of the others: deny events, and "allowed-side" events (allowed
 * connect/sendmsg verdicts and flow ends) separately. What a budget drops is
 * counted per agent and reported by that agent's next event of the same side.
 */
#ifndef ZT_DENY_EVENTS_PER_SEC
#define ZT_DENY_EVENTS_PER_SEC 100
#endif
#ifndef ZT_ALLOW_EVENTS_PER_SEC
#define ZT_ALLOW_EVENTS_PER_SEC 2000
#endif
#ifndef ZT_EVENTS_BYTES
#define ZT_EVENTS_BYTES (4 * 1024 * 1024)
#endif
/* Deny events have their own ring buffer (zt_denials_v1): 1 MiB holds 6553
 * events, over a minute of 100 agents' full deny budgets left unread. */
#ifndef ZT_DENIALS_BYTES
#define ZT_DENIALS_BYTES (1024 * 1024)
#endif
/* Grants with a window budget whose counters a host keeps at once. */
#ifndef ZT_MAX_BUDGETS
#define ZT_MAX_BUDGETS 65536
#endif

enum zt_event_kind {
	ZT_EV_CONNECT = 1,
	ZT_EV_SENDMSG = 2,
	ZT_EV_FLOW_END = 3,
};

enum zt_verdict {
	ZT_VERDICT_ALLOWED = 1,
	ZT_VERDICT_DENIED = 2,
	/* refused by the grants, let through: the agent is in audit mode */
	ZT_VERDICT_AUDIT = 3,
};

/* Why: one table shared with ztnet/datapath/abi.py and docs/flows.md. */
enum zt_reason {
	ZT_REASON_GRANTED = 0,
	ZT_REASON_NO_GRANT = 1,
	ZT_REASON_NOT_AGENT = 2,
	ZT_REASON_QUARANTINED = 3,
	ZT_REASON_UNPARSED = 4,
	ZT_REASON_BUDGET = 5,  /* the grant's byte budget is spent */
	ZT_REASON_DNS_REDIRECT = 6,  /* allowed: a DNS attempt sent to ztnet's resolver */
};

/*
 * Per-socket accounting (struct zt_sock.flow, in the socket's own storage),
 * and the flow part of every event (struct zt_event.flow): what a verdict or
 * a flow end says about the socket is the same struct, copied whole. Part of
 * the value of a pinned map: a change here must bump ZT_ABI_VERSION.
 */
struct zt_flow {
	__u64 grant_id;
	__u64 cgroup_id;
	__u64 packets_out;    /* counters: flow-end records only */
	__u64 bytes_out;
	__u64 packets_in;
	__u64 bytes_in;
	__u64 first_ns;       /* CLOCK_BOOTTIME; flow-end records only */
	__u64 last_ns;
	__u32 agent;          /* agent index */
	__u32 pid;            /* thread id */
	__u32 tgid;           /* process id */
	__u32 uid;
	__u8 proto;           /* IP protocol number */
	__u8 family;          /* enum zt_family */
	__be16 dport_be;
	__be16 sport_be;      /* learnt from the first egress packet */
	__u16 flags;          /* ZT_FLOW_AUDIT; was padding (always 0) before */
	__u8 saddr[16];
	__u8 daddr[16];
	char comm[16];
};

/*
 * A verdict stamped on a socket (struct zt_sock): while the config word is
 * still `generation` and the clock is before `until_ns`, a packet or datagram
 * of this socket to this destination has the verdict `grant_id` was given,
 * without another walk of the grant trie. `until_ns` is the matched entry's
 * not_after_ns, so expiry still cuts at once; a generation change (new grant
 * set, revocation, quarantine) makes the stamp stale. The budgets are those
 * of the matched entry.
 */
struct zt_stamp {
	__u64 until_ns;          /* CLOCK_BOOTTIME; 0: no stamp */
	__u64 grant_id;
	__u64 cgroup_id;         /* sendmsg stamps: the agent cgroup judged */
	__u64 max_bytes_conn;
	__u64 max_bytes_window;
	__u64 window_ns;
	__u32 generation;        /* zt_config.generation, the whole word */
	__u8 proto;
	__u8 family;
	__be16 dport_be;
	__u8 daddr[16];
};

#define ZT_SOCK_TRACKED (1u << 0)  /* flow is described: a flow end is due */
#define ZT_SOCK_CUT (1u << 1)      /* a byte budget ran out: every packet dropped */

/*
 * Value of zt_socks_v1 (BPF_MAP_TYPE_SK_STORAGE): what ztnet knows about one
 * socket, freed by the kernel with the socket. `egress` is the verdict the
 * egress program stamped, `send` the one zt_sendmsg4/6 stamped (unconnected
 * UDP: datagrams to the stamped destination are neither judged nor traced
 * again, they are counted on the flow).
 *
 * The ingress program counts into its own fields, kept more than a cache
 * line away from everything the egress path reads or writes (a bulk flow's
 * ACKs arrive on another CPU than its data leaves from); records carry them
 * in flow.packets_in, bytes_in and last_ns.
 */
struct zt_sock {
	/* what the egress fast path touches comes first, together */
	struct zt_stamp egress;
	__u32 flags;             /* ZT_SOCK_* */
	__u32 pad;
	struct zt_flow flow;     /* flow.packets_in, bytes_in: see below */
	struct zt_stamp send;
	__u64 spacer[8];
	__u64 packets_in;
	__u64 bytes_in;
	__u64 last_in_ns;
	__u64 pad2;
};

/* Value of zt_budgets_v1 (key: grant id, __u64): one grant's bytes out in its
 * current window, over all its sockets on this host. */
struct zt_window {
	__u64 start_ns;          /* CLOCK_BOOTTIME */
	__u64 bytes;
};

/*
 * One record of the zt_events_v1 ring buffer. Connect and sendmsg verdicts
 * fill the socket fields of `flow` (no counters, no source); flow-end records
 * (sock_release) are the final zt_flows_v1 entry. `suppressed` is how many
 * events of this agent and side (deny; allowed verdicts and flow ends) its
 * budget dropped since its previous event of that side.
 *
 * Not a map value: a ring buffer has no value layout of its own, so a change
 * here needs no new pin directory. Across an upgrade from a build with an
 * older record layout, records the old programs wrote before the new ones
 * replaced them are rejected by the reader (unknown kind, verdict or
 * reason), counted as malformed; see docs/architecture.md.
 */
struct zt_event {
	__u64 time_ns;        /* CLOCK_BOOTTIME */
	__u64 cookie;         /* socket cookie */
	__u32 suppressed;
	__u8 kind;            /* enum zt_event_kind */
	__u8 verdict;         /* enum zt_verdict */
	__u8 reason;          /* enum zt_reason */
	__u8 flags;           /* ZT_EVF_* */
	struct zt_flow flow;
};

/* zt_event.flags: ZT_EVF_CUT marks the record of a flow a byte budget cut
 * (kind connect or sendmsg by the socket's protocol, verdict denied, reason
 * ZT_REASON_BUDGET, the flow's counters so far). */
#define ZT_EVF_CUT (1u << 0)

/* zt_deny_budget_v1 and zt_allow_budget_v1, indexed by agent index:
 * the current one-second window and what it dropped, not yet reported. */
struct zt_deny_budget {
	__u64 window_start_ns;
	__u32 sent;
	__u32 suppressed;
};

enum zt_counter {
	ZT_CNT_CONNECT_ALLOW = 0,
	ZT_CNT_CONNECT_DENY = 1,
	ZT_CNT_SENDMSG_ALLOW = 2,
	ZT_CNT_SENDMSG_DENY = 3,
	ZT_CNT_EGRESS_PASS = 4,
	ZT_CNT_EGRESS_DROP = 5,
	ZT_CNT_NO_AGENT = 6,
	ZT_CNT_QUARANTINED = 7,
	ZT_CNT_UNPARSED = 8,
	ZT_CNT_EVENTS_LOST = 9,       /* ring buffer full: reservation failed */
	ZT_CNT_EVENTS_SUPPRESSED = 10, /* deny events dropped by the rate limit */
	ZT_CNT_FLOWS_UNTRACKED = 11,  /* no socket storage for the flow */
	ZT_CNT_EGRESS_JUDGED = 12,    /* packets passed after a full judgement (the
				       * others of EGRESS_PASS on their socket's stamp) */
	ZT_CNT_SENDMSG_STAMPED = 13,  /* datagrams passed on the socket's stamp */
	ZT_CNT_BUDGET_CUT = 14,       /* flows cut by a byte budget */
	ZT_CNT_BUDGET_DROP = 15,      /* packets dropped on cut flows */
	ZT_CNT_COUNT = 16,
};

/* struct zt_flow.flags: the flow exists only because its agent is in audit
 * mode (no grant covered it); its flow-end record says ZT_VERDICT_AUDIT. */
#define ZT_FLOW_AUDIT (1u << 0)

/* zt_agent_drops_v1: packets the egress backstop dropped, per agent and
 * reason (percpu array, index: agent index * ZT_DROP_SLOTS + enum zt_reason).
 * Slot ZT_DROP_SLOT_AUDIT counts the packets it would have dropped and let
 * through because the agent is in audit mode. */
#define ZT_DROP_SLOTS 8
#define ZT_DROP_SLOT_AUDIT 7

/* Per-agent counters (percpu array indexed by agent index). */
struct zt_agent_stats {
	__u64 allowed;        /* connect/sendmsg allowed */
	__u64 denied;         /* connect/sendmsg denied */
	__u64 egress_packets; /* packets passed by the egress backstop */
	__u64 egress_bytes;
	__u64 egress_dropped; /* packets dropped by the egress backstop */
	__u64 ingress_packets;
	__u64 ingress_bytes;
	__u64 events_suppressed;
};

/* zt_agent_events_v1 (percpu array indexed by agent index): each agent's
 * events that never reached the ring buffer, by side. With the budgets'
 * pending counts this makes every agent's event stream add up exactly:
 * emitted + reported + pending + lost == what happened. */
struct zt_agent_events {
	__u64 deny_lost;        /* deny ring buffer (zt_denials_v1) full */
	__u64 allow_lost;       /* ring buffer (zt_events_v1) full */
	__u64 allow_suppressed; /* dropped by the allowed-side budget */
	__u64 reserved;
};

_Static_assert(sizeof(struct zt_grant_key) == 32, "zt_grant_key layout");
_Static_assert(sizeof(struct zt_grant_value) == 48, "zt_grant_value layout");
_Static_assert(sizeof(struct zt_stamp) == 72, "zt_stamp layout");
_Static_assert(sizeof(struct zt_sock) == 384, "zt_sock layout");
_Static_assert(sizeof(struct zt_window) == 16, "zt_window layout");
_Static_assert(sizeof(struct zt_levels) == 16, "zt_levels layout");
_Static_assert(sizeof(struct zt_agent) == 8, "zt_agent layout");
_Static_assert(sizeof(struct zt_config) == 32, "zt_config layout");
_Static_assert(sizeof(struct zt_agent_stats) == 64, "zt_agent_stats layout");
_Static_assert(sizeof(struct zt_event) == 160, "zt_event layout");
_Static_assert(sizeof(struct zt_flow) == 136, "zt_flow layout");
_Static_assert(sizeof(struct zt_deny_budget) == 16, "zt_deny_budget layout");
_Static_assert(sizeof(struct zt_agent_events) == 32, "zt_agent_events layout");

#include "dns_abi.h"

#endif /* ZTNET_H */
