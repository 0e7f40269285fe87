/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup/sock_release: the flow-end record of every tracked socket, with
 * its final counters (within the agent's allowed-side event budget). The
 * socket's storage goes with the socket.
 */
#include "events.h"

int zt_sock_release(struct bpf_sock *sk)
{
	struct zt_sock *sock = zt_sock_get(sk, 0);
	if (!sock || !(sock->flags & ZT_SOCK_TRACKED))
		return 1;
	struct zt_config *cfg = zt_get_config();
	if (!cfg)
		return 1;
	/* the whole flow: counters, process, and the source the egress program
	 * learnt (sock_release may not read the socket's source; only post_bind
	 * may). A flow a byte budget cut ends as denied, reason budget; an audited
	 * flow as audit, reason no grant. */
	__u8 verdict = ZT_VERDICT_ALLOWED, reason = ZT_REASON_GRANTED;
	if (sock->flags & ZT_SOCK_CUT) {
		verdict = ZT_VERDICT_DENIED;
		reason = ZT_REASON_BUDGET;
	} else if (sock->flow.flags & ZT_FLOW_AUDIT) {  /* no grant: audit mode let it through */
		verdict = ZT_VERDICT_AUDIT;
		reason = ZT_REASON_NO_GRANT;
	}
	zt_emit_flow(zt_socket_cookie(sk), sock, ZT_EV_FLOW_END, verdict, reason, 0,
		     bpf_ktime_get_boot_ns(), cfg);
	return 1;
}
