/* Test target for the clone snapshot under seccomp: installs a filter, prints "ready", sleeps.
 *
 * usage: clone_seccomp [kill-clone]
 *   no argument  an allow-everything filter (a filter is a filter: the snapshot cannot know what
 *                it forbids);
 *   kill-clone   SECCOMP_RET_KILL_PROCESS on clone(2) and clone3(2), the very syscall the clone
 *                method injects; everything else is allowed;
 *   errno-pause  SECCOMP_RET_ERRNO(EPERM) on pause(2), the syscall the clone sleeps in for CRIU
 *                (the program itself then blocks in sigsuspend()). */
#define _GNU_SOURCE
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct sock_filter allow[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
	struct sock_filter kill_clone[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone, 2, 0),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone3, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
	};
	struct sock_filter errno_pause[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_pause, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = {.len = 1, .filter = allow};
	if (argc > 1 && strcmp(argv[1], "kill-clone") == 0) {
		prog.len = sizeof(kill_clone) / sizeof(kill_clone[0]);
		prog.filter = kill_clone;
	} else if (argc > 1 && strcmp(argv[1], "errno-pause") == 0) {
		prog.len = sizeof(errno_pause) / sizeof(errno_pause[0]);
		prog.filter = errno_pause;
	}
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
		perror("seccomp");
		return 1;
	}
	printf("ready\n");
	fflush(stdout);
	sigset_t none;
	sigemptyset(&none);
	for (;;)
		if (prog.filter == errno_pause)
			sigsuspend(&none);
		else
			pause();
}
