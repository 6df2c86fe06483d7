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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import procs
import pytest
from harness.corefile import CoreView

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
        procs.run(
            _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
                         "--auth=trust", "--no-sync"),
            check=True,
        )  # fmt: skip
        port = _free_port()
        postmaster = procs.popen(
            _as_postgres(
                str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
            ),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=base,
        )  # fmt: skip
        procs.wait_for(
            lambda: procs.run(
                [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], timeout=30
            ).returncode == 0,
            60, "postgres accepting connections", step=0.05,
        )  # fmt: skip
        yield Server(port, postmaster)
    finally:
        if postmaster is not None:
            postmaster.send_signal(2)  # SIGINT: fast shutdown
            with contextlib.suppress(subprocess.TimeoutExpired):
                postmaster.wait(timeout=30)
            procs.kill_group(postmaster)
        shutil.rmtree(base, ignore_errors=True)


def _pgbench(server: Server, *args: str) -> list[str]:
    return [str(PG_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres",
            *args, "postgres"]  # fmt: skip


#: pgbench runs this long at most; the test stops it once the dumps are done. Its backends must
#: outlive every dump, and a fixed -T short enough to wait for ended them first on a busy machine.
BENCH_SECONDS = 600
#: pgbench's progress line (-P 1), e.g. "progress: 5.0 s, 1181.9 tps, lat 3.378 ms stddev 1.710,
#: 0 failed"
PROGRESS = re.compile(rb"^progress: ([0-9.]+) s, .* (\d+) failed$", re.M)


def _progress(log: Path) -> list[tuple[float, int]]:
    return [(float(t), int(f)) for t, f in PROGRESS.findall(log.read_bytes())]


def _start_bench(server: Server, log: Path) -> subprocess.Popen[bytes]:
    """pgbench initialised, then running 4 clients with progress reports into *log*."""
    procs.run(_pgbench(server, "-i", "-s", "2", "-q"), check=True)
    with log.open("wb") as f:
        return procs.popen(
            _pgbench(server, "-c", "4", "-j", "2", "-T", str(BENCH_SECONDS), "-P", "1"),
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip


def test_backend_under_pgbench(server: Server, tmp_path: Path) -> None:
    log = tmp_path / "pgbench.log"
    bench = _start_bench(server, log)
    try:
        backends = procs.wait_for(
            lambda: b if len(b := server.backends()) >= 4 else [], 60, "4 pgbench backends"
        )
        reports = []
        tmp_path.chmod(0o755)
        for i, pid in enumerate(backends[:2]):
            assert bench.poll() is None, f"pgbench ended early: {log.read_text()}"
            # --method criu refuses the SysV segment before freezing anything...
            refused = procs.run(
                [str(EXE), "dump", str(pid), "-o", str(tmp_path / f"r{i}"), "--method", "criu",
                 "--core-limit", "unlimited"],
            )  # fmt: skip
            assert refused.returncode == ExitStatus.BLOCKED, refused.stderr.decode()
            assert "SysV" in refused.stderr.decode()
            # ...and auto takes the clone path, which dumps it
            core = tmp_path / f"core{i}"
            proc = procs.run(
                [str(EXE), "dump", str(pid), "-o", str(core), "--core-limit", "unlimited",
                 "--json"],
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr.decode()
            reports.append(json.loads(proc.stdout))
            assert reports[-1]["method"] == "clone"
            with CoreView(core) as view:
                assert [t.pid for t in view.threads] == [pid]
                assert any(f.name.startswith("/SYSV") for f in view.files)
            assert core.stat().st_uid == pwd.getpwnam("postgres").pw_uid
            gdb = procs.run(
                ["gdb", "-batch", "-nx", "-ex", "bt", str(PG_BIN / "postgres"), str(core)],
                text=True,
            )  # fmt: skip
            assert re.search(r"^#0 ", gdb.stdout, re.M), gdb.stdout + gdb.stderr
        # the load goes on after the dumps: two more progress reports, and the backends live
        seen = len(_progress(log))
        procs.wait_for(lambda: len(_progress(log)) >= seen + 2, 60, "pgbench progress")
        assert bench.poll() is None, f"pgbench ended early: {log.read_text()}"
        assert set(backends[:2]) <= set(server.backends())
    finally:
        procs.kill_group(bench)
    text = log.read_text(errors="replace")
    assert all(failed == 0 for _, failed in _progress(log)), text
    assert "aborted" not in text and "ERROR" not in text, text
    for r in reports:
        print(f"backend {r['pid']}: frozen {r['frozen_time_us'] / 1000:.1f} ms, {r['size']} bytes")


def test_cluster_tree_under_pgbench(server: Server, tmp_path: Path) -> None:
    """``dump POSTMASTER --tree`` under pgbench (issue 17): CRIU refuses the tree (SysV), so
    ``auto`` takes the clones: one core per process of the cluster, pgbench fails nothing. The
    tree's freeze is reported (printed, never asserted on time)."""
    log = tmp_path / "pgbench.log"
    bench = _start_bench(server, log)
    try:
        procs.wait_for(
            lambda: b if len(b := server.backends()) >= 4 else [], 60, "4 pgbench backends"
        )
        tmp_path.chmod(0o755)
        core = tmp_path / "core"
        proc = procs.run(
            [str(EXE), "dump", str(server.postmaster.pid), "--tree", "-o", str(core),
             "--core-limit", "unlimited", "--json"],
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()
        report = json.loads(proc.stdout)
        assert report["method"] == "clone"
        children = report["children"]
        assert len(children) >= 4 + 3  # the backends, checkpointer, walwriter, ...
        written = [c for c in children if c["core_path"]]
        assert [c["no_core_reason"] for c in children if not c["core_path"]] == []
        for c in [report, *written]:
            with CoreView(Path(c["core_path"])) as view:
                assert view.threads[0].pid == c["pid"]
        seen = len(_progress(log))
        procs.wait_for(lambda: len(_progress(log)) >= seen + 2, 60, "pgbench progress")
        assert bench.poll() is None, f"pgbench ended early: {log.read_text()}"
    finally:
        procs.kill_group(bench)
    text = log.read_text(errors="replace")
    assert all(failed == 0 for _, failed in _progress(log)), text
    assert "aborted" not in text and "ERROR" not in text, text
    steps = report["freeze_steps_us"]
    print(f"tree of {1 + len(children)} processes: frozen {report['frozen_time_us'] / 1000:.1f} ms"
          f" ({', '.join(f'{k} {v / 1000:.1f}' for k, v in steps.items())} ms)")  # fmt: skip
