/* A target for the write tracker (criu_livedump/snapshot/precopy/tracker.py): maps PAGES
 * anonymous private pages, prints "ready ADDR PAGES", then obeys one command a line on stdin:
 *   w FIRST COUNT   write one byte into each page FIRST..FIRST+COUNT-1, answer "ok"
 *   r FIRST COUNT   read them (no write), answer "ok SUM"
 *   d FIRST COUNT   madvise(MADV_DONTNEED) them, answer "ok"
 *   m FIRST COUNT   map fresh anonymous pages over them (MAP_FIXED), answer "ok"
 *   q               exit
 * With a second argument "uffd" it first creates a userfaultfd of its own and keeps it open;
 * with "dontfork" it also maps PAGES more pages, MADV_DONTFORK, every one written with 0x5a,
 * and prints their address after PAGES on its ready line.
 * Only the pages named are touched (stdio buffers live elsewhere, in the heap).
 */
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    long pages = argc > 1 ? atol(argv[1]) : 64;
    long psz = sysconf(_SC_PAGESIZE);
    char cmd[64];
    unsigned char *mem = mmap(NULL, pages * psz, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    if (mem == MAP_FAILED)
        return 1;
    /* 1: UFFD_USER_MODE_ONLY (include/uapi/linux/userfaultfd.h), allowed unprivileged */
    if (argc > 2 && strcmp(argv[2], "uffd") == 0 && syscall(SYS_userfaultfd, O_CLOEXEC | 1) < 0)
        return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 2 && strcmp(argv[2], "dontfork") == 0) {
        unsigned char *dc = mmap(NULL, pages * psz, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

        if (dc == MAP_FAILED || madvise(dc, pages * psz, MADV_DONTFORK) != 0)
            return 3;
        memset(dc, 0x5a, pages * psz);
        printf("ready %lx %ld %lx\n", (unsigned long)mem, pages, (unsigned long)dc);
    } else {
        printf("ready %lx %ld\n", (unsigned long)mem, pages);
    }
    while (fgets(cmd, sizeof(cmd), stdin)) {
        char op;
        long first = 0, count = 0, sum = 0;

        if (sscanf(cmd, "%c %ld %ld", &op, &first, &count) < 1 || op == 'q')
            break;
        if (first < 0 || count < 0 || first + count > pages) {
            printf("bad\n");
            continue;
        }
        if (op == 'd' || op == 'm') {
            void *at = mem + first * psz;
            int failed = op == 'd' ? madvise(at, count * psz, MADV_DONTNEED) != 0
                                   : mmap(at, count * psz, PROT_READ | PROT_WRITE,
                                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != at;
            printf(failed ? "failed\n" : "ok 0\n");
            continue;
        }
        for (long i = first; i < first + count; i++) {
            if (op == 'w')
                mem[i * psz] += 1;
            else
                sum += mem[i * psz];
        }
        printf("ok %ld\n", sum);
    }
    return 0;
}
