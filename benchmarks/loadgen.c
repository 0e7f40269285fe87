/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The head-to-head benchmark's load generator and server, compiled at run time
 * by benchmarks/headtohead.py with the system compiler (a Python loop spends
 * microseconds per call and would hide filters that cost a few hundred
 * nanoseconds).
 *
 *   loadgen serve ADDR TCPPORT UDPPORT  accept() and close() on ADDR:TCPPORT forever; a UDP
 *                                       socket bound on ADDR:UDPPORT that is never read (the
 *                                       kernel drops what does not fit its buffer: the sink
 *                                       costs the sender nothing)
 *   loadgen tcp  HOST PORT N            N x (socket, timed connect, close with RST)
 *   loadgen udp  HOST PORT N            N x sendto() of 64 bytes on one unconnected socket
 *   loadgen deny HOST PORT N            N x timed connect() that must fail
 *
 * Every measuring mode prints one JSON object on stdout: calls, wall and CPU
 * nanoseconds, latency percentiles where timed, failures and the first errno.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define DATAGRAM_BYTES 64

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* user + system time of this process: the filters run inside its syscalls */
static uint64_t cpu_ns(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ((uint64_t)ru.ru_utime.tv_sec + (uint64_t)ru.ru_stime.tv_sec) * 1000000000ull +
	       ((uint64_t)ru.ru_utime.tv_usec + (uint64_t)ru.ru_stime.tv_usec) * 1000ull;
}

static struct sockaddr_in address(const char *host, int port)
{
	struct sockaddr_in sin;
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, host, &sin.sin_addr) != 1) {
		fprintf(stderr, "loadgen: bad address %s\n", host);
		exit(2);
	}
	return sin;
}

static int compare_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

static void print_result(long n, uint64_t wall, uint64_t cpu, uint64_t *lat, long failed,
			 int first_errno)
{
	printf("{\"calls\": %ld, \"ns\": %llu, \"cpu_ns\": %llu, \"failed\": %ld, "
	       "\"first_errno\": %d",
	       n, (unsigned long long)wall, (unsigned long long)cpu, failed, first_errno);
	if (lat) {
		qsort(lat, (size_t)n, sizeof(*lat), compare_u64);
		printf(", \"p50_ns\": %llu, \"p99_ns\": %llu, \"min_ns\": %llu",
		       (unsigned long long)lat[n / 2], (unsigned long long)lat[(n * 99) / 100],
		       (unsigned long long)lat[0]);
	}
	printf("}\n");
}

static int serve(const char *host, int tcp_port, int udp_port)
{
	int one = 1, small = 4096;
	struct sockaddr_in tcp = address(host, tcp_port), udp = address(host, udp_port);
	int lfd = socket(AF_INET, SOCK_STREAM, 0);
	int ufd = socket(AF_INET, SOCK_DGRAM, 0);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(ufd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
	/* the kernel caps the backlog at net.core.somaxconn */
	if (bind(lfd, (struct sockaddr *)&tcp, sizeof(tcp)) || listen(lfd, 65535) ||
	    bind(ufd, (struct sockaddr *)&udp, sizeof(udp))) {
		perror("loadgen: serve");
		return 1;
	}
	printf("{\"ready\": 1}\n");
	fflush(stdout);
	for (;;) {
		int conn = accept(lfd, NULL, NULL);
		if (conn >= 0)
			close(conn);
	}
}

/* connect + close. SO_LINGER {1, 0} makes close() send an RST, so neither side keeps a
 * TIME_WAIT socket (tens of thousands of connections would exhaust the ephemeral ports).
 * Only connect() is timed for the latency; the rate counts the whole cycle. */
static int tcp_connects(struct sockaddr_in sin, long n)
{
	struct linger lg = {1, 0};
	long failed = 0;
	int first_errno = 0;
	uint64_t *lat = calloc((size_t)n, sizeof(*lat));
	uint64_t start = now_ns(), start_cpu = cpu_ns();
	for (long i = 0; i < n; i++) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		uint64_t t0 = now_ns();
		if (connect(fd, (struct sockaddr *)&sin, sizeof(sin)) && !failed++)
			first_errno = errno;
		lat[i] = now_ns() - t0;
		close(fd);
	}
	uint64_t wall = now_ns() - start, cpu = cpu_ns() - start_cpu;
	print_result(n, wall, cpu, lat, failed, first_errno);
	free(lat);
	return failed != 0;
}

/* Unconnected sendto(): every datagram runs the sendmsg hook and the egress filter. A full
 * peer queue drops silently on veth; errors other than ENOBUFS fail the run. */
static int udp_sends(struct sockaddr_in sin, long n)
{
	char payload[DATAGRAM_BYTES];
	long failed = 0;
	int first_errno = 0;
	memset(payload, 'z', sizeof(payload));
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	uint64_t start = now_ns(), start_cpu = cpu_ns();
	for (long i = 0; i < n; i++) {
		if (sendto(fd, payload, sizeof(payload), 0, (struct sockaddr *)&sin, sizeof(sin)) < 0 &&
		    !failed++)
			first_errno = errno;
	}
	uint64_t wall = now_ns() - start, cpu = cpu_ns() - start_cpu;
	close(fd);
	print_result(n, wall, cpu, NULL, failed, first_errno);
	return failed != 0 && first_errno != ENOBUFS;
}

static int denied_connects(struct sockaddr_in sin, long n)
{
	uint64_t *lat = calloc((size_t)n, sizeof(*lat));
	long refused = 0, succeeded = 0;
	int first_errno = 0;
	uint64_t start = now_ns(), start_cpu = cpu_ns();
	for (long i = 0; i < n; i++) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		uint64_t t0 = now_ns();
		int rc = connect(fd, (struct sockaddr *)&sin, sizeof(sin));
		lat[i] = now_ns() - t0;
		if (rc == 0)
			succeeded++;
		else if (!refused++)
			first_errno = errno;
		close(fd);
	}
	uint64_t wall = now_ns() - start, cpu = cpu_ns() - start_cpu;
	/* "failed" counts connects that were not refused */
	print_result(n, wall, cpu, lat, succeeded, first_errno);
	free(lat);
	return succeeded != 0;
}

int main(int argc, char **argv)
{
	if (argc == 5 && !strcmp(argv[1], "serve"))
		return serve(argv[2], atoi(argv[3]), atoi(argv[4]));
	if (argc != 5) {
		fprintf(stderr, "usage: loadgen serve ADDR TCPPORT UDPPORT | "
				"loadgen tcp|udp|deny HOST PORT N\n");
		return 2;
	}
	struct sockaddr_in sin = address(argv[2], atoi(argv[3]));
	long n = atol(argv[4]);
	if (n <= 0) {
		fprintf(stderr, "loadgen: N must be positive\n");
		return 2;
	}
	if (!strcmp(argv[1], "tcp"))
		return tcp_connects(sin, n);
	if (!strcmp(argv[1], "udp"))
		return udp_sends(sin, n);
	if (!strcmp(argv[1], "deny"))
		return denied_connects(sin, n);
	fprintf(stderr, "loadgen: unknown mode %s\n", argv[1]);
	return 2;
}
