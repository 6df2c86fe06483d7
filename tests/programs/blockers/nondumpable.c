/* A target that made itself non-dumpable (prctl(PR_SET_DUMPABLE, 0)), as sshd and gpg-agent do.
 * Prints "ready" and blocks until killed. */
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(void)
{
	if (prctl(PR_SET_DUMPABLE, 0) != 0) {
		perror("prctl");
		return 1;
	}
	printf("ready\n");
	fflush(stdout);
	for (;;)
		pause();
}
