/* Blocker: a process that is not the init of its PID namespace.
 *
 * The program unshares a PID namespace (root only), forks its init (PID 1 there), which calls
 * setsid() and forks the target (PID 2 there). It prints "ready INIT TARGET" with both host
 * PIDs, then waits. Both children die with their parent (PR_SET_PDEATHSIG), and the namespace
 * with its init.
 *
 * usage: pidns [foreign]   With "foreign" the init skips setsid(): both keep our session,
 * whose leader is outside their namespace (getsid() is 0 there), which CRIU refuses. */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

static pid_t first_child(pid_t pid)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/task/%d/children", pid, pid);
	for (int i = 0; i < 5000; i++) {
		FILE *f = fopen(path, "r");
		int child = 0;
		if (f) {
			if (fscanf(f, "%d", &child) != 1)
				child = 0;
			fclose(f);
		}
		if (child > 0)
			return child;
		usleep(1000);
	}
	return -1;
}

int main(int argc, char **argv)
{
	int foreign = argc > 1 && strcmp(argv[1], "foreign") == 0;

	if (unshare(CLONE_NEWPID) != 0) {
		perror("unshare");
		return 1;
	}
	pid_t init = fork();
	if (init < 0) {
		perror("fork");
		return 1;
	}
	if (init == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (!foreign && setsid() < 0) {
			perror("setsid");
			return 1;
		}
		pid_t target = fork();
		if (target == 0) {
			for (;;)
				pause();
		}
		for (;;)
			if (wait(NULL) < 0)
				pause();
	}
	pid_t target = first_child(init);
	if (target < 0) {
		fprintf(stderr, "no child of the namespace init\n");
		kill(init, SIGKILL);
		return 1;
	}
	printf("ready %d %d\n", init, target);
	fflush(stdout);
	for (;;)
		pause();
}
