"""The socket door of ``serve``: one JSON request per connection on a unix stream socket.

The requester is SO_PEERCRED's pid, uid and gid (net/core/sock.c: the credentials at
connect()), never a field of the request. A request is ``{"pid": N, "spec": "WORDS"}`` (spec may
also be a list of words, or absent), at most :data:`MAX_REQUEST` bytes, read within
:data:`READ_TIMEOUT` seconds; the answer is JSON lines (see :mod:`.client`). systemd socket
activation is honoured: with ``LISTEN_PID`` this process and ``LISTEN_FDS`` >= 1, fd 3 is the
listening socket (sd_listen_fds(3)).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
import threading
from pathlib import Path
from typing import Any

from criu_livedump.serve.service import Requester, Service

__all__ = ["MAX_REQUEST", "listening_socket", "serve_socket"]

log = logging.getLogger("criu_livedump.serve")

MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 5.0
#: connections served at once; more wait in the listen backlog
MAX_CONNECTIONS = 64
_SD_LISTEN_FDS_START = 3
#: include/linux/threads.h PID_MAX_LIMIT on 64-bit
_PID_MAX_LIMIT = 4 * 1024 * 1024
_UCRED = struct.Struct("=iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


def listening_socket(path: Path) -> tuple[socket.socket, bool]:
    """The socket systemd passed (LISTEN_FDS), else *path* bound anew, mode 0666 (who may
    dump whom is decided per request, on SO_PEERCRED); and whether the path is ours to remove
    at the end (not systemd's)."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and int(
        os.environ.get("LISTEN_FDS", "0") or 0
    ):
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        sock = socket.socket(fileno=_SD_LISTEN_FDS_START)
        os.set_inheritable(sock.fileno(), False)
        return sock, False
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(str(path))
    os.chmod(path, 0o666)
    sock.listen(128)
    return sock, True


def serve_socket(service: Service, sock: socket.socket, stop: threading.Event) -> None:
    """Accept connections until *stop* is set, each in a thread of its own (bounded)."""
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    sock.settimeout(0.5)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError as e:
            if stop.is_set():
                return
            log.warning("socket: accept failed: %s", e.strerror)
            continue
        slots.acquire()
        threading.Thread(target=_connection, args=(service, conn, slots), daemon=True).start()


def _connection(service: Service, conn: socket.socket, slots: threading.BoundedSemaphore) -> None:
    try:
        with conn:
            conn.settimeout(READ_TIMEOUT)
            pid, uid, gid = _UCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
            requester = Requester(pid=pid, uid=uid, gid=gid, door="socket")
            try:
                target, words = parse_request(_read_request(conn))
            except ValueError as e:
                log.info(
                    "door=socket uid=%d pid=%d decision=refused result=EINVAL (%s)", uid, pid, e
                )
                _send(conn, {"stage": "done", "ok": False, "errno": errno.EINVAL, "error": str(e)})
                return
            _answer(service, conn, requester, target, words)
    except OSError:
        pass  # the requester went away: nothing to tell
    finally:
        slots.release()


def _answer(
    service: Service, conn: socket.socket, requester: Requester, target: int, words: str
) -> None:
    answer = service.submit(requester, target, words)
    if answer.job is None:
        _send(conn, {"stage": "done", "ok": False, "errno": answer.errno, "error": answer.message})
        return
    _send(conn, {"stage": "snapshot", "ok": True})
    conn.settimeout(None)
    _send(conn, answer.job.wait())


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        try:
            chunk = conn.recv(MAX_REQUEST + 1 - len(data))
        except TimeoutError:
            raise ValueError(f"no complete request within {READ_TIMEOUT:g} s") from None
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError(f"request longer than {MAX_REQUEST} bytes")
    return data.split(b"\n", 1)[0]


def parse_request(data: bytes) -> tuple[int, str]:
    """``(pid, SPEC words)`` of one request line.

    :raises ValueError: one sentence naming what is wrong.
    """
    try:
        value = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError("the request is not one JSON object") from None
    if not isinstance(value, dict):
        raise ValueError("the request is not one JSON object")
    unknown = sorted(set(value) - {"pid", "spec"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (fields: pid, spec)")
    pid = value.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < _PID_MAX_LIMIT:
        raise ValueError(f"pid must be a process id in 1..{_PID_MAX_LIMIT - 1}")
    spec = value.get("spec", "")
    if isinstance(spec, list) and all(isinstance(w, str) for w in spec):
        spec = " ".join(spec)
    if not isinstance(spec, str):
        raise ValueError("spec must be a string of SPEC words or a list of them")
    return pid, spec


def _send(conn: socket.socket, record: dict[str, Any]) -> None:
    conn.sendall(json.dumps(record).encode() + b"\n")
