/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The reverse half of the DNS redirect: cgroup/recvmsg4, recvmsg6, getpeername4 and
 * getpeername6. A reply from the agent's resolver (loopback, its port) on a socket whose
 * DNS was redirected shows the address the agent sent to (127.0.0.53:53, a name server
 * from resolv.conf), so stub resolvers that check who answered (glibc, musl) accept it.
 * These hooks cannot refuse anything: they always return 1.
 */
#include "names.h"

static __always_inline struct zt_dns_peer *zt_dns_peer_of(struct bpf_sock_addr *ctx)
{
	__u64 cookie = zt_socket_cookie(ctx);
	struct zt_dns_peer *peer = zt_dns_peers_v1.lookup(&cookie);
	if (!peer || ctx->user_port != peer->redirect_port_be)
		return 0;
	return peer;
}

static __always_inline int zt_dns_unredirect4(struct bpf_sock_addr *ctx)
{
	struct zt_dns_peer *peer = zt_dns_peer_of(ctx);
	if (!peer || peer->family != ZT_FAMILY_V4 || ctx->user_ip4 != bpf_htonl(0x7f000001))
		return 1;
	__u32 addr;
	__builtin_memcpy(&addr, peer->addr, 4);
	ctx->user_ip4 = addr;
	ctx->user_port = peer->port_be;
	return 1;
}

static __always_inline int zt_dns_unredirect6(struct bpf_sock_addr *ctx)
{
	struct zt_dns_peer *peer = zt_dns_peer_of(ctx);
	if (!peer)
		return 1;
	__u32 source[4];
	source[0] = ctx->user_ip6[0];
	source[1] = ctx->user_ip6[1];
	source[2] = ctx->user_ip6[2];
	source[3] = ctx->user_ip6[3];
	__u32 addr[4];
	__builtin_memcpy(addr, peer->addr, 16);
	if (peer->family == ZT_FAMILY_V4) {
		if (!zt_is_v4_mapped(source) || source[3] != bpf_htonl(0x7f000001))
			return 1;
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = addr[0];
	} else {
		if (!zt_is_loopback6(source))
			return 1;
		ctx->user_ip6[0] = addr[0];
		ctx->user_ip6[1] = addr[1];
		ctx->user_ip6[2] = addr[2];
		ctx->user_ip6[3] = addr[3];
	}
	ctx->user_port = peer->port_be;
	return 1;
}

int zt_recvmsg4(struct bpf_sock_addr *ctx)
{
	return zt_dns_unredirect4(ctx);
}

int zt_recvmsg6(struct bpf_sock_addr *ctx)
{
	return zt_dns_unredirect6(ctx);
}

int zt_getpeername4(struct bpf_sock_addr *ctx)
{
	return zt_dns_unredirect4(ctx);
}

int zt_getpeername6(struct bpf_sock_addr *ctx)
{
	return zt_dns_unredirect6(ctx);
}
