/*
 * Benchmark target for `make bench`: a process that notices when it is frozen.
 *
 *   workload MIB [dontfork]
 *
 * - MIB MiB of private anonymous memory, every page non-zero (so CRIU, gcore and the converter
 *   all move real bytes: none of them may skip a zero page); with "dontfork" it is
 *   MADV_DONTFORK, as V8 keeps its heap, so a fork (a clone snapshot) does not copy it;
 * - 4 busy threads spinning on arithmetic, so the freeze has running threads to stop;
 * - a heartbeat thread that sleeps 1 ms at a time and records the longest gap between two of
 *   its wake-ups (CLOCK_MONOTONIC): a freeze of the process shows up as one long gap.
 *
 * Control is a line protocol on stdin/stdout, so the benchmark reads the longest gap of a window
 * around each dump without signals (a signal would itself interrupt the syscalls under test):
 *   "reset\n" -> longest gap := 0, answers "ok"
 *   "gap\n"   -> answers "gap <longest gap us> <beats since reset>"
 *   "fork\n"  -> answers "fork <us>": how long fork() of this process takes, the floor of any
 *                copy-on-write snapshot (the kernel copies the page tables in dup_mmap())
 *   EOF       -> exit (the workload never outlives the benchmark that feeds its stdin)
 * It prints "ready <pid>" once its memory is filled. PR_SET_PDEATHSIG kills it with its parent.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BUSY_THREADS 4
#define BEAT_NS 1000000L

static _Atomic uint64_t longest_gap_ns;
static _Atomic uint64_t beats;
static _Atomic int reset_requested;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *busy(void *arg)
{
	volatile uint64_t x = (uintptr_t)arg;

	for (;;)
		x = x * 6364136223846793005u + 1442695040888963407u;
	return NULL;
}

static void *heartbeat(void *arg)
{
	struct timespec req = { 0, BEAT_NS };
	uint64_t last = now_ns();

	(void)arg;
	for (;;) {
		uint64_t t, gap;

		/* nanosleep restarts transparently after a freeze; an EINTR would only shorten one
		 * sleep, which cannot hide a long gap, so it needs no special handling. */
		nanosleep(&req, NULL);
		t = now_ns();
		gap = t - last;
		last = t;
		/* The reset is applied here, by the only writer, so that a reset racing with an
		 * update can never lose the gap that ends the window. */
		if (atomic_exchange(&reset_requested, 0)) {
			atomic_store(&longest_gap_ns, 0);
			atomic_store(&beats, 0);
			continue;
		}
		atomic_fetch_add(&beats, 1);
		if (gap > atomic_load(&longest_gap_ns))
			atomic_store(&longest_gap_ns, gap);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t tid;
	char line[64];
	size_t size, off;
	unsigned char *mem;
	long page = sysconf(_SC_PAGESIZE);
	int i;

	if (argc < 2 || argc > 3 || atol(argv[1]) <= 0 || (argc == 3 && strcmp(argv[2], "dontfork"))) {
		fprintf(stderr, "usage: %s MIB [dontfork]\n", argv[0]);
		return 2;
	}
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	size = (size_t)atol(argv[1]) << 20;
	mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	if (argc == 3 && madvise(mem, size, MADV_DONTFORK) != 0) {
		perror("madvise");
		return 1;
	}
	/* Non-zero, and different per page, so that nothing can deduplicate or skip it. */
	for (off = 0; off < size; off += (size_t)page)
		memset(mem + off, (int)(1 + (off / (size_t)page) % 255), (size_t)page);

	for (i = 0; i < BUSY_THREADS; i++)
		if (pthread_create(&tid, NULL, busy, (void *)(uintptr_t)(i + 1)) != 0)
			return 1;
	if (pthread_create(&tid, NULL, heartbeat, NULL) != 0)
		return 1;

	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", (int)getpid());
	while (fgets(line, sizeof(line), stdin)) {
		if (strcmp(line, "reset\n") == 0) {
			atomic_store(&reset_requested, 1);
			/* Wait for the heartbeat to apply it, so the window starts now. */
			while (atomic_load(&reset_requested))
				usleep(200);
			printf("ok\n");
		} else if (strcmp(line, "gap\n") == 0) {
			printf("gap %llu %llu\n",
			       (unsigned long long)(atomic_load(&longest_gap_ns) / 1000),
			       (unsigned long long)atomic_load(&beats));
		} else if (strcmp(line, "fork\n") == 0) {
			uint64_t t0 = now_ns(), t1;
			pid_t child = fork();

			if (child == 0)
				_exit(0);
			t1 = now_ns();
			if (child < 0) {
				printf("error fork: %s\n", strerror(errno));
				continue;
			}
			waitpid(child, NULL, 0);
			printf("fork %llu\n", (unsigned long long)((t1 - t0) / 1000));
		} else {
			printf("error unknown command\n");
		}
	}
	return 0;
}
