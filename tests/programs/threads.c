/* Test target for converter/kernel comparisons: many threads, each blocked in a different
 * function at a different call depth, and threads with distinctive SSE/AVX register contents.
 *
 * usage: threads [NTHREADS [pool]]   (default 12)
 * Prints "ready" on stdout once every thread is about to block, then blocks until killed.
 * Threads block only in calls that CRIU's seize and the harness's rseq query restart
 * transparently, leaving no state behind: no nanosleep (an interrupted nanosleep writes the
 * remaining time to the stack), no poll or epoll_wait (see below).
 *
 * With "pool", for the clone method only, the threads are a server's pools (issue 12): in turn
 * in FUTEX_WAIT, read(), nanosleep() of a day, epoll_wait() without timeout and accept(). Any
 * ptrace interruption (the harness's rseq query) makes epoll_wait() return EINTR and the loop
 * call it again with the same registers; nanosleep() has no remainder pointer, so it resumes as
 * restart_syscall() with nothing written. CRIU's compel would turn that into EINTR (a fresh
 * nanosleep, other registers), so no CRIU case uses this mode. */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int pipefd[2];
static int listen_fd = -1;
static int sockpair[2];
static int epfd = -1;
static uint32_t futex_word;
static volatile long sink;
static pthread_barrier_t started;

__attribute__((noinline)) static void block_in_read(void)
{
	char c;
	for (;;)
		if (read(pipefd[0], &c, 1) == 1)
			sink = c;
}

__attribute__((noinline)) static void block_in_futex(void)
{
	for (;;)
		syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
}

/* ppoll, not poll: poll(2) turns an interruption into -ERESTART_RESTARTBLOCK, which CRIU
 * resumes as -EINTR (compel), so the live target's poll() returns and the process changes
 * between the two dumps; ppoll without a timeout restarts transparently (-ERESTARTNOHAND). */
__attribute__((noinline)) static void block_in_ppoll(void)
{
	struct pollfd p = { .fd = pipefd[0], .events = POLLIN };
	for (;;)
		sink = ppoll(&p, 1, NULL, NULL);
}

/* recv, not epoll_wait: epoll_wait returns -EINTR on every ptrace interruption. */
__attribute__((noinline)) static void block_in_recv(void)
{
	char c;
	for (;;)
		sink = recv(sockpair[0], &c, 1, 0);
}

__attribute__((noinline)) static void block_in_select(void)
{
	for (;;) {
		fd_set r;
		FD_ZERO(&r);
		FD_SET(pipefd[0], &r);
		sink = select(pipefd[0] + 1, &r, NULL, NULL, NULL);
	}
}

__attribute__((noinline)) static void block_in_sigwait(void)
{
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	for (;;) {
		int sig;
		sigwait(&set, &sig);
		sink = sig;
	}
}

__attribute__((noinline)) static void block_in_accept(void)
{
	for (;;)
		sink = accept(listen_fd, NULL, NULL);
}

/* Load a distinct pattern into xmm0-15 and the upper halves of ymm0-15 (arm64: v0-v15), then
 * block in a raw read(2) issued from the same asm statement, so nothing can clobber the vector
 * registers. */
__attribute__((noinline)) static void block_with_vector_registers(unsigned seed)
{
	uint8_t pattern[32] __attribute__((aligned(32)));
	char c;
	for (unsigned i = 0; i < sizeof(pattern); i++)
		pattern[i] = (uint8_t)(seed * 37u + i * 11u + 1u);
	for (;;) {
#if defined(__aarch64__)
		register long x0 __asm__("x0") = pipefd[0];
		register long x1 __asm__("x1") = (long)&c;
		register long x2 __asm__("x2") = 1;
		register long x8 __asm__("x8") = SYS_read;
		__asm__ volatile(
			"ld1 {v0.16b, v1.16b}, [%[p]]\n\t"
			"add v2.16b, v1.16b, v0.16b\n\t"
			"add v3.16b, v2.16b, v0.16b\n\t"
			"add v4.16b, v3.16b, v0.16b\n\t"
			"add v5.16b, v4.16b, v0.16b\n\t"
			"add v6.16b, v5.16b, v0.16b\n\t"
			"add v7.16b, v6.16b, v0.16b\n\t"
			"add v16.16b, v7.16b, v0.16b\n\t"
			"add v17.16b, v16.16b, v0.16b\n\t"
			"add v18.16b, v17.16b, v0.16b\n\t"
			"add v19.16b, v18.16b, v0.16b\n\t"
			"svc #0"
			: "+r"(x0)
			: "r"(x1), "r"(x2), "r"(x8), [p] "r"(pattern)
			: "memory", "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "v16", "v17",
			  "v18", "v19");
		sink = x0;
#else
		long ret;
		__asm__ volatile(
			"vmovdqa (%[p]), %%ymm0\n\t"
			"vpaddb %%ymm0, %%ymm0, %%ymm1\n\t"
			"vpaddb %%ymm1, %%ymm0, %%ymm2\n\t"
			"vpaddb %%ymm2, %%ymm0, %%ymm3\n\t"
			"vpaddb %%ymm3, %%ymm0, %%ymm4\n\t"
			"vpaddb %%ymm4, %%ymm0, %%ymm5\n\t"
			"vpaddb %%ymm5, %%ymm0, %%ymm6\n\t"
			"vpaddb %%ymm6, %%ymm0, %%ymm7\n\t"
			"vpaddb %%ymm7, %%ymm0, %%ymm8\n\t"
			"vpaddb %%ymm8, %%ymm0, %%ymm9\n\t"
			"vpaddb %%ymm9, %%ymm0, %%ymm10\n\t"
			"vpaddb %%ymm10, %%ymm0, %%ymm11\n\t"
			"vpaddb %%ymm11, %%ymm0, %%ymm12\n\t"
			"vpaddb %%ymm12, %%ymm0, %%ymm13\n\t"
			"vpaddb %%ymm13, %%ymm0, %%ymm14\n\t"
			"vpaddb %%ymm14, %%ymm0, %%ymm15\n\t"
			"syscall"
			: "=a"(ret)
			: "a"((long)SYS_read), "D"((long)pipefd[0]), "S"(&c), "d"(1L), [p] "r"(pattern)
			: "rcx", "r11", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5",
			  "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13",
			  "xmm14", "xmm15");
		sink = ret;
#endif
	}
}

__attribute__((noinline)) static void block_in_nanosleep(void)
{
	struct timespec day = { 86400, 0 };
	for (;;)
		sink = nanosleep(&day, NULL);
}

__attribute__((noinline)) static void block_in_epoll_wait(void)
{
	struct epoll_event ev;
	for (;;)
		sink = epoll_wait(epfd, &ev, 1, -1);
}

typedef void (*blocker_fn)(void);
static const blocker_fn blockers[] = {
	block_in_read, block_in_futex, block_in_ppoll, block_in_recv,
	block_in_select, block_in_sigwait, block_in_accept,
};
#define NBLOCKERS (sizeof(blockers) / sizeof(blockers[0]))
static const blocker_fn pool_blockers[] = {
	block_in_futex, block_in_read, block_in_nanosleep, block_in_epoll_wait, block_in_accept,
};
#define NPOOL (sizeof(pool_blockers) / sizeof(pool_blockers[0]))
static int pool;

/* Distinct call depths give distinct stacks: depth_N recurses N times before blocking. */
__attribute__((noinline)) static void descend(unsigned depth, unsigned which)
{
	volatile char frame[64 + 16 * (depth & 3)];
	frame[0] = (char)depth;
	if (depth > 0) {
		descend(depth - 1, which);
	} else if (pool) {
		pthread_barrier_wait(&started);
		pool_blockers[which % NPOOL]();
	} else if (which == NBLOCKERS) {
		block_with_vector_registers(which);
	} else {
		pthread_barrier_wait(&started);
		blockers[which % NBLOCKERS]();
	}
	sink = frame[0];
}

static void *thread_main(void *arg)
{
	unsigned idx = (unsigned)(uintptr_t)arg;
	unsigned which = idx % (pool ? NPOOL : NBLOCKERS + 1);
	if (!pool && which == NBLOCKERS)
		pthread_barrier_wait(&started);
	descend(idx % 5, which);
	return NULL;
}

__attribute__((noinline)) static void main_blocked_in_pause(void)
{
	for (;;)
		pause();
}

int main(int argc, char **argv)
{
	unsigned n = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 0) : 12;
	pool = argc > 2 && strcmp(argv[2], "pool") == 0;
	if (n == 0 || n > 1000 || (argc > 2 && !pool)) {
		fprintf(stderr, "usage: %s [NTHREADS 1..1000 [pool]]\n", argv[0]);
		return 2;
	}
	if (pool && (epfd = epoll_create1(0)) < 0) {
		perror("epoll_create1");
		return 1;
	}
	if (pipe(pipefd)) {
		perror("pipe");
		return 1;
	}
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sockpair)) {
		perror("socketpair");
		return 1;
	}
	/* an autobound abstract unix socket: nothing on disk, nothing to clean up */
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	listen_fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&sun, sizeof(sa_family_t)) ||
	    listen(listen_fd, 1)) {
		perror("socket");
		return 1;
	}
	pthread_barrier_init(&started, NULL, n + 1);
	/* Workers inherit a mask with SIGABRT blocked: the kernel then always routes the test's
	 * SIGABRT to the main thread, which becomes the dumping thread listed first in the kernel's
	 * core (complete_signal() skips a main thread that merely has TIF_SIGPENDING set). */
	sigset_t abrt, old_mask;
	sigemptyset(&abrt);
	sigaddset(&abrt, SIGABRT);
	pthread_sigmask(SIG_BLOCK, &abrt, &old_mask);
	pthread_t *t = calloc(n, sizeof(*t));
	for (unsigned i = 0; i < n; i++)
		if (pthread_create(&t[i], NULL, thread_main, (void *)(uintptr_t)i)) {
			perror("pthread_create");
			return 1;
		}
	pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
	pthread_barrier_wait(&started);
	usleep(100000); /* let every thread reach its blocking call */
	printf("ready %u\n", n);
	fflush(stdout);
	main_blocked_in_pause();
	return 0;
}
