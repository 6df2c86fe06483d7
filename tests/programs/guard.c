/* Test target: MADV_GUARD_INSTALL guard pages (Linux 6.13) inside an anonymous and inside a
 * file-backed private mapping. CRIU 4.2 lists them as VMA_AREA_GUARD entries overlapping the
 * real VMAs; the kernel's core has holes there (get_dump_page() fails on a guard marker).
 *
 * usage: guard DATAFILE (at least 8 pages). Prints "ready ANON FILE" once set up, then blocks
 * in pause() until killed. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif

int main(int argc, char **argv)
{
	size_t pg = (size_t)sysconf(_SC_PAGESIZE);
	if (argc != 2) { fprintf(stderr, "usage: guard DATAFILE\n"); return 2; }
	int fd = open(argv[1], O_RDONLY);
	char *anon = mmap(NULL, 8 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *file = mmap(NULL, 8 * pg, PROT_READ, MAP_PRIVATE, fd, 0);
	if (fd < 0 || anon == MAP_FAILED || file == MAP_FAILED) { perror("guard"); return 1; }
	memset(anon, 0x41, 8 * pg);
	if (madvise(anon + 2 * pg, 2 * pg, MADV_GUARD_INSTALL) ||
	    madvise(file + 4 * pg, 2 * pg, MADV_GUARD_INSTALL)) {
		perror("madvise(MADV_GUARD_INSTALL)");
		return 1;
	}
	printf("ready %p %p\n", (void *)anon, (void *)file);
	fflush(stdout);
	for (;;)
		pause();
}
