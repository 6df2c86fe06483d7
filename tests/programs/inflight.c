/* Test target for in-flight syscalls: one thread blocked in each call a live dump must not
 * disturb, and a report of every spurious EINTR, short sleep or early wake-up.
 *
 * usage: inflight [COPIES]
 *
 * COPIES threads (default 1) block in each of
 *   read       read() of 8 bytes on a pipe (the main thread writes them on "go");
 *   nanosleep  nanosleep() of 1 s, again and again until "go"; each must last the full second
 *              (CLOCK_MONOTONIC), an early return is a "short sleep";
 *   epoll_wait epoll_wait() with an infinite timeout on an eventfd;
 *   poll       poll() with an infinite timeout on a second pipe;
 *   futex      FUTEX_WAIT (no timeout) on a word that only "go" changes;
 *   accept     accept() on a listening TCP socket on 127.0.0.1 (the test connects on "go",
 *              and the main thread COPIES - 1 more times);
 * and the main thread itself in read() on stdin, a pipe the test writes "go\n" to. With 167
 * copies the process has 1003 threads, as a server's pools have.
 *
 * A call that fails with EINTR is counted and retried, so that one interruption does not hide
 * the next. Prints "ready PORT" once every thread sleeps in its call (/proc: state S), and
 * after "go", when every thread has finished, one line per call: "ok CALL" or
 * "FAIL CALL: N x EINTR" / "FAIL CALL: ..."; exits 0 when every line is "ok", else 1. SIGCHLD
 * is caught and reported too (the clone method must never deliver one). Dies with its parent
 * (PR_SET_PDEATHSIG). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/futex.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum call { READ, NANOSLEEP, EPOLL, POLL, FUTEX, ACCEPT, STDIN, NCALLS };
static const char *names[NCALLS] = { "read", "nanosleep", "epoll_wait", "poll",
				     "futex",  "accept",    "read(stdin)" };

static _Atomic int eintr[NCALLS];
static char problem[NCALLS][128];
static _Atomic int blocked;
static pid_t *tids; /* each thread's id, stored once it is on its way into its call */
static _Atomic int go;
static _Atomic int sigchld;
static int data_pipe[2], poll_pipe[2], efd, epfd, lsock;
static uint32_t futex_word;

static void note(enum call c, const char *fmt, int value)
{
	if (!problem[c][0])
		snprintf(problem[c], sizeof(problem[c]), fmt, value);
}

static void die(const char *what)
{
	fprintf(stderr, "setup %s: %s\n", what, strerror(errno));
	exit(2);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Called by each thread just before its call: counted, and its id kept for all_sleeping(). */
static void arrive(void)
{
	int i = blocked++;

	__atomic_store_n(&tids[i], (pid_t)syscall(SYS_gettid), __ATOMIC_SEQ_CST);
}

/* Whether every thread sleeps (state S in /proc): inside its blocking call, not on its way. */
static int all_sleeping(int nthreads)
{
	char path[64], buf[512], *state;
	FILE *f;

	for (int i = 0; i < nthreads; i++) {
		pid_t tid = __atomic_load_n(&tids[i], __ATOMIC_SEQ_CST);

		if (!tid)
			return 0;
		snprintf(path, sizeof(path), "/proc/self/task/%d/stat", (int)tid);
		f = fopen(path, "r");
		if (!f)
			die("task stat");
		state = fgets(buf, sizeof(buf), f) ? strrchr(buf, ')') : NULL;
		fclose(f);
		if (!state || state[1] != ' ' || state[2] != 'S')
			return 0;
	}
	return 1;
}

static void *reader(void *arg)
{
	char buf[8];
	ssize_t n;

	(void)arg;
	arrive();
	while ((n = read(data_pipe[0], buf, sizeof(buf))) < 0 && errno == EINTR)
		eintr[READ]++;
	if (n != (ssize_t)sizeof(buf))
		note(READ, "returned %d", (int)n);
	return NULL;
}

static void *sleeper(void *arg)
{
	(void)arg;
	arrive();
	while (!go) {
		struct timespec req = { 1, 0 }, rem;
		uint64_t start = now_ns();
		int r = nanosleep(&req, &rem);

		if (r < 0 && errno == EINTR) {
			eintr[NANOSLEEP]++;
			continue;
		}
		if (r < 0)
			note(NANOSLEEP, "errno %d", errno);
		else if (now_ns() - start < 1000000000u)
			note(NANOSLEEP, "short sleep of %d us", (int)((now_ns() - start) / 1000));
	}
	return NULL;
}

static void *epoller(void *arg)
{
	struct epoll_event ev;
	int n;

	(void)arg;
	arrive();
	while ((n = epoll_wait(epfd, &ev, 1, -1)) < 0 && errno == EINTR)
		eintr[EPOLL]++;
	if (n != 1)
		note(EPOLL, "returned %d", n);
	else if (!go)
		note(EPOLL, "woke before go (%d)", n);
	return NULL;
}

static void *poller(void *arg)
{
	struct pollfd p = { .fd = poll_pipe[0], .events = POLLIN };
	int n;

	(void)arg;
	arrive();
	while ((n = poll(&p, 1, -1)) < 0 && errno == EINTR)
		eintr[POLL]++;
	if (n != 1)
		note(POLL, "returned %d", n);
	else if (!go)
		note(POLL, "woke before go (%d)", n);
	return NULL;
}

static void *futexer(void *arg)
{
	(void)arg;
	arrive();
	while (__atomic_load_n(&futex_word, __ATOMIC_SEQ_CST) == 0) {
		long r = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);

		if (r < 0 && errno == EINTR)
			eintr[FUTEX]++;
		else if (r < 0 && errno != EAGAIN)
			note(FUTEX, "errno %d", errno);
		else if (r == 0 && __atomic_load_n(&futex_word, __ATOMIC_SEQ_CST) == 0)
			note(FUTEX, "woke with the word unchanged (%d)", 0);
	}
	return NULL;
}

static void *acceptor(void *arg)
{
	int c;

	(void)arg;
	arrive();
	while ((c = accept(lsock, NULL, NULL)) < 0 && errno == EINTR)
		eintr[ACCEPT]++;
	if (c < 0)
		note(ACCEPT, "errno %d", errno);
	else
		close(c);
	return NULL;
}

static void on_sigchld(int sig)
{
	(void)sig;
	sigchld++;
}

int main(int argc, char **argv)
{
	void *(*bodies[])(void *) = { reader, sleeper, epoller, poller, futexer, acceptor };
	enum { NBODIES = sizeof(bodies) / sizeof(bodies[0]) };
	int copies = argc > 1 ? atoi(argv[1]) : 1, nthreads;
	pthread_t *threads;
	pthread_attr_t attr;
	int *extra;
	struct sockaddr_in addr = { .sin_family = AF_INET };
	socklen_t alen = sizeof(addr);
	struct epoll_event ev = { .events = EPOLLIN };
	struct sigaction sa = { .sa_handler = on_sigchld }; /* no SA_RESTART: a SIGCHLD shows */
	char line[64];
	ssize_t n;
	int failed = 0;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	sigaction(SIGCHLD, &sa, NULL);
	if (pipe(data_pipe) || pipe(poll_pipe))
		die("pipe");
	efd = eventfd(0, 0);
	epfd = epoll_create1(0);
	ev.data.fd = efd;
	if (efd < 0 || epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, efd, &ev))
		die("epoll");
	lsock = socket(AF_INET, SOCK_STREAM, 0);
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (copies < 1 || copies > 1000) {
		fprintf(stderr, "usage: inflight [COPIES (1-1000)]\n");
		return 2;
	}
	nthreads = NBODIES * copies;
	threads = calloc((size_t)nthreads, sizeof(*threads));
	tids = calloc((size_t)nthreads, sizeof(*tids));
	extra = calloc((size_t)copies, sizeof(*extra));
	if (!threads || !tids || !extra)
		die("calloc");
	if (lsock < 0 || bind(lsock, (struct sockaddr *)&addr, sizeof(addr)) ||
	    listen(lsock, copies + 4) || getsockname(lsock, (struct sockaddr *)&addr, &alen))
		die("socket");
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 256 << 10);
	for (int i = 0; i < nthreads; i++)
		if (pthread_create(&threads[i], &attr, bodies[i % NBODIES], NULL))
			die("pthread_create");
	/* every thread inside its call, not merely counted: up to 60 s on a loaded machine */
	for (int waited = 0; !all_sleeping(nthreads); waited++) {
		if (waited == 60000) {
			fprintf(stderr, "setup: the threads never all blocked in their calls\n");
			return 2;
		}
		usleep(1000);
	}
	printf("ready %d\n", ntohs(addr.sin_port));
	fflush(stdout);

	for (;;) {
		n = read(0, line, sizeof(line) - 1);
		if (n < 0 && errno == EINTR) {
			eintr[STDIN]++;
			continue;
		}
		break;
	}
	if (n <= 0 || strncmp(line, "go\n", 3) != 0)
		note(STDIN, "read %d bytes instead of go", (int)n);
	go = 1;
	for (int i = 0; i < copies; i++)
		if (write(data_pipe[1], "12345678", 8) != 8)
			die("wake");
	if (write(poll_pipe[1], "x", 1) != 1 || eventfd_write(efd, 1))
		die("wake");
	__atomic_store_n(&futex_word, 1, __ATOMIC_SEQ_CST);
	syscall(SYS_futex, &futex_word, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
	for (int i = 1; i < copies; i++) {
		extra[i] = socket(AF_INET, SOCK_STREAM, 0);
		if (extra[i] < 0 || connect(extra[i], (struct sockaddr *)&addr, sizeof(addr)))
			die("connect");
	}
	for (int i = 0; i < nthreads; i++)
		pthread_join(threads[i], NULL);

	for (int c = 0; c < NCALLS; c++) {
		if (eintr[c] || problem[c][0]) {
			failed = 1;
			printf("FAIL %s:", names[c]);
			if (eintr[c])
				printf(" %d x EINTR", eintr[c]);
			if (problem[c][0])
				printf(" %s", problem[c]);
			printf("\n");
		} else {
			printf("ok %s\n", names[c]);
		}
	}
	if (sigchld) {
		failed = 1;
		printf("FAIL SIGCHLD: %d received\n", sigchld);
	}
	fflush(stdout);
	return failed;
}
