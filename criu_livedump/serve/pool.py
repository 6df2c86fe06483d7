"""The worker processes of ``serve``: one per dump, one more started ahead of need.

A worker (:mod:`.worker`) spends most of a second importing the library before it can start
CRIU; the spare has done that while nobody waited, so a request waits for its snapshot only.
The job goes to the worker over a SOCK_SEQPACKET pair on its stdin, with the pidfd the service
decided on attached (SCM_RIGHTS); its records come back as JSON lines on its stdout.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["Spare", "Worker"]

#: how long a discarded worker may take to see its end of the pair closed
_DISCARD_TIMEOUT = 10.0


@dataclass
class Worker:
    """One started ``python -m criu_livedump.serve.worker``, waiting for its job."""

    proc: subprocess.Popen[bytes]
    jobs: socket.socket

    @classmethod
    def start(cls) -> Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "criu_livedump.serve.worker"],
                stdin=theirs.fileno(),
                stdout=subprocess.PIPE,
                close_fds=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(proc, ours)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, job: dict[str, Any], pidfd: int) -> None:
        """Hand the job over, *pidfd* with it; a worker that died already reads as ended."""
        with contextlib.suppress(OSError):
            socket.send_fds(self.jobs, [json.dumps(job).encode()], [pidfd])
        self.jobs.close()

    def record(self) -> dict[str, Any]:
        """Its next JSON line, or {} at its end (or on garbage)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        try:
            value = json.loads(line) if line else {}
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def finish(self) -> int:
        """Wait for it to end; its exit status."""
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.wait()

    def discard(self) -> None:
        """End an unused worker: its job socket closes, it exits; killed if it does not."""
        self.jobs.close()
        try:
            self.proc.wait(_DISCARD_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.finish()


class Spare:
    """Hands out workers, keeping one started ahead (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spare: Worker | None = None
        self._closed = False

    def take(self) -> Worker:
        """The spare if it is still alive, else a new worker; a new spare is started."""
        with self._lock:
            worker, self._spare = self._spare, None
        if worker is not None and not worker.alive():
            worker.discard()
            worker = None
        self.refill()
        return worker if worker is not None else Worker.start()

    def refill(self) -> None:
        """Start a spare unless there is one (or the pool is closed)."""
        with self._lock:
            if self._spare is not None or self._closed:
                return
            self._spare = Worker.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            worker, self._spare = self._spare, None
        if worker is not None:
            worker.discard()
