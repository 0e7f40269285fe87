/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The benchmark's load generator, compiled at run time by benchmarks/datapath.py
 * (a Python loop spends microseconds per iteration and would hide a BPF
 * program that costs a few hundred nanoseconds). benchmarks/worker.py is the
 * same program in Python, used only when no C compiler is found.
 *
 *   worker listen           bind 127.0.0.1:0, print {"port": N}, accept and close forever
 *   worker tcp  HOST PORT N  N x (socket, connect, close with RST): connects per second
 *   worker udp  HOST PORT N  N x connect() of one UDP socket (the connect4 hook, no packet)
 *   worker deny HOST PORT N  N x timed connect() that is expected to fail; latency spread
 *
 * Every measuring mode prints one JSON object on stdout and exits 0 when
 * each call had the expected outcome.
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

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* CPU time (user + system) of this process: unlike wall time it leaves out
 * the time other processes on a shared machine took the CPU away. The BPF
 * programs run inside the worker's own syscalls, so they are in it. */
static uint64_t cpu_ns(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ((uint64_t)ru.ru_utime.tv_sec + (uint64_t)ru.ru_stime.tv_sec) * 1000000000ull +
	       ((uint64_t)ru.ru_utime.tv_usec + (uint64_t)ru.ru_stime.tv_usec) * 1000ull;
}

static int report_rate(long n, uint64_t wall, uint64_t cpu, long failed, int first_errno)
{
	printf("{\"calls\": %ld, \"ns\": %llu, \"cpu_ns\": %llu, \"failed\": %ld, "
	       "\"first_errno\": %d}\n",
	       n, (unsigned long long)wall, (unsigned long long)cpu, failed, first_errno);
	return failed != 0;
}

static struct sockaddr_in address(const char *host, int port)
{
	struct sockaddr_in sin;
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, host, &sin.sin_addr) != 1) {
		fprintf(stderr, "worker: bad address %s\n", host);
		exit(2);
	}
	return sin;
}

static int listen_forever(void)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in sin = address("127.0.0.1", 0);
	socklen_t len = sizeof(sin);
	/* the kernel caps the backlog at net.core.somaxconn */
	if (bind(fd, (struct sockaddr *)&sin, sizeof(sin)) || listen(fd, 65535) ||
	    getsockname(fd, (struct sockaddr *)&sin, &len)) {
		perror("worker: listen");
		return 1;
	}
	printf("{\"port\": %d}\n", ntohs(sin.sin_port));
	fflush(stdout);
	for (;;) {
		int conn = accept(fd, NULL, NULL);
		if (conn >= 0)
			close(conn);
	}
}

/* connect + close. SO_LINGER {1, 0} makes close() send an RST, so neither
 * side keeps a TIME_WAIT socket: tens of thousands of connections in a few
 * seconds would otherwise exhaust the ephemeral ports. */
static int tcp_connects(struct sockaddr_in sin, long n)
{
	struct linger lg = {1, 0};
	long failed = 0;
	int first_errno = 0;
	uint64_t start = now_ns(), start_cpu = cpu_ns();
	for (long i = 0; i < n; i++) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		if (connect(fd, (struct sockaddr *)&sin, sizeof(sin))) {
			if (!failed++)
				first_errno = errno;
		}
		close(fd);
	}
	return report_rate(n, now_ns() - start, cpu_ns() - start_cpu, failed, first_errno);
}

/* Re-connecting one UDP socket runs the connect4 hook each time and sends
 * nothing: the purest per-call view of the socket hook's cost. */
static int udp_connects(struct sockaddr_in sin, long n)
{
	long failed = 0;
	int first_errno = 0;
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	uint64_t start = now_ns(), start_cpu = cpu_ns();
	for (long i = 0; i < n; i++) {
		if (connect(fd, (struct sockaddr *)&sin, sizeof(sin))) {
			if (!failed++)
				first_errno = errno;
		}
	}
	uint64_t wall = now_ns() - start, cpu = cpu_ns() - start_cpu;
	close(fd);
	return report_rate(n, wall, cpu, failed, first_errno);
}

static int compare_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

/* Only connect() is timed: socket() and close() are the same with and
 * without ztnet and would dilute the difference. */
static int denied_connects(struct sockaddr_in sin, long n)
{
	uint64_t *lat = calloc((size_t)n, sizeof(*lat));
	long succeeded = 0;
	int last_errno = 0;
	uint64_t total = 0;
	for (long i = 0; i < n; i++) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		uint64_t t0 = now_ns();
		int rc = connect(fd, (struct sockaddr *)&sin, sizeof(sin));
		uint64_t t1 = now_ns();
		if (rc == 0)
			succeeded++;
		else
			last_errno = errno;
		close(fd);
		lat[i] = t1 - t0;
		total += lat[i];
	}
	qsort(lat, (size_t)n, sizeof(*lat), compare_u64);
	printf("{\"calls\": %ld, \"mean_ns\": %.1f, \"p50_ns\": %llu, \"p99_ns\": %llu, "
	       "\"min_ns\": %llu, \"succeeded\": %ld, \"errno\": %d}\n",
	       n, (double)total / (double)n, (unsigned long long)lat[n / 2],
	       (unsigned long long)lat[(n * 99) / 100], (unsigned long long)lat[0], succeeded,
	       last_errno);
	free(lat);
	return succeeded != 0;
}

int main(int argc, char **argv)
{
	if (argc == 2 && !strcmp(argv[1], "listen"))
		return listen_forever();
	if (argc != 5) {
		fprintf(stderr, "usage: worker listen | worker tcp|udp|deny HOST PORT N\n");
		return 2;
	}
	struct sockaddr_in sin = address(argv[2], atoi(argv[3]));
	long n = atol(argv[4]);
	if (n <= 0) {
		fprintf(stderr, "worker: N must be positive\n");
		return 2;
	}
	if (!strcmp(argv[1], "tcp"))
		return tcp_connects(sin, n);
	if (!strcmp(argv[1], "udp"))
		return udp_connects(sin, n);
	if (!strcmp(argv[1], "deny"))
		return denied_connects(sin, n);
	fprintf(stderr, "worker: unknown mode %s\n", argv[1]);
	return 2;
}
