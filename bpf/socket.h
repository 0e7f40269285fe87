/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Per-socket state (zt_socks_v1, socket-local storage): the stamped verdicts
 * that let a socket's later packets and datagrams skip the grant trie, and
 * the byte budgets charged on the egress path.
 *
 * A stamp holds while the config word (zt_config.generation, a counter user
 * space moves on every change a verdict depends on) is the one it was made
 * under and the clock is before the matched entry's not_after: revocation,
 * quarantine and expiry therefore still take effect on the very next packet.
 */
#ifndef ZT_SOCKET_H
#define ZT_SOCKET_H

#include "verdict.h"

/* The socket's storage, or NULL (no full socket; with `create`, no memory). */
static __always_inline struct zt_sock *zt_sock_get(void *sk, int create)
{
	return zt_socks_v1.sk_storage_get(sk, 0, create ? BPF_SK_STORAGE_GET_F_CREATE : 0);
}

/* Does `addr` (4 bytes for family 4, else 16) equal the stamp's destination? */
static __always_inline int zt_same_addr(const __u8 *stamped, __u8 family, const __u8 *addr)
{
	const __u32 *a = (const __u32 *)stamped;
	const __u32 *b = (const __u32 *)addr;
	if (family == ZT_FAMILY_V4)
		return a[0] == b[0];
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline void zt_stamp_set(struct zt_stamp *stamp, const struct zt_grant_value *match,
					 __u32 generation, __u8 proto, __u8 family,
					 const __u8 *addr, __u16 port, __u64 cgroup_id)
{
	stamp->grant_id = match->grant_id;
	stamp->cgroup_id = cgroup_id;
	stamp->max_bytes_conn = match->max_bytes_conn;
	stamp->max_bytes_window = match->max_bytes_window;
	stamp->window_ns = match->window_ns;
	stamp->generation = generation;
	stamp->proto = proto;
	stamp->family = family;
	stamp->dport_be = bpf_htons(port);
	__builtin_memset(stamp->daddr, 0, sizeof(stamp->daddr));
	if (family == ZT_FAMILY_V4)
		__builtin_memcpy(stamp->daddr, addr, 4);
	else
		__builtin_memcpy(stamp->daddr, addr, 16);
	stamp->until_ns = match->not_after_ns;  /* last: the stamp is complete */
}

/* Does the stamp still stand for (proto, family, addr, port) at `now`? */
static __always_inline int zt_stamp_holds(const struct zt_stamp *stamp, __u32 generation,
					  __u64 now, __u8 proto, __u8 family, const __u8 *addr,
					  __u16 port)
{
	return now < stamp->until_ns && stamp->generation == generation &&
	       stamp->proto == proto && stamp->family == family &&
	       stamp->dport_be == bpf_htons(port) && zt_same_addr(stamp->daddr, family, addr);
}

/* Is the window budget of the grant spent at `now`? (connects under it get EPERM) */
static __always_inline int zt_window_spent(const struct zt_grant_value *match, __u64 now)
{
	if (!match->max_bytes_window)
		return 0;
	__u64 grant_id = match->grant_id;
	struct zt_window *window = zt_budgets_v1.lookup(&grant_id);
	return window && now - window->start_ns < match->window_ns &&
	       window->bytes >= match->max_bytes_window;
}

/* Charge `len` bytes to the grant's window; 0 when that passes its budget (the
 * bytes stay counted: the window is then spent until it renews). A full table
 * refuses: a budget ztnet cannot count is not honoured as unlimited. */
static __always_inline int zt_window_charge(const struct zt_stamp *stamp, __u32 len, __u64 now)
{
	__u64 grant_id = stamp->grant_id;
	struct zt_window *window = zt_budgets_v1.lookup(&grant_id);
	if (!window) {
		struct zt_window fresh = {};
		fresh.start_ns = now;
		zt_budgets_v1.insert(&grant_id, &fresh);
		window = zt_budgets_v1.lookup(&grant_id);
		if (!window)
			return 0;
	}
	if (now - window->start_ns >= stamp->window_ns) {
		/* a new window: concurrent CPUs may each reset it, which only
		 * forgets bytes of the same instant */
		window->start_ns = now;
		window->bytes = 0;
	}
	__u64 before = __sync_fetch_and_add(&window->bytes, len);
	return before + len <= stamp->max_bytes_window;
}

/* Count one egress packet of `len` bytes on the socket's flow, within the
 * stamp's budgets. Returns 0, counting nothing on the flow, when a budget
 * refuses it: the caller drops it and cuts the flow. */
static __always_inline int zt_charge(struct zt_sock *sock, const struct zt_stamp *stamp,
				     __u32 len, __u64 now)
{
	if (stamp->max_bytes_conn || stamp->max_bytes_window) {
		__u64 before = __sync_fetch_and_add(&sock->flow.bytes_out, len);
		if ((stamp->max_bytes_conn && before + len > stamp->max_bytes_conn) ||
		    (stamp->max_bytes_window && !zt_window_charge(stamp, len, now))) {
			__sync_fetch_and_sub(&sock->flow.bytes_out, len);
			return 0;
		}
	} else {
		__sync_fetch_and_add(&sock->flow.bytes_out, len);
	}
	__sync_fetch_and_add(&sock->flow.packets_out, 1);
	sock->flow.last_ns = now;
	return 1;
}

#endif /* ZT_SOCKET_H */
