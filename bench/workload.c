/*
 * Benchmark target for `make bench`: a process that notices when it is frozen.
 *
 *   workload MIB [dontfork] [threads=N] [maps=N] [dirty=MBPS]
 *
 * - MIB MiB of private anonymous memory, every page non-zero (so CRIU, gcore and the converter
 *   all move real bytes: none of them may skip a zero page); with "dontfork" it is
 *   MADV_DONTFORK, as V8 keeps its heap, so a fork (a clone snapshot) does not copy it;
 * - 4 busy threads spinning on arithmetic, so the freeze has running threads to stop;
 * - threads=N: N more threads, idle as a server's pool is, blocked in turn in FUTEX_WAIT, read()
 *   of a pipe, epoll_wait() and a long nanosleep() (JVMs and C++ servers run thousands);
 * - maps=N: N more one-page private anonymous mappings, written to, alternately read-only and
 *   read-write so that no two merge: N more VMAs whose page tables a fork copies;
 * - dirty=MBPS: one more thread writing a byte into page after page of the MIB MiB, round and
 *   round, MBPS MB (10^6 bytes) of pages a second, paced every millisecond: the pages a
 *   pre-copy finds written again (without it, the busy threads write only their stacks);
 * - a heartbeat thread that sleeps 1 ms at a time and records the longest gap between two of
 *   its wake-ups (CLOCK_MONOTONIC): a freeze of the process shows up as one long gap.
 *
 * Control is a line protocol on stdin/stdout, so the benchmark reads the longest gap of a window
 * around each dump without signals (a signal would itself interrupt the syscalls under test):
 *   "reset\n" -> longest gap := 0, answers "ok"
 *   "gap\n"   -> answers "gap <longest gap us> <beats since reset>"
 *   "gapat T0 T1\n" -> answers "gapat <us>": the longest gap since reset that overlaps
 *                [T0, T1] (CLOCK_MONOTONIC ns, as a tool reports its freeze), 0 when no late
 *                beat (a gap over LATE_NS) did: the freeze itself, not the noise around it
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
#include <linux/futex.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BUSY_THREADS 4
#define BEAT_NS 1000000L

/* every late beat since reset: [start, end) of its gap, written by the heartbeat alone */
#define LATE_NS 1500000u
#define MAX_LATE 65536
static uint64_t late[MAX_LATE][2];
static _Atomic unsigned n_late;
static _Atomic uint64_t longest_gap_ns;
static _Atomic uint64_t beats;
static _Atomic int reset_requested;
static uint32_t idle_word;
static int idle_pipe[2], idle_epoll;
/* what the dirtying thread writes (dirty=MBPS) */
static unsigned char *dirty_mem;
static size_t dirty_pages;
static long dirty_mbps;

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

/* dirty=MBPS: as many pages written as MBPS MB/s makes due since the start, every 1 ms. */
static void *dirty(void *arg)
{
	struct timespec tick = { 0, BEAT_NS };
	long page = sysconf(_SC_PAGESIZE);
	uint64_t start = now_ns(), written = 0;
	size_t next = 0;

	(void)arg;
	for (;;) {
		uint64_t due = (now_ns() - start) * (uint64_t)dirty_mbps / 1000u / (uint64_t)page;

		for (; written < due; written++) {
			dirty_mem[next * (size_t)page] += 1;
			next = (next + 1) % dirty_pages;
		}
		nanosleep(&tick, NULL);
	}
	return NULL;
}

/* An idle thread: blocked for ever in one of four calls, by its index. */
static void *idle(void *arg)
{
	struct timespec day = { 86400, 0 };
	struct epoll_event ev;
	char c;

	for (;;) {
		switch ((uintptr_t)arg % 4) {
		case 0:
			syscall(SYS_futex, &idle_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
			break;
		case 1:
			if (read(idle_pipe[0], &c, 1) < 0 && errno != EINTR)
				return NULL;
			break;
		case 2:
			epoll_wait(idle_epoll, &ev, 1, -1);
			break;
		default:
			nanosleep(&day, NULL);
		}
	}
	return NULL;
}

static int start_idle(long n)
{
	pthread_attr_t attr;
	pthread_t tid;
	long i;

	if (pipe(idle_pipe) != 0 || (idle_epoll = epoll_create1(0)) < 0)
		return -1;
	/* small stacks: a thousand default 8 MiB stacks are address space, not the point */
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 64 << 10);
	for (i = 0; i < n; i++)
		if (pthread_create(&tid, &attr, idle, (void *)(uintptr_t)i) != 0)
			return -1;
	pthread_attr_destroy(&attr);
	return 0;
}

/* N one-page mappings, written, alternately PROT_READ and PROT_READ|PROT_WRITE: N VMAs. */
static int map_many(long n)
{
	long page = sysconf(_SC_PAGESIZE), i;
	unsigned char *area;

	area = mmap(NULL, (size_t)n * (size_t)page, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (area == MAP_FAILED)
		return -1;
	for (i = 0; i < n; i++) {
		area[i * page] = (unsigned char)(1 + i % 255);
		if (i % 2 && mprotect(area + i * page, (size_t)page, PROT_READ) != 0)
			return -1;
	}
	return 0;
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
			atomic_store(&n_late, 0);
			continue;
		}
		atomic_fetch_add(&beats, 1);
		if (gap > LATE_NS) {
			unsigned n = atomic_load(&n_late);

			if (n < MAX_LATE) {
				late[n][0] = t - gap;
				late[n][1] = t;
				atomic_store(&n_late, n + 1); /* after the entry: readers see it whole */
			}
		}
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
	int i, dontfork = 0;
	long idle_threads = 0, maps = 0;

	for (i = 2; i < argc; i++) {
		if (strcmp(argv[i], "dontfork") == 0)
			dontfork = 1;
		else if (strncmp(argv[i], "threads=", 8) == 0 && atol(argv[i] + 8) >= 0)
			idle_threads = atol(argv[i] + 8);
		else if (strncmp(argv[i], "maps=", 5) == 0 && atol(argv[i] + 5) >= 0)
			maps = atol(argv[i] + 5);
		else if (strncmp(argv[i], "dirty=", 6) == 0 && atol(argv[i] + 6) > 0)
			dirty_mbps = atol(argv[i] + 6);
		else
			break;
	}
	if (argc < 2 || atol(argv[1]) <= 0 || i < argc) {
		fprintf(stderr, "usage: %s MIB [dontfork] [threads=N] [maps=N] [dirty=MBPS]\n",
			argv[0]);
		return 2;
	}
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	size = (size_t)atol(argv[1]) << 20;
	mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	if (maps && map_many(maps) != 0) {
		perror("maps");
		return 1;
	}
	if (idle_threads && start_idle(idle_threads) != 0) {
		perror("threads");
		return 1;
	}
	if (dontfork && madvise(mem, size, MADV_DONTFORK) != 0) {
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
	if (dirty_mbps) {
		dirty_mem = mem;
		dirty_pages = size / (size_t)page;
		if (pthread_create(&tid, NULL, dirty, NULL) != 0)
			return 1;
	}

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
		} else if (strncmp(line, "gapat ", 6) == 0) {
			unsigned long long t0 = 0, t1 = 0, best = 0;
			unsigned n = atomic_load(&n_late);

			sscanf(line + 6, "%llu %llu", &t0, &t1);
			for (unsigned i = 0; i < n; i++)
				if (late[i][0] < t1 && late[i][1] > t0 && late[i][1] - late[i][0] > best)
					best = late[i][1] - late[i][0];
			printf("gapat %llu\n", best / 1000);
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
