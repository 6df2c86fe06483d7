"""One dump of ``serve``, in its own process: ``python -m criu_livedump.serve.worker``.

Reads ``{"pid": N, "words": "SPEC"}`` and the pidfd decided on from stdin, a socket
(:mod:`.pool`; the service decided already: the requester may dump that process with those
words) and runs the library's :func:`~criu_livedump.dump.live_dump`,
the very path of ``criu-livedump dump``, with the core where the kernel would put it. It writes
JSON lines on stdout: ``{"stage": "snapshot"}`` once the target runs on again, then
``{"stage": "done", "ok": ...}``. A process of its own per dump keeps a full disk, a failing
CRIU or a crash inside this request.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

from converters.errors import ConversionError
from criu_livedump.dump import DumpReport, live_dump
from criu_livedump.errors import LivedumpError
from criu_livedump.linux.pidfd import Pidfd
from criu_livedump.request import build_request
from criu_livedump.serve.service import errno_for


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def run(pid: int, words: str, criu_path: str | None, decided: Pidfd) -> dict[str, Any]:
    """The dump of *pid* as *words* ask; the final record (never raises a library error).

    :param decided: the pidfd the service decided on (see ``live_dump``'s *decided*).
    """
    try:
        # --force: the service applied the kernel's rule (a non-dumpable target needs the
        # requester's CAP_SYS_PTRACE) instead of the CLI's own policy
        request = build_request([words], force=True)
        report: DumpReport = live_dump(
            pid,
            request,
            criu_path=criu_path,
            on_snapshot=lambda _: _emit({"stage": "snapshot"}),
            decided=decided,
        )
    except LivedumpError as e:
        return {"stage": "done", "ok": False, "errno": errno_for(e), "error": e.message}
    except ConversionError as e:
        return {"stage": "done", "ok": False, "errno": errno_for(e), "error": str(e)}
    except OSError as e:
        return {"stage": "done", "ok": False, "errno": errno_for(e), "error": e.strerror}
    return {
        "stage": "done",
        "ok": True,
        "destination": report.destination,
        "core_path": report.core_path,
        "size": report.size,
        "no_core_reason": report.no_core_reason,
        "frozen_us": report.frozen_us,
    }


def _job() -> tuple[dict[str, Any], list[int]]:
    """The job and its pidfd, from the service over stdin (a SOCK_SEQPACKET socket); stdin is
    /dev/null afterwards. ({}, []) when the service ended this spare instead."""
    with socket.socket(fileno=os.dup(0)) as jobs:
        message, fds, _, _ = socket.recv_fds(jobs, 1 << 16, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    try:
        job = json.loads(message) if message else {}
    except ValueError:
        job = {}
    return (job if isinstance(job, dict) else {}), fds


def main() -> None:
    job, fds = _job()
    if not job and not fds:
        return
    try:
        pid, words = int(job["pid"]), str(job["words"])
        criu_path = None if job.get("criu") is None else str(job["criu"])
        decided = Pidfd(pid, fds[0])
    except (ValueError, KeyError, TypeError, IndexError):
        _emit({"stage": "done", "ok": False, "errno": 22, "error": "bad job"})
        return
    with decided:
        _emit(run(pid, words, criu_path, decided))


if __name__ == "__main__":
    main()
