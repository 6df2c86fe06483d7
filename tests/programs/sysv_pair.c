/* Two processes sharing a SysV segment and a pipe, each writing a counter (issue 17).
 *
 * The parent creates the segment and the pipe, forks; the child becomes uid UID (argv[1],
 * default: stays root). Each loops: its own counter `mine` up by one, published in the segment
 * (the parent's also written into the pipe); it reads the other's counter from the segment into
 * `seen_shm` (the child also reads the parent's from the pipe into `seen_pipe`). `mine`,
 * `seen_shm` and `seen_pipe` are private globals: a core shows them at the process's freeze.
 * If both were frozen at one instant, what each saw of the other is at most the other's own
 * counter in its core. Prints "ready PARENT CHILD" once both run. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/shm.h>
#include <time.h>
#include <unistd.h>

struct shared {
	volatile unsigned long counter[2];
};

volatile unsigned long mine, seen_shm, seen_pipe;
volatile int role; /* 0: parent, 1: child */

static void pause_a_little(void)
{
	struct timespec ts = {0, 50 * 1000};
	nanosleep(&ts, NULL);
}

int main(int argc, char **argv)
{
	int fds[2];
	int id = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0666);
	if (id < 0 || pipe(fds) < 0) {
		perror("shmget/pipe");
		return 1;
	}
	struct shared *sh = shmat(id, NULL, 0);
	if (sh == (void *)-1) {
		perror("shmat");
		return 1;
	}
	shmctl(id, IPC_RMID, NULL); /* gone with its last user */
	pid_t child = fork();
	if (child < 0)
		return 1;
	if (child == 0) {
		role = 1;
		close(fds[1]);
		if (argc > 1) {
			uid_t uid = (uid_t)atoi(argv[1]);
			if (setresgid(uid, uid, uid) < 0 || setresuid(uid, uid, uid) < 0) {
				perror("setresuid");
				return 1;
			}
		}
		prctl(PR_SET_PDEATHSIG, SIGKILL); /* after setresuid(), which clears it */
		if (getppid() == 1)
			return 1;
		for (;;) {
			unsigned long got;
			mine++;
			sh->counter[1] = mine;
			seen_shm = sh->counter[0];
			if (read(fds[0], &got, sizeof(got)) == sizeof(got))
				seen_pipe = got;
		}
	}
	close(fds[0]);
	while (sh->counter[1] == 0)
		pause_a_little();
	printf("ready %d %d\n", getpid(), child);
	fflush(stdout);
	for (;;) {
		mine++;
		sh->counter[0] = mine;
		if (write(fds[1], (const void *)&mine, sizeof(mine)) != sizeof(mine))
			return 1;
		seen_shm = sh->counter[1];
		pause_a_little();
	}
}
