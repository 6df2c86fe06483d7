#!/usr/bin/python3
"""``criu-livedump request PID [SPEC...]``: ask the ``serve`` socket for a live core.

Standard library only and importing nothing of the project, so that any user can run it with
the system's python3 (``install -m 0755 criu_livedump/serve/client.py
/usr/local/bin/livedump-request``): the tool's own virtualenv is root's. The socket speaks one
JSON request per connection, ``{"pid": N, "spec": "core_limit=unlimited"}``, and answers with
JSON lines: ``{"stage": "snapshot", "ok": true}`` once the target runs on, then ``{"stage":
"done", "ok": ..., "destination": ..., "error": ..., "errno": ...}``. Who asks is what the
kernel says (SO_PEERCRED), never a field of the request.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from typing import Any

#: where the service is found (``criu-livedump serve``'s defaults)
SOCKET_PATH = "/run/criu-livedump.sock"
MOUNT_PATH = "/run/livedump"
#: longer than any dump the service lets run (it bounds each with the dump's own timeout)
TIMEOUT = 3600.0


def request(
    pid: int,
    spec: str = "",
    *,
    path: str = SOCKET_PATH,
    wait: bool = True,
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """Send one request; return the service's last record (the final one when *wait*).

    :raises OSError: the socket cannot be reached, or it closed without an answer.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"pid": pid, "spec": spec}).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        reader = sock.makefile("rb")
        last: dict[str, Any] = {}
        for line in reader:
            record = json.loads(line)
            if not isinstance(record, dict):
                break
            last = record
            if record.get("stage") == "done" or not wait:
                break
        reader.close()
    if not last:
        raise OSError(errno.ECONNRESET, f"{path}: closed without an answer")
    return last


def describe(record: dict[str, Any]) -> str:
    """One line for a person: where the core went, or why not."""
    if record.get("ok"):
        if record.get("stage") == "snapshot":
            return "snapshot taken; the core is being written"
        if record.get("no_core_reason"):
            return f"no core written: {record['no_core_reason']}"
        return f"core written to {record.get('destination')} ({record.get('size', 0)} bytes)"
    number = int(record.get("errno") or errno.EIO)
    return f"error: {os.strerror(number)}: {record.get('error')}"


def main(argv: list[str] | None = None) -> int:
    """``request PID [SPEC...] [--socket PATH] [--no-wait]``; exit 0, 1 (refused or failed),
    2 (usage), 3 (the service cannot be reached)."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = os.environ.get("CRIU_LIVEDUMP_SOCKET", SOCKET_PATH)
    wait = "--no-wait" not in args
    args = [a for a in args if a != "--no-wait"]
    if "--socket" in args:
        i = args.index("--socket")
        if i + 1 >= len(args):
            print("error: --socket needs a path", file=sys.stderr)
            return 2
        path = args[i + 1]
        del args[i : i + 2]
    if not args or not args[0].isdigit() or int(args[0]) < 1:
        print("usage: request PID [SPEC...] [--socket PATH] [--no-wait]", file=sys.stderr)
        return 2
    try:
        record = request(int(args[0]), " ".join(args[1:]), path=path, wait=wait)
    except (OSError, ValueError) as e:
        print(f"error: {path}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 3
    print(describe(record), file=sys.stderr)
    return 0 if record.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
