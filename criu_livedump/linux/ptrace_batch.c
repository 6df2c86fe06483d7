/*
 * ptrace(2) over many threads in one call: the clone snapshot's freeze (criu_livedump/linux/
 * ptrace.py loads this as libptrace_batch.so.1; scripts/setup.sh builds it).
 *
 * From Python each ptrace request costs about a microsecond of interpreter and ctypes work on
 * top of the kernel's own, and the target stays frozen for all of them: for a thousand threads
 * the freeze's stop, save and resume steps took three times as long from Python as from here
 * (issue 12). Each function takes the thread ids as an array and reports per thread; nothing
 * here knows a register layout (the caller passes regset note types and sizes, from its
 * architecture module).
 *
 * Every function returns 0 or -errno of the first failure that ends the step, and sets *failed
 * to the index of the thread it happened on.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef PTRACE_EVENT_STOP
#define PTRACE_EVENT_STOP 128
#endif
#ifndef __WALL
#define __WALL 0x40000000
#endif

/* what lb_stop() reports per thread */
enum { LB_EXITED = 0, LB_STOPPED = 1 };

static long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* PTRACE_SEIZE each thread (it keeps running). err[i]: 0 or errno (ESRCH: it exited). */
int lb_seize(const int *tids, int n, long options, int *err)
{
	for (int i = 0; i < n; i++)
		err[i] = ptrace(PTRACE_SEIZE, tids[i], NULL, (void *)options) ? errno : 0;
	return 0;
}

/*
 * Stop every seized thread: PTRACE_INTERRUPT all of them first, then collect each one's
 * PTRACE_EVENT_STOP, so that they all head for their stop at once rather than one after the
 * other. state[i]: LB_STOPPED, or LB_EXITED for a thread that exited (or was gone already).
 *
 * A signal-delivery stop that comes first is passed on (PTRACE_CONT with the signal), as the
 * thread would have received it anyway; the pending interrupt stops it right after. Threads
 * are waited for one by one (waitpid() on one thread is O(1) in the kernel, on any thread
 * O(threads)); one that has not stopped yet is looked at again after poll_ns, then twice as
 * long each time up to POLL_MAX_NS, so that a caller running under SCHED_FIFO never keeps its
 * CPU from the threads it waits for. Past timeout_ns the step fails with -ETIMEDOUT (a thread
 * in uninterruptible sleep), leaving every thread seized for the caller to detach.
 */
#define POLL_MAX_NS 1000000L
int lb_stop(const int *tids, int n, long timeout_ns, long poll_ns, int *state, int *failed)
{
	long deadline = now_ns() + timeout_ns;

	for (int i = 0; i < n; i++) {
		state[i] = LB_STOPPED;
		if (ptrace(PTRACE_INTERRUPT, tids[i], NULL, NULL) == 0)
			continue;
		if (errno != ESRCH) {
			*failed = i;
			return -errno;
		}
		state[i] = LB_EXITED;
	}
	for (int i = 0; i < n; i++) {
		struct timespec pause = { 0, poll_ns };
		int status;

		if (state[i] != LB_STOPPED)
			continue;
		for (;;) {
			pid_t got = waitpid(tids[i], &status, __WALL | WNOHANG);

			if (got < 0 && errno == EINTR)
				continue;
			if (got < 0) {
				*failed = i;
				return -errno;
			}
			if (got == 0) {
				if (now_ns() > deadline) {
					*failed = i;
					return -ETIMEDOUT;
				}
				nanosleep(&pause, NULL);
				if (pause.tv_nsec < POLL_MAX_NS / 2)
					pause.tv_nsec *= 2;
				continue;
			}
			if (WIFEXITED(status) || WIFSIGNALED(status)) {
				state[i] = LB_EXITED;
				break;
			}
			if ((status >> 16) == PTRACE_EVENT_STOP)
				break;
			{
				int sig = WSTOPSIG(status);

				if (ptrace(PTRACE_CONT, tids[i], NULL,
					   (void *)(long)(sig == SIGTRAP ? 0 : sig))) {
					*failed = i;
					return -errno;
				}
			}
		}
	}
	return 0;
}

/* struct ptrace_peeksiginfo_args (include/uapi/linux/ptrace.h) */
struct peek_args {
	uint64_t off;
	uint32_t flags;
	int32_t nr;
};
#define PEEK_SHARED 1
#define PEEK_BATCH 32

/*
 * The signals queued for thread *tid* (flags 0) or for its process (PEEK_SHARED), as a mask
 * (bit N-1 for signal N): PTRACE_PEEKSIGINFO walks the queue (kernel/ptrace.c:
 * ptrace_peek_siginfo()). A signal whose queue entry could not be allocated is pending without
 * one (kernel/signal.c: __send_signal_locked()) and is not seen here.
 */
static int queued(int tid, uint32_t flags, uint64_t *mask)
{
	siginfo_t info[PEEK_BATCH];
	struct peek_args args = { 0, flags, PEEK_BATCH };

	for (;;) {
		long got = ptrace(PTRACE_PEEKSIGINFO, tid, &args, info);

		if (got < 0)
			return -errno;
		for (long k = 0; k < got; k++)
			if (info[k].si_signo > 0 && info[k].si_signo <= 64)
				*mask |= 1ULL << (info[k].si_signo - 1);
		if (got < PEEK_BATCH)
			return 0;
		args.off += (uint64_t)got;
	}
}

/*
 * Save every stopped thread: the general registers (regset *gregs_note*, up to gregs_size
 * bytes each into gregs, their length into gregs_len), one FP regset (*fp_note*, likewise; a
 * length of 0 where the CPU lacks it: ENODEV), the blocked-signal mask (PTRACE_GETSIGMASK)
 * and the signals pending for it: its own and its process's queued signals.
 */
int lb_save(const int *tids, int n, long gregs_note, char *gregs, size_t gregs_size,
	    size_t *gregs_len, long fp_note, char *fp, size_t fp_size, size_t *fp_len,
	    uint64_t *sigmask, uint64_t *pending, int *failed)
{
	uint64_t shared = 0;
	int res;

	*failed = 0;
	if (n > 0 && (res = queued(tids[0], PEEK_SHARED, &shared)) < 0)
		return res;
	for (int i = 0; i < n; i++) {
		struct iovec g = { gregs + (size_t)i * gregs_size, gregs_size };
		struct iovec f = { fp + (size_t)i * fp_size, fp_size };

		*failed = i;
		if (ptrace(PTRACE_GETREGSET, tids[i], (void *)gregs_note, &g))
			return -errno;
		gregs_len[i] = g.iov_len;
		if (ptrace(PTRACE_GETREGSET, tids[i], (void *)fp_note, &f) == 0)
			fp_len[i] = f.iov_len;
		else if (errno == ENODEV)
			fp_len[i] = 0;
		else
			return -errno;
		if (ptrace(PTRACE_GETSIGMASK, tids[i], (void *)sizeof(uint64_t), &sigmask[i]))
			return -errno;
		pending[i] = shared;
		if ((res = queued(tids[i], 0, &pending[i])) < 0)
			return res;
	}
	return 0;
}

/* PTRACE_SETREGSET *note* of every thread, size bytes each, back to back in regs. */
int lb_set_regset(const int *tids, int n, long note, char *regs, size_t size, int *failed)
{
	for (int i = 0; i < n; i++) {
		struct iovec v = { regs + (size_t)i * size, size };

		if (ptrace(PTRACE_SETREGSET, tids[i], (void *)note, &v)) {
			*failed = i;
			return -errno;
		}
	}
	return 0;
}

/* PTRACE_DETACH every thread; err[i]: 0 or errno (ESRCH: it was killed meanwhile). */
int lb_detach(const int *tids, int n, int *err)
{
	for (int i = 0; i < n; i++)
		err[i] = ptrace(PTRACE_DETACH, tids[i], NULL, NULL) ? errno : 0;
	return 0;
}

/*
 * The size of regset *note* on this machine, at most max bytes: a child of ours stops at birth
 * and is asked (the kernel sizes each regset once for every task: for x86's XSAVE regset the
 * CPU's user XSAVE size, fixed at boot), so that a freeze can have its buffers ready before it
 * begins. 0 where the CPU lacks the regset (ENODEV); -errno on failure.
 */
long lb_regset_size(long note, size_t max)
{
	struct iovec v = { malloc(max), max };
	long res;
	int status;
	pid_t child;

	if (!v.iov_base)
		return -ENOMEM;
	child = fork();
	if (child < 0) {
		free(v.iov_base);
		return -errno;
	}
	if (child == 0) {
		ptrace(PTRACE_TRACEME, 0, NULL, NULL);
		raise(SIGSTOP);
		_exit(0);
	}
	if (waitpid(child, &status, __WALL) < 0)
		res = -errno;
	else if (!WIFSTOPPED(status))
		res = -ECHILD;
	else if (ptrace(PTRACE_GETREGSET, child, (void *)note, &v) == 0)
		res = (long)v.iov_len;
	else
		res = errno == ENODEV ? 0 : -errno;
	kill(child, SIGKILL);
	while (waitpid(child, &status, __WALL) < 0 && errno == EINTR)
		;
	free(v.iov_base);
	return res;
}
