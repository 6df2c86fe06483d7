"""A PostgreSQL backend under pgbench, live-dumped (issue 5's target for the clone method).

Every PostgreSQL process has a SysV shared memory segment attached in the host IPC namespace,
which `criu dump` refuses; the clone method copies it out and dumps the rest. The server is
Debian's postgresql, started by the test on 127.0.0.1 in a private directory and stopped after.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kernelcore import CoreView

from criu_livedump.cli import ExitStatus

pytestmark = [pytest.mark.live, pytest.mark.slow]

EXE = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "criu-livedump"
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(*argv: str) -> list[str]:
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *argv]


@dataclass
class Server:
    port: int
    postmaster: subprocess.Popen[bytes]

    def backends(self) -> list[int]:
        """Client backends (not the postmaster's auxiliary processes)."""
        out = []
        for child in (
            Path(f"/proc/{self.postmaster.pid}/task/{self.postmaster.pid}/children")
            .read_text()
            .split()
        ):
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                if b"127.0.0.1" in cmdline:
                    out.append(int(child))
        return out


@pytest.fixture
def server() -> Iterator[Server]:
    if PG_BIN is None or os.geteuid() != 0:
        pytest.skip("needs Debian's postgresql and root")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres user")
    base = Path(tempfile.mkdtemp(prefix="livedump-pg-", dir="/var/tmp"))
    shutil.chown(base, "postgres", "postgres")
    data, sockets = base / "data", base / "sock"
    sockets.mkdir()
    shutil.chown(sockets, "postgres", "postgres")
    postmaster: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
                         "--auth=trust", "--no-sync"),
            check=True, capture_output=True,
        )  # fmt: skip
        port = _free_port()
        postmaster = subprocess.Popen(
            _as_postgres(
                str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
            ),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=base,
        )  # fmt: skip
        for _ in range(300):
            ready = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                capture_output=True, check=False,
            )  # fmt: skip
            if ready.returncode == 0:
                break
            time.sleep(0.05)
        else:
            pytest.fail("postgres did not start")
        yield Server(port, postmaster)
    finally:
        if postmaster is not None:
            postmaster.send_signal(2)  # SIGINT: fast shutdown
            try:
                postmaster.wait(timeout=30)
            except subprocess.TimeoutExpired:
                postmaster.kill()
                postmaster.wait()
        shutil.rmtree(base, ignore_errors=True)


def _pgbench(server: Server, *args: str) -> list[str]:
    return [str(PG_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres",
            *args, "postgres"]  # fmt: skip


def test_backend_under_pgbench(server: Server, tmp_path: Path) -> None:
    subprocess.run(_pgbench(server, "-i", "-s", "2", "-q"), check=True, capture_output=True)
    bench = subprocess.Popen(
        _pgbench(server, "-c", "4", "-j", "2", "-T", "8"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        backends: list[int] = []
        for _ in range(200):
            backends = server.backends()
            if len(backends) >= 4:
                break
            time.sleep(0.02)
        assert backends, "no pgbench backend appeared"
        reports = []
        tmp_path.chmod(0o755)
        for i, pid in enumerate(backends[:2]):
            # --method criu refuses the SysV segment before freezing anything...
            refused = subprocess.run(
                [str(EXE), "dump", str(pid), "-o", str(tmp_path / f"r{i}"), "--method", "criu",
                 "--core-limit", "unlimited"],
                capture_output=True, check=False,
            )  # fmt: skip
            assert refused.returncode == ExitStatus.BLOCKED
            assert "SysV" in refused.stderr.decode()
            # ...and auto takes the clone path, which dumps it
            core = tmp_path / f"core{i}"
            proc = subprocess.run(
                [str(EXE), "dump", str(pid), "-o", str(core), "--core-limit", "unlimited",
                 "--json"],
                capture_output=True, check=False,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr.decode()
            reports.append(json.loads(proc.stdout))
            assert reports[-1]["method"] == "clone"
            with CoreView(core) as view:
                assert [t.pid for t in view.threads] == [pid]
                assert any(f.name.startswith("/SYSV") for f in view.files)
            assert core.stat().st_uid == pwd.getpwnam("postgres").pw_uid
            gdb = subprocess.run(
                ["gdb", "-batch", "-nx", "-ex", "bt", str(PG_BIN / "postgres"), str(core)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            assert re.search(r"^#0 ", gdb.stdout, re.M), gdb.stdout + gdb.stderr
        out, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    text = out.decode()
    assert bench.returncode == 0, err.decode()
    failed = re.search(r"number of failed transactions: (\d+)", text)
    assert failed is not None and failed.group(1) == "0", text
    assert "aborted" not in err.decode()
    for r in reports:
        print(f"backend {r['pid']}: frozen {r['frozen_time_us'] / 1000:.1f} ms, {r['size']} bytes")
