/* Test target for the clone snapshot's kernel comparison: a server's thread pools, hundreds of
 * threads idle in the calls servers idle in (issue 12).
 *
 * usage: pool [NTHREADS]   (default 512, at most 4000)
 * Thread i blocks, at call depth i % 5, in turn in FUTEX_WAIT, read() of a pipe, nanosleep()
 * of a day, epoll_wait() without timeout and accept() on a unix socket; the main thread in
 * pause(). Prints "ready N" once every thread is about to block, then blocks until killed.
 *
 * For the clone method only: any ptrace interruption (the harness's rseq query, a seize) makes
 * epoll_wait() return EINTR, and the loop calls it again with the same registers; nanosleep()
 * has no remainder pointer, so an interruption writes nothing and it resumes as
 * restart_syscall() (CRIU's compel would turn that into EINTR: a fresh nanosleep, other
 * registers, so no CRIU case uses this program). Workers block SIGABRT, as in threads.c, so
 * that the test's SIGABRT makes the main thread the dumping one. */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int pipefd[2];
static int epfd = -1;
static int listen_fd = -1;
static uint32_t futex_word;
static volatile long sink;
static pthread_barrier_t started;

__attribute__((noinline)) static void block_in_futex(void)
{
	for (;;)
		syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
}

__attribute__((noinline)) static void block_in_read(void)
{
	char c;

	for (;;)
		sink = read(pipefd[0], &c, 1);
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

__attribute__((noinline)) static void block_in_accept(void)
{
	for (;;)
		sink = accept(listen_fd, NULL, NULL);
}

typedef void (*blocker_fn)(void);
static const blocker_fn blockers[] = {
	block_in_futex, block_in_read, block_in_nanosleep, block_in_epoll_wait, block_in_accept,
};
#define NBLOCKERS (sizeof(blockers) / sizeof(blockers[0]))

/* Distinct call depths give distinct stacks: descend recurses depth times before blocking. */
__attribute__((noinline)) static void descend(unsigned depth, unsigned which)
{
	volatile char frame[64 + 16 * (depth & 3)];

	frame[0] = (char)depth;
	if (depth > 0) {
		descend(depth - 1, which);
	} else {
		pthread_barrier_wait(&started);
		blockers[which]();
	}
	sink = frame[0];
}

static void *thread_main(void *arg)
{
	unsigned idx = (unsigned)(uintptr_t)arg;

	descend(idx % 5, idx % NBLOCKERS);
	return NULL;
}

__attribute__((noinline)) static void main_blocked_in_pause(void)
{
	for (;;)
		pause();
}

int main(int argc, char **argv)
{
	unsigned n = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 0) : 512;
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	sigset_t abrt, old_mask;
	pthread_attr_t attr;
	pthread_t tid;

	if (n == 0 || n > 4000) {
		fprintf(stderr, "usage: %s [NTHREADS 1..4000]\n", argv[0]);
		return 2;
	}
	/* an autobound abstract unix socket: nothing on disk, nothing to clean up */
	listen_fd = socket(AF_UNIX, SOCK_STREAM, 0);
	epfd = epoll_create1(0);
	if (pipe(pipefd) || epfd < 0 || listen_fd < 0 ||
	    bind(listen_fd, (struct sockaddr *)&sun, sizeof(sa_family_t)) || listen(listen_fd, 1)) {
		perror("setup");
		return 1;
	}
	pthread_barrier_init(&started, NULL, n + 1);
	sigemptyset(&abrt);
	sigaddset(&abrt, SIGABRT);
	pthread_sigmask(SIG_BLOCK, &abrt, &old_mask);
	/* small stacks: thousands of default 8 MiB stacks are address space, not the point */
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 128 << 10);
	for (unsigned i = 0; i < n; i++)
		if (pthread_create(&tid, &attr, thread_main, (void *)(uintptr_t)i)) {
			perror("pthread_create");
			return 1;
		}
	pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
	pthread_barrier_wait(&started);
	usleep(200000); /* let every thread reach its blocking call */
	printf("ready %u\n", n);
	fflush(stdout);
	main_blocked_in_pause();
	return 0;
}
