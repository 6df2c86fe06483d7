/* Blocker: a SysV shared memory segment attached in the host IPC namespace (what every
 * PostgreSQL process has). The segment is marked for removal at once, so it vanishes with the
 * process. Prints "ready SHMID" and blocks until killed. */
#include <stdio.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/shm.h>
#include <unistd.h>

int main(void)
{
	int id = shmget(IPC_PRIVATE, 1 << 16, IPC_CREAT | 0600);
	if (id < 0) {
		perror("shmget");
		return 1;
	}
	char *p = shmat(id, NULL, 0);
	if (p == (void *)-1) {
		perror("shmat");
		shmctl(id, IPC_RMID, NULL);
		return 1;
	}
	shmctl(id, IPC_RMID, NULL);
	memset(p, 0x5a, 1 << 16);
	printf("ready %d\n", id);
	fflush(stdout);
	for (;;)
		pause();
}
