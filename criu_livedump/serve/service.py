"""The one request path behind both doors of ``serve``: decide, bound, dump, log.

:meth:`Service.submit` takes the requester's credentials *as the kernel reported them* (the
FUSE request header, SO_PEERCRED), the target pid and the SPEC words, and answers with an errno
a shell shows (0: the snapshot is taken and the target runs on). The order is the kernel's:
the target must exist and be visible (ESRCH), the requester must pass ptrace_may_access()
(EACCES, :func:`criu_livedump.target.check_requester_may_dump`), the words must parse (EINVAL)
and ask for nothing above the requester's privileges (EPERM); then the bounds: one dump at a
time per target (EBUSY), a token bucket per uid and a cap on concurrent dumps (EAGAIN). The dump
itself runs in a worker process (:mod:`.worker`), so that a full disk, a failing or hanging
CRIU, or a crash fails that request only. Every request is logged on one line.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.errors import ConversionError
from criu_livedump import target
from criu_livedump.errors import (
    BlockerError,
    LivedumpError,
    PermissionDeniedError,
    RequestError,
    TargetError,
)
from criu_livedump.linux.namespaces import ns_ino
from criu_livedump.linux.pidfd import Pidfd
from criu_livedump.request import DumpRequest, build_request, check_privileges
from criu_livedump.serve.pool import Spare, Worker

__all__ = ["ERRNO_BY_ERROR", "Answer", "Job", "Limits", "Service", "errno_for"]

log = logging.getLogger("criu_livedump.serve")

#: From library errors to the errno a requester sees; the first matching class decides.
#: Refusals keep the kernel's numbers (ESRCH, EACCES from ptrace_may_access(), EINVAL for a bad
#: word); failures after the refusals passed are EIO, and the status file says more.
ERRNO_BY_ERROR: tuple[tuple[type[Exception], int], ...] = (
    (RequestError, errno.EINVAL),
    (TargetError, errno.ESRCH),
    (PermissionDeniedError, errno.EACCES),
    (BlockerError, errno.EOPNOTSUPP),
    (LivedumpError, errno.EIO),
    (ConversionError, errno.EIO),
)

#: The most SPEC text one request may carry (the patch took one page).
MAX_WORDS_BYTES = 4096


def errno_for(error: BaseException) -> int:
    """The errno a requester sees for a library error (see :data:`ERRNO_BY_ERROR`)."""
    for cls, number in ERRNO_BY_ERROR:
        if isinstance(error, cls):
            return number
    return errno.EIO


@dataclass(frozen=True)
class Limits:
    """The service's bounds.

    :param max_dumps: dumps running at once, over all targets.
    :param rate: dumps per uid per minute, refilled continuously.
    :param burst: dumps a uid may start back to back (the bucket's size).
    :param exempt_root: uid 0 is not rate-limited (the cap still holds).
    """

    max_dumps: int = 2
    rate: float = 6.0
    burst: int = 3
    exempt_root: bool = True


@dataclass
class Job:
    """One accepted dump: its worker and, once it ended, its final report."""

    target: int
    uid: int
    done: threading.Event = field(default_factory=threading.Event)
    final: dict[str, Any] = field(default_factory=dict)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """The worker's final record (``ok``, ``core_path`` or ``error``), once it ended."""
        self.done.wait(timeout)
        return self.final


@dataclass(frozen=True)
class Answer:
    """What a request gets: errno 0 and the running :class:`Job`, or a refusal."""

    errno: int
    message: str
    job: Job | None = None


@dataclass(frozen=True)
class Requester:
    """Who asks, as the kernel reported it, and through which door."""

    pid: int
    uid: int
    gid: int
    door: str


class _Refused(Exception):
    def __init__(self, number: int, message: str) -> None:
        super().__init__(message)
        self.errno = number
        self.message = message


class Service:
    """Decides, bounds and runs live-dump requests; thread-safe (each door calls from its own
    threads)."""

    def __init__(self, limits: Limits | None = None, *, criu_path: str | None = None) -> None:
        self.limits = limits or Limits()
        self.criu_path = criu_path
        self._lock = threading.Lock()
        self._busy: set[int] = set()
        self._buckets: dict[int, tuple[float, float]] = {}
        self._status: OrderedDict[int, str] = OrderedDict()
        self._own_user_ns = ns_ino("self", "user")
        self._workers = Spare()

    def start(self) -> None:
        """Start a worker ahead of the first request."""
        self._workers.refill()

    def close(self) -> None:
        """End the spare worker; running dumps finish on their own."""
        self._workers.close()

    # --- the decision ----------------------------------------------------------------------

    def visible(self, requester: Requester, pids: Iterable[int]) -> list[int]:
        """Those of *pids* that exist for the requester (its PID namespace or one below)."""
        try:
            creds = target.requester_creds(requester.pid, requester.uid, requester.gid)
        except LivedumpError:
            return []
        return [p for p in pids if os.path.isdir(f"/proc/{p}") and target.pid_ns_visible(p, creds)]

    def check_access(self, requester: Requester, pid: int) -> target.TargetFacts:
        """The target's facts if the requester may dump it, else :class:`_Refused`."""
        try:
            creds = target.requester_creds(requester.pid, requester.uid, requester.gid)
            facts = target.inspect(pid)
            target.check_requester_may_dump(facts, creds)
        except (LivedumpError, OSError, ValueError) as e:
            raise _Refused(errno_for(e), _message(e)) from e
        return facts

    def access_errno(self, requester: Requester, pid: int, what: str) -> int:
        """0 when the requester may dump *pid*, else the errno, logged (an open() of the FUSE
        file *what*: the request is refused before any words)."""
        try:
            self.check_access(requester, pid)
        except _Refused as e:
            log.info(
                "%s open=%s decision=refused result=%s (%s)",
                _shown(requester, pid),
                what,
                errno.errorcode[e.errno],
                e,
            )
            return e.errno
        return 0

    def _parse(self, words: str) -> DumpRequest:
        try:
            if len(words.encode(errors="surrogateescape")) > MAX_WORDS_BYTES:
                raise RequestError(f"more than {MAX_WORDS_BYTES} bytes of SPEC words")
            return build_request([words])
        except RequestError as e:
            raise _Refused(errno.EINVAL, e.message) from e

    def _check_privileges(
        self, requester: Requester, facts: target.TargetFacts, request: DumpRequest
    ) -> None:
        """What the words ask for, against the requester's own privileges (EPERM)."""
        try:
            creds = target.requester_creds(requester.pid, requester.uid, requester.gid)
            # the limits of capable() (do_prlimit(), setpriority()) are the initial user
            # namespace's: capabilities held in another count for nothing here
            caps = creds.cap_eff if creds.user_ns == self._own_user_ns else 0
            check_privileges(
                request,
                target_core_hard=facts.core_hard,
                caps=caps,
                own_oom_score_adj=_oom_score_adj(creds.pid),
            )
        except PermissionDeniedError as e:
            raise _Refused(errno.EPERM, e.message) from e
        except LivedumpError as e:
            raise _Refused(errno_for(e), e.message) from e

    # --- the bounds ------------------------------------------------------------------------

    def _reserve(self, requester: Requester, pid: int) -> None:
        """Take the target and one of the requester's tokens, or refuse."""
        now = time.monotonic()
        with self._lock:
            if pid in self._busy:
                raise _Refused(errno.EBUSY, f"process {pid}: a dump of it is running")
            if len(self._busy) >= self.limits.max_dumps:
                raise _Refused(
                    errno.EAGAIN, f"{self.limits.max_dumps} dumps are running; try again later"
                )
            limited = not (self.limits.exempt_root and requester.uid == 0)
            tokens, last = self._buckets.get(requester.uid, (float(self.limits.burst), now))
            tokens = min(float(self.limits.burst), tokens + (now - last) * self.limits.rate / 60)
            if limited and tokens < 1:
                raise _Refused(
                    errno.EAGAIN,
                    f"uid {requester.uid}: rate limit of {self.limits.rate:g} dumps per minute",
                )
            self._buckets[requester.uid] = (tokens - 1 if limited else tokens, now)
            self._busy.add(pid)

    def _release(self, pid: int, status: str) -> None:
        with self._lock:
            self._busy.discard(pid)
            self._status[pid] = status
            self._status.move_to_end(pid)
            while len(self._status) > 4096:
                self._status.popitem(last=False)

    def status(self, pid: int) -> str:
        """The last dump of *pid*: where its core went and how it ended, or that none ran."""
        with self._lock:
            if pid in self._busy:
                return "running\n"
            return self._status.get(pid, "none\n")

    def running(self) -> int:
        with self._lock:
            return len(self._busy)

    # --- a request -------------------------------------------------------------------------

    def submit(self, requester: Requester, pid: int, words: str) -> Answer:
        """Decide and, if allowed, start the dump; return once its snapshot is taken.

        The words are read first (EINVAL says nothing of the target), then the rules.

        :param words: the SPEC text (the empty string takes a dump with the target's defaults).
        """
        shown = f"{_shown(requester, pid)} words={words!r}"
        decided: Pidfd | None = None
        try:
            request = self._parse(words)
            decided = _open_pidfd(pid)
            facts = self.check_access(requester, pid)
            self._check_privileges(requester, facts, request)
            self._reserve(requester, pid)
        except _Refused as e:
            if decided is not None:
                decided.close()
            log.info("%s decision=refused result=%s (%s)", shown, errno.errorcode[e.errno], e)
            return Answer(e.errno, e.message)
        job = Job(target=pid, uid=requester.uid)
        log.info("%s decision=accepted", shown)
        try:
            first = self._start(job, words, shown, decided)
        except BaseException:
            self._release(pid, "failed: the worker could not start\n")
            raise
        finally:
            decided.close()  # the worker holds its own copy
        if first.get("stage") == "snapshot" or first.get("ok"):  # ok: no core to write
            return Answer(0, "snapshot taken", job)
        job.done.wait()
        return Answer(int(first.get("errno", errno.EIO)), str(first.get("error", "failed")))

    def _start(self, job: Job, words: str, shown: str, decided: Pidfd) -> dict[str, Any]:
        """Hand the job and the pidfd decided on to a worker; return its first record, and
        finish the job in a thread."""
        worker = self._workers.take()
        worker.send({"pid": job.target, "words": words, "criu": self.criu_path}, decided.fd)
        first = worker.record()
        finisher = threading.Thread(
            target=self._finish, args=(job, worker, first, shown), daemon=True
        )
        finisher.start()
        return first

    def _finish(self, job: Job, worker: Worker, first: dict[str, Any], shown: str) -> None:
        final = first if first.get("stage") == "done" else worker.record()
        code = worker.finish()
        if not final:
            final = {
                "stage": "done",
                "ok": False,
                "errno": errno.EIO,
                "error": f"the dump's worker ended with status {code}",
            }
        job.final = final
        if final.get("ok"):
            status = (
                f"ok: {final.get('destination')} ({final.get('size', 0)} bytes,"
                f" frozen {int(final.get('frozen_us') or 0) / 1000:.1f} ms)\n"
            )
            if final.get("no_core_reason"):
                status = f"ok: no core written: {final['no_core_reason']}\n"
        else:
            status = f"failed: {final.get('error')}\n"
        self._release(job.target, status)
        log.info("%s result=%s", shown, status.strip())
        job.done.set()


def _shown(requester: Requester, pid: int) -> str:
    return f"door={requester.door} uid={requester.uid} pid={requester.pid} target={pid}"


def _open_pidfd(pid: int) -> Pidfd:
    """The process the decision is about, held from here to the worker's dump."""
    try:
        return Pidfd(pid)
    except OSError:  # ESRCH, or EINVAL for a thread that does not lead its group
        raise _Refused(errno.ESRCH, f"process {pid}: no such process") from None


def _message(error: BaseException) -> str:
    if isinstance(error, LivedumpError):
        return error.message
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    return str(error)


def _oom_score_adj(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/oom_score_adj").read_text())
    except (OSError, ValueError):
        return 0
