/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ABI of hostname grants (included by ztnet.h, mirrored in ztnet/datapath/abi.py like the
 * rest of it): the addresses ztnet's resolver handed each agent, each agent's resolver
 * port, and where each redirected DNS socket really meant to send.
 */
#ifndef ZT_DNS_ABI_H
#define ZT_DNS_ABI_H

/* Learned addresses across all agents (zt_learned_v1). The daemon's resolver refuses an
 * answer (SERVFAIL) rather than hand out an address it could not store. */
#ifndef ZT_MAX_LEARNED
#define ZT_MAX_LEARNED 65536
#endif
/* Redirected DNS sockets remembered (zt_dns_peers_v1, LRU by socket cookie). */
#ifndef ZT_MAX_DNS_PEERS
#define ZT_MAX_DNS_PEERS 16384
#endif
#define ZT_DNS_PORT 53

/*
 * Key of zt_learned_v1: one address ztnet's resolver returned to one agent for a name
 * one of its hostname grants matches, for one port and protocol of that grant. port_be 0
 * stands for any port, proto ZT_PROTO_ANY for any protocol. Exact match (a hash): the
 * hooks look up at most four keys (proto or any, port or any), and only when no address
 * grant matched.
 */
struct zt_learned_key {
	__u32 agent;      /* agent index */
	__u8 proto;       /* enum zt_proto: TCP, UDP or ANY */
	__u8 family;      /* enum zt_family; IPv4-mapped IPv6 is family 4 */
	__be16 port_be;   /* destination port, network order; 0: any */
	__u8 addr[16];    /* network order; IPv4 in addr[0..3] */
};

/* CLOCK_BOOTTIME deadlines. New connects and sendmsg need now < not_after_ns (the
 * answer's TTL, floored, capped by the grant); packets of sockets already admitted need
 * now < grant_not_after_ns (the grant's own end in the kernel), so an established
 * connection outlives the DNS TTL but never its grant. */
struct zt_learned_value {
	__u64 not_after_ns;
	__u64 grant_not_after_ns;
	__u64 grant_id;
	__u64 reserved;
};

/* zt_resolvers_v1, indexed by agent index: the loopback port the daemon answers this
 * agent's DNS on (127.0.0.1 and ::1). 0: no resolver, so DNS is denied. */
/* flags: the agent holds no hostname grant, so no learned address can be its: the hooks
 * skip the four learned-address lookups on its refusals (the daemon sets it; 0, the
 * default, means "look"). */
#define ZT_RESOLVER_NO_NAMES (1u << 0)
struct zt_resolver {
	__be16 port_be;
	__u16 pad;
	__u32 flags;
};

/* zt_dns_peers_v1 (by socket cookie): where a redirected DNS socket last meant to send,
 * so that recvmsg and getpeername show that address instead of the resolver's. */
struct zt_dns_peer {
	__u8 addr[16];    /* network order; IPv4 (also when IPv4-mapped) in addr[0..3] */
	__be16 port_be;   /* the original destination port (53) */
	__be16 redirect_port_be; /* the resolver port it was sent to instead */
	__u8 family;      /* enum zt_family of addr */
	__u8 pad[3];
};

_Static_assert(sizeof(struct zt_learned_key) == 24, "zt_learned_key layout");
_Static_assert(sizeof(struct zt_learned_value) == 32, "zt_learned_value layout");
_Static_assert(sizeof(struct zt_resolver) == 8, "zt_resolver layout");
_Static_assert(sizeof(struct zt_dns_peer) == 24, "zt_dns_peer layout");

#endif /* ZT_DNS_ABI_H */
