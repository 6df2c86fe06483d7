"""Run inside a fresh PID namespace by tests/test_foreign_session.py; prints one JSON object.

``unshare --pid --fork --mount-proc`` leaves us in a session whose leader is outside the new
namespace (getsid() is 0 here): CI's situation, where the whole test run is entered into a
container. Here the targets inherit that session, and we record what the tool, and CRIU
itself, make of them. Every process we start dies with the namespace.

usage: foreign_session_probe.py THREADS_BINARY CRIU_LIVEDUMP CRIU WORKDIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run(argv: list[str]) -> dict[str, object]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def state(pid: int) -> dict[str, object]:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        "state": status["State"].split()[0],
        "tracer": int(status["TracerPid"]),
        "nssid": status["NSsid"].split(),
        "parasite": "CRIUMFD" in Path(f"/proc/{pid}/maps").read_text(),
    }


def settle(pid: int, timeout: float = 10.0) -> None:
    """Wait, bounded, until every thread of ``pid`` sleeps: "ready" is printed before the
    threads reach their blocking calls, and a state read while one still runs is R, not S."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tasks = Path(f"/proc/{pid}/task")
        states = {(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()}
        if states == {"S"}:
            return
        time.sleep(0.01)
    raise SystemExit(f"threads of {pid} did not all sleep within {timeout} s")


def main() -> None:
    threads, tool, criu, work = sys.argv[1:5]
    out: dict[str, object] = {"getsid": os.getsid(0)}
    target = subprocess.Popen(
        [threads, "3"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    )
    try:
        assert target.stdout is not None
        out["ready"] = target.stdout.readline().strip()
        pid = target.pid
        out["pid"] = pid
        settle(pid)
        out["threads"] = len(os.listdir(f"/proc/{pid}/task"))
        out["before"] = state(pid)
        base = [tool, "dump", str(pid), "--core-limit", "unlimited"]
        out["criu"] = run([*base, "--method", "criu", "-o", f"{work}/criu.core"])
        out["after_criu"] = state(pid)
        out["tree"] = run([*base, "--tree", "-o", f"{work}/tree.core"])
        out["auto"] = run([*base, "--json", "-o", f"{work}/auto.core"])
        out["after_auto"] = state(pid)
        images = Path(work, "images")
        images.mkdir()
        argv = [criu, "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log"]
        out["raw_criu"] = run([*argv, "--leave-running", "--shell-job"])
        out["raw_criu_log"] = (images / "dump.log").read_text(errors="replace")
        out["alive"] = target.poll() is None
    finally:
        target.kill()
        target.wait()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
