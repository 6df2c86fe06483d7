/*
 * The demo's sample program: a small multi-threaded process with threads blocked in different
 * places, so that gdb's `thread apply all bt` on its live core has something to show.
 *
 *   main     joins the workers (futex wait in pthread_join)
 *   ticker   counts seconds in nanosleep(); the count keeps rising after the dump
 *   reader   blocks in read() on a pipe nobody writes to
 *   waiter   blocks in pthread_cond_wait()
 *
 * Prints "ready PID" on stdout once every thread is in place, then "tick N" every second on
 * stderr when DEMO_VERBOSE is set. Runs until killed.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long ticks;
static int quiet_pipe[2];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t never = PTHREAD_COND_INITIALIZER;
static pthread_barrier_t started;
/* Some heap state worth looking at in the core: `print *greeting` in gdb. */
static char *greeting;

static void *ticker(void *arg)
{
	(void)arg;
	int verbose = getenv("DEMO_VERBOSE") != NULL;
	pthread_barrier_wait(&started);
	for (;;) {
		struct timespec one = {1, 0};
		nanosleep(&one, NULL);
		ticks++;
		if (verbose)
			fprintf(stderr, "tick %lu\n", ticks);
	}
	return NULL;
}

static void *reader(void *arg)
{
	char c;
	(void)arg;
	pthread_barrier_wait(&started);
	while (read(quiet_pipe[0], &c, 1) != 0)
		;
	return NULL;
}

static void *waiter(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&lock);
	pthread_barrier_wait(&started);
	for (;;)
		pthread_cond_wait(&never, &lock);
	return NULL;
}

int main(void)
{
	pthread_t t[3];
	void *(*fn[3])(void *) = {ticker, reader, waiter};
	const char *names[3] = {"ticker", "reader", "waiter"};

	greeting = strdup("hello from a live core");
	if (pipe(quiet_pipe) != 0) {
		perror("pipe");
		return 1;
	}
	pthread_barrier_init(&started, NULL, 4);
	for (int i = 0; i < 3; i++) {
		if (pthread_create(&t[i], NULL, fn[i], NULL) != 0) {
			fprintf(stderr, "pthread_create failed\n");
			return 1;
		}
		pthread_setname_np(t[i], names[i]);
	}
	pthread_barrier_wait(&started);
	printf("ready %d\n", (int)getpid());
	fflush(stdout);
	for (int i = 0; i < 3; i++)
		pthread_join(t[i], NULL);
	return 0;
}
