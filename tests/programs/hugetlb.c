/* Test target: anonymous hugetlb memory, private and shared (2 MiB pages, 4 MiB each), every
 * small page of it written. The kernel dumps hugetlb VMAs whole or not at all, by the
 * coredump_filter bits HUGETLB_PRIVATE (0x20) and HUGETLB_SHARED (0x40), and lists both in
 * NT_FILE as "/anon_hugepage (deleted)". Needs 4 free huge pages (vm.nr_hugepages).
 *
 * Prints "ready PRIVATE SHARED" once set up, then blocks in pause() until killed. */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
int main(void)
{
	size_t sz = 4 << 20;
	char *priv = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
	char *shr = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
	if (priv == MAP_FAILED || shr == MAP_FAILED) { perror("mmap"); return 1; }
	for (size_t i = 0; i < sz; i += 4096) { priv[i] = (char)(i >> 12); shr[i] = (char)(0x55 ^ (i >> 12)); }
	printf("ready %p %p\n", priv, shr); fflush(stdout);
	for (;;) pause();
}
