/* Blocker: deleted-but-open files. usage: deleted_file DIR
 *
 * Creates, fills and unlinks three files in DIR: a 2 MiB one kept open as an fd (above CRIU's
 * 1 MiB ghost limit), a 2 MiB one kept only as a mapping, and a 4 KiB one kept open (below the
 * limit, so not a blocker). Prints "ready BIGFD" and blocks until killed. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int make(const char *dir, const char *name, size_t size)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0) {
		perror(path);
		exit(1);
	}
	char buf[4096];
	memset(buf, 0xa5, sizeof(buf));
	for (size_t done = 0; done < size; done += sizeof(buf))
		if (write(fd, buf, sizeof(buf)) != (ssize_t)sizeof(buf)) {
			perror("write");
			exit(1);
		}
	fsync(fd);
	unlink(path);
	return fd;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: deleted_file DIR\n");
		return 2;
	}
	int big = make(argv[1], "big-open", 2 << 20);
	int mapped = make(argv[1], "big-mapped", 2 << 20);
	void *m = mmap(NULL, 2 << 20, PROT_READ, MAP_PRIVATE, mapped, 0);
	if (m == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	close(mapped);
	make(argv[1], "small-open", 4096);
	printf("ready %d\n", big);
	fflush(stdout);
	for (;;)
		pause();
}
