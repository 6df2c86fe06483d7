/* Memory a fork does not copy as it is: a MADV_DONTFORK area (absent from a child) and a
 * MADV_WIPEONFORK area (zero in a child), each filled with a known byte, and a MADV_DONTFORK
 * area never touched (no page to copy). With the argument "dontdump" the MADV_DONTFORK area is
 * MADV_DONTDUMP too (absent from the kernel's core: a PT_LOAD without bytes).
 * Prints "ready DONTFORK_ADDR WIPEONFORK_ADDR EMPTY_DONTFORK_ADDR" and blocks in pause(). */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define LEN (16 * 4096)

int main(int argc, char **argv)
{
	unsigned char *keep = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *wipe = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *empty = mmap(NULL, LEN, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (keep == MAP_FAILED || wipe == MAP_FAILED || empty == MAP_FAILED ||
	    madvise(keep, LEN, MADV_DONTFORK) || madvise(wipe, LEN, MADV_WIPEONFORK) ||
	    madvise(empty, LEN, MADV_DONTFORK)) {
		perror("forkmadv");
		return 1;
	}
	if (argc > 1 && strcmp(argv[1], "dontdump") == 0 && madvise(keep, LEN, MADV_DONTDUMP)) {
		perror("forkmadv");
		return 1;
	}
	memset(keep, 0x11, LEN);
	memset(wipe, 0x22, LEN);
	printf("ready %p %p %p\n", (void *)keep, (void *)wipe, (void *)empty);
	fflush(stdout);
	for (;;)
		pause();
}
