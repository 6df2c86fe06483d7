"""What a user does against `criu-livedump serve`, run as that user with the system's python3
(standard library only; the tests copy it beside serve/client.py into a directory every user
can read). Prints one JSON object on stdout: the outcome of each kind of request, by errno name.

    serve_user.py write PATH TEXT                 one open + write of the livedump file
    serve_user.py fuzz SEED N SOCKET LIVEDUMP     N seeded bad-input cases, half each door
    serve_user.py storm SEED N SOCKET MOUNT OWN OTHER   N mixed requests (see storm())
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import sys
from collections import Counter

import client  # criu_livedump/serve/client.py, copied beside this file


def write(path: str, text: bytes) -> str:
    """``OK`` or the errno name of the open or of the write, as a shell's ``>`` would see."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    except OSError as e:
        return f"open:{errno.errorcode[e.errno or 0]}"
    try:
        os.write(fd, text)
    except OSError as e:
        return errno.errorcode[e.errno or 0]
    finally:
        os.close(fd)
    return "OK"


def ask(sock_path: str, pid: int, spec: str) -> str:
    try:
        record = client.request(pid, spec, path=sock_path, timeout=120)
    except OSError as e:
        return f"socket:{errno.errorcode.get(e.errno or 0, 'EIO')}"
    return "OK" if record.get("ok") else errno.errorcode.get(int(record.get("errno") or 0), "?")


_KEYS = ["core_limit", "sched_prio", "io_prio", "oom_adj", "core", "", "x", "CORE_LIMIT"]
_VALUES = [
    "unlimited",
    "-1",
    "0",
    "4096",
    "1k",
    "19",
    "-20",
    "7",
    "8",
    "15",
    "-17",
    "-18",
    "99999999999999999999999",
    "1.5",
    "",
    "=",
    "0x10",
    "infinity",
    "\u00e9",
    " ",
    "\x00",
]


def spec_words(rng: random.Random) -> bytes:
    """A SPEC line: words from the grammar, mutated (separators, repeats, junk bytes)."""
    words = []
    for _ in range(rng.randrange(0, 5)):
        key, value = rng.choice(_KEYS), rng.choice(_VALUES)
        words.append(rng.choice([f"{key}={value}", key, f"{key}=={value}", f"={value}"]))
    text = rng.choice([" ", "\t", "\n", "  "]).join(words).encode()
    if rng.random() < 0.3:
        cut = rng.randrange(len(text) + 1)
        text = (
            text[:cut] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8))) + text[cut:]
        )
    return text + (b"\n" if rng.random() < 0.5 else b"")


def protocol_case(rng: random.Random, own: int) -> bytes:
    """One connection's bytes: junk, broken JSON, wrong types and fields, huge numbers."""
    shapes = [
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200))),
        lambda: json.dumps({"pid": own, "spec": spec_words(rng).decode(errors="replace")}).encode()[
            : rng.randrange(1, 60)
        ],
        lambda: json.dumps(
            {
                "pid": rng.choice([0, -1, 2**31, 2**64, "1", None, True, 1.5, [own]]),
                "spec": "core_limit=unlimited",
            }
        ).encode(),
        lambda: json.dumps(
            {"pid": own, "spec": rng.choice([1, None, {"a": 1}, [1, 2], ["x=1"]])}
        ).encode(),
        lambda: json.dumps(
            {"pid": own, "spec": "", rng.choice(["uid", "path", "output"]): 0}
        ).encode(),
        lambda: b"[" * rng.randrange(1, 5000),
        lambda: json.dumps(rng.choice([[], "x", 1, None])).encode(),
    ]
    return rng.choice(shapes)() + (b"\n" if rng.random() < 0.7 else b"")


def raw(sock_path: str, data: bytes) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(120)
        s.connect(sock_path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        reply = b""
        while b"\n" not in reply:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    if not reply:
        return "no-answer"
    record = json.loads(reply.split(b"\n")[0])
    return "OK" if record.get("ok") else errno.errorcode.get(int(record.get("errno") or 0), "?")


def fuzz(seed: int, n: int, sock_path: str, livedump: str) -> Counter[str]:
    rng = random.Random(seed)
    seen: Counter[str] = Counter()
    own = int(livedump.rstrip("/").split("/")[-2])
    for _ in range(n // 2):
        seen["socket:" + raw(sock_path, protocol_case(rng, own))] += 1
    fd = os.open(livedump, os.O_WRONLY)
    try:
        for _ in range(n - n // 2):
            try:
                os.write(fd, spec_words(rng))
                seen["fuse:OK"] += 1
            except OSError as e:
                seen["fuse:" + errno.errorcode[e.errno or 0]] += 1
    finally:
        os.close(fd)
    return seen


def storm(seed: int, n: int, sock_path: str, mount: str, own: int, other: int) -> Counter[str]:
    """Requests cycling through: own target by socket, by file; another user's by socket, by
    file; a bad word. Only the own-target ones may be accepted."""
    rng = random.Random(seed)
    seen: Counter[str] = Counter()
    for i in range(n):
        kind = i % 5
        if kind == 0:
            seen["own-socket:" + ask(sock_path, own, "core_limit=unlimited")] += 1
        elif kind == 1:
            seen["own-fuse:" + write(f"{mount}/{own}/livedump", b"core_limit=unlimited\n")] += 1
        elif kind == 2:
            seen["other-socket:" + ask(sock_path, other, "")] += 1
        elif kind == 3:
            seen["other-fuse:" + write(f"{mount}/{other}/livedump", b"\n")] += 1
        else:
            seen["bad-socket:" + ask(sock_path, own, f"core_limit={rng.random()}")] += 1
    return seen


def main() -> None:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "write":
        print(json.dumps({"result": write(args[0], args[1].encode())}))
    elif cmd == "fuzz":
        print(json.dumps(fuzz(int(args[0]), int(args[1]), args[2], args[3])))
    elif cmd == "storm":
        print(
            json.dumps(
                storm(int(args[0]), int(args[1]), args[2], args[3], int(args[4]), int(args[5]))
            )
        )


if __name__ == "__main__":
    main()
