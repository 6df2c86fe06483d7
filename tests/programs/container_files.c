/* A container's process for tests/test_container_files.py: as the container's init it forks
 * the target and waits for it (an init ignores a SIGABRT it has no handler for); the target
 * writes /data.elf into the container's root filesystem (so that it travels in the checkpoint's
 * rootfs-diff.tar), maps it, maps a file of /dev/shm shared, says "ready PID" and blocks. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void)
{
	pid_t child = fork();
	if (child < 0)
		return 1;
	if (child > 0) {
		int status;
		waitpid(child, &status, 0);
		return 0;
	}
	char page[8192];
	memset(page, 'D', sizeof(page));
	/* ELF magic: the kernel dumps the first page of a readable file mapping at offset 0 that
	 * starts with it under coredump_filter bit 4 (the default 0x33) */
	memcpy(page, "\177ELF container's own data", 26);
	int fd = open("/data.elf", O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || write(fd, page, sizeof(page)) != (ssize_t)sizeof(page))
		return 1;
	if (mmap(NULL, sizeof(page), PROT_READ, MAP_PRIVATE, fd, 0) == MAP_FAILED)
		return 1;
	close(fd);
	/* a POSIX shared memory object (shm_open() is this): a file on the container's /dev/shm
	 * tmpfs, which Podman saves as devshm-checkpoint.tar */
	fd = open("/dev/shm/shared", O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || ftruncate(fd, sizeof(page)) != 0)
		return 1;
	char *shared = mmap(NULL, sizeof(page), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (shared == MAP_FAILED)
		return 1;
	close(fd);
	memset(shared, 'S', sizeof(page));
	memcpy(shared, "container's shared memory", 25);
	printf("ready %d\n", getpid());
	fflush(stdout);
	for (;;)
		pause();
}
