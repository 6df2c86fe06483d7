/* A target for the consistency test of live dumps (issue 14): threads stamping a sequence
 * number into many pages while the dump runs, each thread's position kept in its registers.
 *
 *   seqwriter NTHREADS PAGES [nice=N] [fill=MIB]
 *
 * One private anonymous area of NTHREADS * PAGES pages (PAGES a power of two); thread t owns
 * the PAGES pages at AREA + t * PAGES * page_size. Each writer runs the loop below in assembly so
 * that its whole state is in three callee-saved registers, which NT_PRSTATUS shows:
 *   r12 = n, the number of stamps this thread has written,
 *   r14 = the base of its pages, r15 = PAGES - 1;
 * stamp n writes the 8-byte value n + 1 at the start of page n & r15, then r12 becomes n + 1.
 * So in any one instant, page k of a thread whose r12 is n holds m + 1 for the last m < n with
 * m & r15 == k (0 when there is none), except page n & r15, which may already hold n + 1 (the
 * store done, the increment not yet). A page newer than that, or older, is not of that instant.
 * The writer never enters the kernel of its own accord (a sched_yield() between sweeps would
 * leave the writers waiting for a CPU all stopped inside it, at a sweep's end): wherever a dump
 * stops it, it is in the middle of its work.
 *
 * Prints "ready AREA NTHREADS PAGES" (AREA in hex) once every writer runs; the main thread then
 * sleeps until killed. nice=N lowers the priority of every thread (the writers never block);
 * fill=MIB maps MIB more of private anonymous memory, written once before the writers start
 * (pages a precopy round copies once, that are not written again).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

struct writer {
	uintptr_t base;
	uint64_t mask;
};

static pthread_barrier_t started;

static void *write_stamps(void *arg)
{
	struct writer *w = arg;

	pthread_barrier_wait(&started);
	__asm__ volatile("mov %0, %%r14\n\t"
			 "mov %1, %%r15\n\t"
			 "xor %%r12d, %%r12d\n"
			 "1:\n\t"
			 "mov %%r12, %%rax\n\t"
			 "and %%r15, %%rax\n\t"
			 "shl $12, %%rax\n\t"
			 "lea 1(%%r12), %%rdx\n\t"
			 "mov %%rdx, (%%r14,%%rax)\n\t"
			 "inc %%r12\n\t"
			 "jmp 1b\n\t"
			 :
			 : "r"(w->base), "r"(w->mask)
			 : "rax", "rdx", "r12", "r14", "r15", "memory");
	return NULL;
}

int main(int argc, char **argv)
{
	long page = sysconf(_SC_PAGESIZE), threads, pages, i;
	struct writer *writers;
	unsigned char *area;
	pthread_t tid;
	long fill = 0;
	int prio = 0;

	for (i = 3; i < argc; i++)
		if (sscanf(argv[i], "nice=%d", &prio) != 1 && sscanf(argv[i], "fill=%ld", &fill) != 1)
			break;
	if (argc < 3 || (threads = atol(argv[1])) <= 0 || (pages = atol(argv[2])) <= 0 ||
	    (pages & (pages - 1)) != 0 || page != 4096 || i < argc || fill < 0) {
		fprintf(stderr,
			"usage: %s NTHREADS PAGES(power of two) [nice=N] [fill=MIB] (4 KiB pages)\n",
			argv[0]);
		return 2;
	}
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (prio && nice(prio) == -1) {
		perror("nice");
		return 1;
	}
	if (fill) {
		unsigned char *once = mmap(NULL, (size_t)fill << 20, PROT_READ | PROT_WRITE,
					   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (once == MAP_FAILED) {
			perror("mmap");
			return 1;
		}
		memset(once, 0x5a, (size_t)fill << 20);
	}
	area = mmap(NULL, (size_t)(threads * pages * page), PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	writers = calloc((size_t)threads, sizeof(*writers));
	if (area == MAP_FAILED || writers == NULL) {
		perror("mmap");
		return 1;
	}
	pthread_barrier_init(&started, NULL, (unsigned)threads + 1);
	for (i = 0; i < threads; i++) {
		writers[i].base = (uintptr_t)(area + i * pages * page);
		writers[i].mask = (uint64_t)pages - 1;
		if (pthread_create(&tid, NULL, write_stamps, &writers[i]) != 0) {
			perror("pthread_create");
			return 1;
		}
	}
	pthread_barrier_wait(&started);
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %lx %ld %ld\n", (unsigned long)area, threads, pages);
	for (;;)
		pause();
}
