/* Blocker: connected unix sockets whose peer lives in another process.
 * usage: unix_peer [outside|child]
 *
 * A stream and a datagram socketpair are split between this process and a peer process; a
 * third stream pair stays entirely here (not a blocker). With "outside" (the default) the peer
 * is double-forked, so it is not a descendant and CRIU never dumps it; with "child" it is a
 * direct child (inside a tree dump). Prints "ready PEER STREAMFD DGRAMFD" and blocks until
 * killed; the peer exits when this process dies (its lifeline pipe reads EOF). */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static int stream[2], dgram[2], own[2], lifeline[2];

static void peer(void)
{
	char c;
	close(stream[0]);
	close(dgram[0]);
	close(own[0]);
	close(own[1]);
	close(lifeline[1]);
	while (read(lifeline[0], &c, 1) != 0)
		;
	_exit(0);
}

int main(int argc, char **argv)
{
	int outside = argc < 2 || strcmp(argv[1], "child") != 0;
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, stream) || socketpair(AF_UNIX, SOCK_DGRAM, 0, dgram) ||
	    socketpair(AF_UNIX, SOCK_STREAM, 0, own) || pipe(lifeline)) {
		perror("socketpair");
		return 1;
	}
	int report[2];
	if (pipe(report)) {
		perror("pipe");
		return 1;
	}
	pid_t child = fork();
	if (child < 0) {
		perror("fork");
		return 1;
	}
	if (child == 0) {
		close(report[0]);
		if (outside) {
			pid_t grandchild = fork();
			if (grandchild == 0) {
				close(report[1]);
				peer();
			}
			if (write(report[1], &grandchild, sizeof(grandchild)) < 0)
				_exit(1);
			_exit(0);
		}
		pid_t self = getpid();
		if (write(report[1], &self, sizeof(self)) < 0)
			_exit(1);
		close(report[1]);
		peer();
	}
	close(report[1]);
	pid_t peer_pid = -1;
	if (read(report[0], &peer_pid, sizeof(peer_pid)) != sizeof(peer_pid)) {
		fprintf(stderr, "no peer\n");
		return 1;
	}
	if (outside)
		waitpid(child, NULL, 0);
	close(stream[1]);
	close(dgram[1]);
	close(lifeline[0]);
	printf("ready %d %d %d\n", peer_pid, stream[0], dgram[0]);
	fflush(stdout);
	for (;;)
		pause();
}
