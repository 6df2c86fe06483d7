/* Test target for the clone snapshot: checks its own syscalls and fails loudly when a snapshot
 * disturbs it.
 *
 * usage: clone_target [uring] [shm] [big=MIB]
 *
 * Threads block in nanosleep (main), read on a pipe, FUTEX_WAIT and epoll_wait; a driver thread
 * feeds them every 50 ms. The process exits non-zero, with a "FAIL ..." line on stderr, when a
 * call returns EINTR, a sleep ends early, a read comes back short, or SIGCHLD ever arrives.
 * Optional: an io_uring instance with its rings mapped ("uring"), an attached SysV shared memory
 * segment ("shm"), a BIG MiB anonymous region filled with a pattern ("big=N").
 * Prints "ready" on stdout once set up, then runs until killed; a pattern region of 1 MiB at
 * the address printed as "pattern 0x..." holds bytes (i * 7 + 3) & 0xff. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int pipefd[2];
static int efd, epfd;
static uint32_t futex_word;

static void fail(const char *what, int err)
{
	fprintf(stderr, "FAIL %s: %s\n", what, strerror(err));
	fflush(stderr);
	_exit(1);
}

static void on_sigchld(int sig)
{
	(void)sig;
	static const char msg[] = "FAIL SIGCHLD received\n";
	if (write(2, msg, sizeof(msg) - 1) < 0)
		_exit(4);
	_exit(3);
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

__attribute__((noinline)) static void *blocked_in_read(void *arg)
{
	(void)arg;
	for (;;) {
		char buf[4];
		ssize_t n = read(pipefd[0], buf, sizeof(buf));
		if (n < 0)
			fail("read", errno);
		if (n != 4 || memcmp(buf, "ping", 4) != 0)
			fail("read short", EIO);
	}
	return NULL;
}

__attribute__((noinline)) static void *blocked_in_futex(void *arg)
{
	(void)arg;
	for (;;) {
		long r = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
		if (r < 0 && errno != EAGAIN)
			fail("futex", errno);
		__atomic_store_n(&futex_word, 0, __ATOMIC_SEQ_CST);
	}
	return NULL;
}

__attribute__((noinline)) static void *blocked_in_epoll(void *arg)
{
	(void)arg;
	for (;;) {
		struct epoll_event ev;
		int n = epoll_wait(epfd, &ev, 1, -1);
		if (n < 0)
			fail("epoll_wait", errno);
		uint64_t v;
		if (read(efd, &v, sizeof(v)) != sizeof(v))
			fail("eventfd read", errno);
	}
	return NULL;
}

__attribute__((noinline)) static void *driver(void *arg)
{
	(void)arg;
	for (;;) {
		struct timespec ts = {0, 50 * 1000000};
		while (nanosleep(&ts, &ts) < 0)
			if (errno != EINTR)
				fail("driver nanosleep", errno);
		if (write(pipefd[1], "ping", 4) != 4)
			fail("pipe write", errno);
		__atomic_store_n(&futex_word, 1, __ATOMIC_SEQ_CST);
		syscall(SYS_futex, &futex_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
		uint64_t one = 1;
		if (write(efd, &one, sizeof(one)) != sizeof(one))
			fail("eventfd write", errno);
	}
	return NULL;
}

static void setup_uring(void)
{
	struct io_uring_params p;
	memset(&p, 0, sizeof(p));
	int fd = (int)syscall(__NR_io_uring_setup, 8, &p);
	if (fd < 0)
		fail("io_uring_setup", errno);
	size_t sq = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
	size_t cq = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	if (mmap(NULL, sq, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
		 IORING_OFF_SQ_RING) == MAP_FAILED)
		fail("mmap sq ring", errno);
	if (!(p.features & IORING_FEAT_SINGLE_MMAP) &&
	    mmap(NULL, cq, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
		 IORING_OFF_CQ_RING) == MAP_FAILED)
		fail("mmap cq ring", errno);
	if (mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
		 MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES) == MAP_FAILED)
		fail("mmap sqes", errno);
}

static void setup_shm(void)
{
	int id = shmget(IPC_PRIVATE, 64 * 1024, IPC_CREAT | 0600);
	if (id < 0)
		fail("shmget", errno);
	unsigned char *p = shmat(id, NULL, 0);
	if (p == (void *)-1)
		fail("shmat", errno);
	/* Removed at once: the segment lives as long as it is attached, so no test leaks it. */
	shmctl(id, IPC_RMID, NULL);
	for (size_t i = 0; i < 64 * 1024; i++)
		p[i] = (unsigned char)(i * 13 + 5);
	printf("shm %p\n", (void *)p);
}

int main(int argc, char **argv)
{
	size_t big = 0;
	int uring = 0, shm = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "uring"))
			uring = 1;
		else if (!strcmp(argv[i], "shm"))
			shm = 1;
		else if (!strncmp(argv[i], "big=", 4))
			big = strtoul(argv[i] + 4, NULL, 0) << 20;
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigchld;
	sigaction(SIGCHLD, &sa, NULL);

	if (pipe(pipefd) < 0)
		fail("pipe", errno);
	efd = eventfd(0, 0);
	epfd = epoll_create1(0);
	struct epoll_event ev = {.events = EPOLLIN, .data.fd = efd};
	if (efd < 0 || epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, efd, &ev) < 0)
		fail("epoll setup", errno);

	unsigned char *pattern = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE,
				      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (pattern == MAP_FAILED)
		fail("mmap pattern", errno);
	for (size_t i = 0; i < (1 << 20); i++)
		pattern[i] = (unsigned char)(i * 7 + 3);
	printf("pattern %p\n", (void *)pattern);
	if (big) {
		unsigned char *b = mmap(NULL, big, PROT_READ | PROT_WRITE,
					MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (b == MAP_FAILED)
			fail("mmap big", errno);
		for (size_t i = 0; i < big; i += 4096)
			b[i] = (unsigned char)(i >> 12);
	}
	if (uring)
		setup_uring();
	if (shm)
		setup_shm();

	pthread_t t;
	pthread_create(&t, NULL, blocked_in_read, NULL);
	pthread_create(&t, NULL, blocked_in_futex, NULL);
	pthread_create(&t, NULL, blocked_in_epoll, NULL);
	pthread_create(&t, NULL, driver, NULL);
	printf("ready\n");
	fflush(stdout);

	/* The main thread sleeps 100 ms at a time and checks that every sleep lasted its full time:
	 * a snapshot must neither wake it (EINTR) nor cut the sleep short. */
	for (;;) {
		struct timespec ts = {0, 100 * 1000000};
		int64_t t0 = now_ns();
		if (nanosleep(&ts, NULL) < 0)
			fail("nanosleep", errno);
		if (now_ns() - t0 < 100 * 1000000)
			fail("nanosleep short", EINTR);
	}
}
