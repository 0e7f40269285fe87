/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The flow benchmark's load generator, compiled at run time by benchmarks/flows.py
 * and run as an agent (`ztnet run --agent ...`), so every connection is a kernel
 * verdict event and, when its socket is released, a flow-end event.
 *
 *   flowgen rate HOST PORT RATE SECONDS
 *       RATE connections a second for SECONDS, on an absolute schedule (a late
 *       connection does not shift the ones after it); each is socket, connect,
 *       close with an RST. Prints {"attempts", "ok", "failed", "first_errno",
 *       "ns", "behind_ns"}: behind_ns is how late the last connection started,
 *       so a generator that could not keep the rate is noticed.
 *   flowgen latency HOST PORT N INTERVAL_MS
 *       N connections, INTERVAL_MS apart. For each, prints {"t_ns", "cookie"}
 *       at once: CLOCK_REALTIME just before connect() and the socket cookie
 *       (SO_COOKIE), which the connection's flow records carry.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef SO_COOKIE
#define SO_COOKIE 57
#endif

static uint64_t clock_ns(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t deadline_ns)
{
	struct timespec ts = {.tv_sec = (time_t)(deadline_ns / 1000000000ull),
			      .tv_nsec = (long)(deadline_ns % 1000000000ull)};
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

static struct sockaddr_in address(const char *host, int port)
{
	struct sockaddr_in sin;
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, host, &sin.sin_addr) != 1) {
		fprintf(stderr, "flowgen: bad address %s\n", host);
		exit(2);
	}
	return sin;
}

/* One connection: SO_LINGER {1, 0} makes close() send an RST, so no TIME_WAIT
 * sockets pile up and exhaust the ephemeral ports. Returns 0 or an errno. */
static int connect_once(const struct sockaddr_in *sin, uint64_t *cookie)
{
	struct linger lg = {1, 0};
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	int err = 0;
	if (fd < 0)
		return errno;
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	if (connect(fd, (const struct sockaddr *)sin, sizeof(*sin)))
		err = errno;
	if (cookie) {
		socklen_t len = sizeof(*cookie);
		if (getsockopt(fd, SOL_SOCKET, SO_COOKIE, cookie, &len))
			*cookie = 0;
	}
	close(fd);
	return err;
}

static int rate(const struct sockaddr_in *sin, long per_second, long seconds)
{
	long attempts = per_second * seconds, failed = 0;
	int first_errno = 0;
	uint64_t start = clock_ns(CLOCK_MONOTONIC), behind = 0;
	for (long i = 0; i < attempts; i++) {
		uint64_t due = start + (uint64_t)i * 1000000000ull / (uint64_t)per_second;
		uint64_t now = clock_ns(CLOCK_MONOTONIC);
		if (now < due)
			sleep_until(due);
		else
			behind = now - due;
		int err = connect_once(sin, NULL);
		if (err && !failed++)
			first_errno = err;
	}
	printf("{\"attempts\": %ld, \"ok\": %ld, \"failed\": %ld, \"first_errno\": %d, "
	       "\"ns\": %llu, \"behind_ns\": %llu}\n",
	       attempts, attempts - failed, failed, first_errno,
	       (unsigned long long)(clock_ns(CLOCK_MONOTONIC) - start),
	       (unsigned long long)behind);
	return failed != 0;
}

static int latency(const struct sockaddr_in *sin, long n, long interval_ms)
{
	uint64_t next = clock_ns(CLOCK_MONOTONIC);
	for (long i = 0; i < n; i++) {
		uint64_t cookie = 0;
		uint64_t t = clock_ns(CLOCK_REALTIME);
		int err = connect_once(sin, &cookie);
		printf("{\"t_ns\": %llu, \"cookie\": %llu, \"errno\": %d}\n", (unsigned long long)t,
		       (unsigned long long)cookie, err);
		fflush(stdout);
		next += (uint64_t)interval_ms * 1000000ull;
		sleep_until(next);
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 6 || (strcmp(argv[1], "rate") && strcmp(argv[1], "latency"))) {
		fprintf(stderr, "usage: flowgen rate HOST PORT RATE SECONDS | "
				"flowgen latency HOST PORT N INTERVAL_MS\n");
		return 2;
	}
	struct sockaddr_in sin = address(argv[2], atoi(argv[3]));
	long a = atol(argv[4]), b = atol(argv[5]);
	if (a <= 0 || b <= 0) {
		fprintf(stderr, "flowgen: numbers must be positive\n");
		return 2;
	}
	return !strcmp(argv[1], "rate") ? rate(&sin, a, b) : latency(&sin, a, b);
}
