/* Test target for the blocked mask of threads asleep with a temporary one: each thread blocks
 * SIGUSR1 (its blocked mask), then sleeps in a syscall that installs another mask while it
 * sleeps: rt_sigsuspend (sigsuspend()), ppoll, pselect6 and epoll_pwait, each with its own
 * mask; the main thread reads stdin with the plain mask. The kernel's core shows the temporary
 * masks (fill_prstatus() reads current->blocked), PTRACE_GETSIGMASK the saved one.
 *
 * usage: sigwaits
 * Prints "ready" once every thread is about to block, then blocks until killed. Every wait is
 * retried when interrupted (a ptrace stop makes epoll_pwait fail with EINTR). */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <unistd.h>

static pthread_barrier_t started;
static int epfd = -1;

static void temporary_mask(sigset_t *set, int signo)
{
	sigemptyset(set);
	sigaddset(set, signo);
	sigaddset(set, SIGKILL); /* the kernel drops these two from every mask */
	sigaddset(set, SIGSTOP);
}

static void *in_sigsuspend(void *arg)
{
	sigset_t set;

	(void)arg;
	temporary_mask(&set, SIGUSR2);
	pthread_barrier_wait(&started);
	for (;;)
		sigsuspend(&set);
	return NULL;
}

static void *in_ppoll(void *arg)
{
	sigset_t set;

	(void)arg;
	temporary_mask(&set, SIGHUP);
	pthread_barrier_wait(&started);
	for (;;)
		ppoll(NULL, 0, NULL, &set);
	return NULL;
}

static void *in_pselect(void *arg)
{
	sigset_t set;

	(void)arg;
	temporary_mask(&set, SIGQUIT);
	pthread_barrier_wait(&started);
	for (;;)
		pselect(0, NULL, NULL, NULL, NULL, &set);
	return NULL;
}

static void *in_epoll_pwait(void *arg)
{
	struct epoll_event ev;
	sigset_t set;

	(void)arg;
	temporary_mask(&set, SIGALRM);
	pthread_barrier_wait(&started);
	for (;;)
		epoll_pwait(epfd, &ev, 1, -1, &set);
	return NULL;
}

int main(void)
{
	void *(*waits[])(void *) = { in_sigsuspend, in_ppoll, in_pselect, in_epoll_pwait };
	const int n = sizeof(waits) / sizeof(waits[0]);
	pthread_t t;
	sigset_t usr1;
	char c;

	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &usr1, NULL); /* inherited by every thread */
	epfd = epoll_create1(0);
	if (epfd < 0)
		return 1;
	pthread_barrier_init(&started, NULL, n + 1);
	for (int i = 0; i < n; i++)
		if (pthread_create(&t, NULL, waits[i], NULL))
			return 1;
	pthread_barrier_wait(&started);
	printf("ready\n");
	fflush(stdout);
	for (;;)
		if (read(0, &c, 1) == 0)
			pause(); /* stdin is /dev/null in the harness */
	return 0;
}
