/* Test target for converter/kernel comparisons: every kind of mapping the core writer treats
 * differently, and threads blocked in different functions (pause, read, futex).
 *
 * usage: mappings DATAFILE [BIG_MIB]
 * Prints "ready" on stdout once everything is set up, then blocks until killed. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static int pipefd[2];
static uint32_t futex_word;
static volatile char sink;

static void fill(unsigned char *p, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (unsigned char)((i * 131u + seed) ^ (i >> 12));
}

__attribute__((noinline)) static void *reader_blocked_in_read(void *arg)
{
	char c;
	(void)arg;
	for (;;)
		if (read(pipefd[0], &c, 1) == 1)
			sink = c;
	return NULL;
}

__attribute__((noinline)) static void *waiter_blocked_in_futex(void *arg)
{
	(void)arg;
	for (;;)
		syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
	return NULL;
}

__attribute__((noinline)) static void main_blocked_in_pause(void)
{
	for (;;)
		pause();
}

int main(int argc, char **argv)
{
	size_t pg = (size_t)sysconf(_SC_PAGESIZE);
	size_t big = (argc > 2 ? strtoul(argv[2], NULL, 0) : 1024) << 20;
	if (argc < 2) {
		fprintf(stderr, "usage: %s DATAFILE [BIG_MIB]\n", argv[0]);
		return 2;
	}

	/* private anonymous, fully written */
	unsigned char *anon = mmap(NULL, 64 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	fill(anon, 64 * pg, 1);
	/* a large mostly untouched anonymous region: three pages touched */
	unsigned char *huge = mmap(NULL, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	huge[0] = 1; huge[big / 2] = 2; huge[big - 1] = 3;
	/* shared anonymous */
	unsigned char *shanon = mmap(NULL, 16 * pg, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	fill(shanon, 8 * pg, 2);
	/* file-backed private, some pages modified; file-backed shared */
	int fd = open(argv[1], O_RDWR);
	if (fd < 0) { perror(argv[1]); return 1; }
	unsigned char *fpriv = mmap(NULL, 16 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	fpriv[0] ^= 0xff; fpriv[5 * pg + 7] ^= 0xff; sink = fpriv[9 * pg];
	unsigned char *fshared = mmap(NULL, 8 * pg, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 16 * pg);
	sink = fshared[0]; sink = fshared[3 * pg];
	/* read-only file mapping at a non-zero offset */
	unsigned char *fro = mmap(NULL, 4 * pg, PROT_READ, MAP_PRIVATE, fd, 4 * pg);
	sink = fro[pg];
	/* MADV_DONTDUMP region */
	unsigned char *nodump = mmap(NULL, 8 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	fill(nodump, 8 * pg, 3);
	madvise(nodump, 8 * pg, MADV_DONTDUMP);
	/* PROT_NONE guard between two written areas */
	unsigned char *guarded = mmap(NULL, 12 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	fill(guarded, 12 * pg, 4);
	mprotect(guarded + 4 * pg, 4 * pg, PROT_NONE);
	/* read-only anonymous with data */
	unsigned char *ro = mmap(NULL, 4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	fill(ro, 4 * pg, 5);
	mprotect(ro, 4 * pg, PROT_READ);
	/* memfd shared */
	int mfd = memfd_create("livedump-test", 0);
	if (ftruncate(mfd, 4 * pg) == 0) {
		unsigned char *m = mmap(NULL, 4 * pg, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
		fill(m, 2 * pg, 6);
	}

	if (pipe(pipefd)) { perror("pipe"); return 1; }
	/* Workers inherit a mask with SIGABRT blocked: the kernel then always routes the test's
	 * SIGABRT to the main thread, which becomes the dumping thread listed first in the kernel's
	 * core (complete_signal() skips a main thread that merely has TIF_SIGPENDING set). */
	sigset_t abrt, old_mask;
	sigemptyset(&abrt);
	sigaddset(&abrt, SIGABRT);
	pthread_sigmask(SIG_BLOCK, &abrt, &old_mask);
	pthread_t t1, t2;
	pthread_create(&t1, NULL, reader_blocked_in_read, NULL);
	pthread_create(&t2, NULL, waiter_blocked_in_futex, NULL);
	pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
	usleep(100000); /* let both threads reach their blocking calls */
	printf("ready %p %p\n", (void *)anon, (void *)huge);
	fflush(stdout);
	main_blocked_in_pause();
	return 0;
}
