/* Test target for faults and soak runs: a process under load that notices its own freezes and
 * checks its own memory.
 *
 * usage: heartbeat [FIXED_KIB [MUTATE_KIB [AREAS]]]   (defaults 1024, 4096 and 0)
 *
 * - a fixed region of FIXED_KIB KiB filled once with a pattern; "sum" answers its FNV-1a 64
 *   checksum, computed by the process itself, so a dump that changed a byte shows up;
 * - a mutator thread rewriting a MUTATE_KIB KiB region without pause (the load: its pages are
 *   always dirty, and it never sleeps, so the freeze has a running thread to stop);
 * - a heartbeat thread sleeping 1 ms at a time and recording the longest gap between two of its
 *   wake-ups (CLOCK_MONOTONIC): a freeze of the process shows up as one long gap;
 * - AREAS one-page mappings that cannot merge (every other one read-only): CRIU logs a line per
 *   mapping at several stages of a dump, so tests/test_faults.py can stop it mid-stage by its log.
 *
 * Line protocol on stdin/stdout (no signals: they would themselves disturb the target):
 *   "reset" -> longest gap := 0, answers "ok"
 *   "gap"   -> "gap <longest gap us> <beats since reset>"
 *   "sum"   -> "sum <checksum of the fixed region, hex>"
 *   "mut"   -> "mut <passes of the mutator so far>"
 *   EOF     -> exit 0
 * Prints "ready <pid>" once set up. Dies with its parent (PR_SET_PDEATHSIG). */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

static _Atomic uint64_t longest_gap_ns, beats, passes;
static _Atomic int reset_requested;
static unsigned char *fixed, *mutable;
static size_t fixed_size, mutable_size, areas;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *heartbeat(void *arg)
{
	struct timespec req = { 0, 1000000L };
	uint64_t last = now_ns();

	(void)arg;
	for (;;) {
		uint64_t t, gap;

		nanosleep(&req, NULL);
		t = now_ns();
		gap = t - last;
		last = t;
		if (reset_requested) {
			reset_requested = 0;
			longest_gap_ns = 0;
			beats = 0;
			continue;
		}
		if (gap > longest_gap_ns)
			longest_gap_ns = gap;
		beats++;
	}
	return NULL;
}

static void *mutator(void *arg)
{
	uint64_t x = 0x9e3779b97f4a7c15u;

	(void)arg;
	for (;;) {
		for (size_t i = 0; i < mutable_size; i += 64) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			memcpy(mutable + i, &x, sizeof(x));
		}
		passes++;
	}
	return NULL;
}

static uint64_t checksum(void)
{
	uint64_t h = 0xcbf29ce484222325u;

	for (size_t i = 0; i < fixed_size; i++)
		h = (h ^ fixed[i]) * 0x100000001b3u;
	return h;
}

static unsigned char *region(size_t size)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED) {
		perror("mmap");
		exit(2);
	}
	return p;
}

int main(int argc, char **argv)
{
	pthread_t t;
	char line[64];

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	fixed_size = (size_t)(argc > 1 ? atol(argv[1]) : 1024) << 10;
	mutable_size = (size_t)(argc > 2 ? atol(argv[2]) : 4096) << 10;
	areas = (size_t)(argc > 3 ? atol(argv[3]) : 0);
	if (!fixed_size || !mutable_size) {
		fprintf(stderr, "usage: %s [FIXED_KIB [MUTATE_KIB [AREAS]]]\n", argv[0]);
		return 2;
	}
	fixed = region(fixed_size);
	mutable = region(mutable_size);
	if (areas) {
		size_t page = (size_t)sysconf(_SC_PAGESIZE);
		unsigned char *split = region(areas * page);

		for (size_t i = 0; i < areas; i++) {
			split[i * page] = (unsigned char)i;
			if (i % 2 && mprotect(split + i * page, page, PROT_READ)) {
				perror("mprotect");
				return 2;
			}
		}
	}
	for (size_t i = 0; i < fixed_size; i++)
		fixed[i] = (unsigned char)((i * 131 + (i >> 12)) & 0xff);
	if (pthread_create(&t, NULL, heartbeat, NULL) || pthread_create(&t, NULL, mutator, NULL)) {
		perror("pthread_create");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", (int)getpid());
	while (fgets(line, sizeof(line), stdin)) {
		if (!strcmp(line, "reset\n")) {
			reset_requested = 1;
			while (reset_requested)
				usleep(100);
			printf("ok\n");
		} else if (!strcmp(line, "gap\n")) {
			printf("gap %llu %llu\n", (unsigned long long)(longest_gap_ns / 1000),
			       (unsigned long long)beats);
		} else if (!strcmp(line, "sum\n")) {
			printf("sum %016llx\n", (unsigned long long)checksum());
		} else if (!strcmp(line, "mut\n")) {
			printf("mut %llu\n", (unsigned long long)passes);
		} else {
			printf("error unknown command\n");
		}
	}
	return 0;
}
