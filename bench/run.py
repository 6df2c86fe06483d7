"""``make bench``: how long the target is frozen, how fast its core is written, at what cost.

For each size (1, 4 and 8 GiB; ``--quick``: 64 and 256 MiB) a workload (``bench/workload.c``:
non-zero anonymous memory, 4 busy threads, a 1 ms heartbeat recording its longest gap) is
dumped by each *freeze peer* in the same invocation, so that the figures are ratios between
neighbours on a shared machine rather than absolute truths:

- ``gcore``: ``gdb -p PID -batch -ex 'gcore FILE'``, the usual way to core a running process;
- ``criu``: ``criu-livedump dump PID --method criu`` (the product; while its ``dump`` is not
  usable yet, CRIU driven directly plus ``criu-livedump convert``, and the results say so);
- ``clone``: ``criu-livedump dump PID --method clone``, when it exists.

Then the same peers on workloads shaped like servers (``--shapes``; issue 12): 10, 100 and 1000
threads, and 30,000 mappings, each of 64 MiB, with fork() of the same process as the floor.

The freeze is what the target saw (its heartbeat's longest gap in a window around the dump) and,
for CRIU, its own ``frozen_time`` from ``stats-dump``; for clone the tool's own figure, split into
its steps (stop, save, fork, resume). Then the conversion alone: ``criu-livedump
convert`` on the dump's images against ``cp --sparse=always`` of the pages images, its peak RSS,
the core's apparent and allocated size; and CRIU's own ``coredump`` tool on a 16 MiB process.

Each dump is also timed until its core is complete (the core's final name appears, an inotify
event: the tool writes a temporary file and renames it; gcore's core is complete when gdb
exits) and its peak
extra space is sampled every :data:`SPACE_STEP` seconds by a thread: the blocks allocated to
everything the dump writes (the core, its temporary file, CRIU's images and the tool's scratch,
each peer in directories of its own).

Results go to ``bench/results/<date>-<host>.json`` (and a PNG of freeze time against size), and
``BENCHMARKS.md`` is regenerated from them. Scratch (images, cores) lives on a disk filesystem,
/var/tmp, by default, as on a real host (``--scratch /dev/shm`` for tmpfs), and is removed at the
end; the workload is killed whatever happens. Progress goes to stderr only
when it is a terminal; stdout gets the path of the results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from criu_livedump.snapshot.criu import LIVE_OPTIONS

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
MARKDOWN = REPO / "BENCHMARKS.md"
CRIU_SRC = Path("/var/cache/criu-livedump/criu-4.2.1")
CRIU_BIN = "/usr/local/sbin/criu"
SCHEMA = 1
MIB = 1 << 20
#: Sizes of a full run and of ``--quick``. 8 GiB fits this 24 GiB machine: the workload's 8 GiB
#: in memory, its images and cores on disk.
FULL_SIZES = (1024, 4096, 8192)
QUICK_SIZES = (64, 256)
#: the all-MADV_DONTFORK workload (V8's heap is MADV_DONTFORK; a clone must copy it frozen)
DONTFORK_MIB = 256
#: the workload dirtying memory while it is dumped (issue 14: precopy's rounds against it)
DIRTY_MIB = 1024
DIRTY_MBPS = 200
#: issue 14: precopy's freeze of a target writing under 10 MB/s at 4 and 8 GiB, and its rounds'
#: bound (criu_livedump/snapshot/precopy/method.py: MAX_ROUNDS)
PRECOPY_FREEZE_TARGET_MS = 15.0
PRECOPY_TARGET_MIBS = (4096, 8192)
PRECOPY_MAX_ROUNDS = 8
#: the size of the workloads shaped like servers (--shapes)
SHAPE_MIB = 64
#: threads of the workload without idle ones: main, heartbeat, 4 busy
BASE_THREADS = 6
#: CRIU's coredump tool is quadratic in the number of pages: one small process only.
COREDUMP_TOOL_MIB = 16
COREDUMP_TOOL_TIMEOUT = 300.0
#: gcore runs once when its first run takes longer than this (1 run for slow reference peers).
SLOW_PEER_SECONDS = 60.0
DUMP_TIMEOUT = 600.0
#: Targets from the issues, checked against each run.
CLONE_FREEZE_TARGET_MS = 50.0
CLONE_FREEZE_TARGET_MIB = 4096
CONVERT_SPEEDUP_TARGET = 100.0
CONVERT_SPEEDUP_MIB = 1024
CONVERT_RSS_TARGET_MIB = 100.0
#: the workload's heartbeat reports gaps longer than this (its LATE_NS) as late beats
LATE_BEAT_MS = 1.5
#: issue 12: the clone's freeze of 1000 threads, and against gcore's, and of 30,000 mappings
#: against fork() alone
THREADS_TARGET = 1000
THREADS_FREEZE_TARGET_MS = 30.0
THREADS_GCORE_RATIO_TARGET = 15.0
MAPS_TARGET = 30_000
MAPS_OVER_FORK_TARGET_MS = 10.0
BUDGET_FULL_S = 15 * 60
#: where scratch (images and cores) goes by default: a disk filesystem, as on a real host
DEFAULT_SCRATCH = Path("/var/tmp")
#: how often the peak extra space is sampled, in seconds
SPACE_STEP = 0.05
#: the standalone conversion (and cp) runs at sizes up to this one (larger ones take minutes)
CONVERT_MAX_MIB = 1024
#: issue 13: the clone's peak extra space may exceed its core's allocated size by this much
EXTRA_SPACE_SLACK_MIB = 64
#: issue 13's sizes for the clone against gcore (until the core is complete, extra space)
STREAM_TARGET_MIBS = (1024, 4096, 8192)
BUDGET_QUICK_S = 3 * 60


class BenchError(Exception):
    """A step of the benchmark failed; the message names the step and the cause."""


# --- small helpers ------------------------------------------------------------------------------


class Progress:
    """Progress lines on stderr, only when stderr is a terminal."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"bench: {message}", file=self.stream, flush=True)


def stat(values: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of *values* (and the raw values, for the record)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0, "median": None, "min": None, "max": None, "values": []}
    return {
        "n": len(vals),
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "values": [round(v, 6) for v in vals],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is unknown or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def median(s: dict[str, Any] | None) -> float | None:
    return None if not s else s.get("median")


def gap_at_freeze(peer: dict[str, Any]) -> float | None:
    """A peer's median heartbeat gap overlapping its freeze where measured, else the longest of
    its whole window's."""
    return median(peer.get("freeze_gap_ms")) or median(peer.get("gap_ms"))


def file_sizes(path: Path) -> tuple[int, int]:
    """(apparent, allocated) bytes of *path*."""
    st = path.stat()
    return st.st_size, st.st_blocks * 512


def pages_bytes(images_dir: Path) -> int:
    """Bytes of memory CRIU dumped: the sum of the pages images."""
    return sum(p.stat().st_size for p in images_dir.glob("pages-*.img"))


def mem_available() -> int:
    """MemAvailable of /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def find_key(obj: Any, *names: str) -> Any:
    """The first value under any key named in *names*, searched depth-first through dicts and
    lists (the CLI's JSON report is read by key name, not by a fixed path)."""
    if isinstance(obj, dict):
        for name in names:
            if name in obj and obj[name] is not None:
                return obj[name]
        for value in obj.values():
            found = find_key(value, *names)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for value in obj:
            found = find_key(value, *names)
            if found is not None:
                return found
    return None


@dataclass
class Child:
    """A finished child process: output, wall time, and its own peak RSS."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    maxrss_kib: int

    def check(self, what: str) -> Child:
        if self.returncode != 0:
            tail = (self.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise BenchError(f"{what}: exit status {self.returncode}: {tail}")
        return self


def run_child(
    argv: Sequence[str], *, timeout: float = DUMP_TIMEOUT, env: dict[str, str] | None = None
) -> Child:
    """Run *argv* to completion, timing it and reading its peak RSS with wait4(): the rusage of
    this one child, not of every child so far as RUSAGE_CHILDREN would give."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        deadline = start + timeout
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    proc.kill()
                    _, status, usage = os.wait4(proc.pid, 0)
                    proc.returncode = -9
                    raise BenchError(f"{argv[0]}: timed out after {timeout:.0f} s")
                time.sleep(0.005)
        except BaseException:
            with suppress(ProcessLookupError, ChildProcessError):
                proc.kill()
                os.waitpid(proc.pid, 0)
            raise
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Child(proc.returncode, out.read(), err.read(), seconds, usage.ru_maxrss)


def tool(name: str) -> str:
    """The console script *name* of the running venv (else from PATH)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name}: not found next to {sys.executable} nor on PATH")
    return found


class SpaceWatch:
    """While a dump runs: the peak of the blocks allocated below *dirs* (its core, temporary
    files, images and scratch), sampled every :data:`SPACE_STEP` seconds by a thread, and when
    *complete* (the core's final name) appeared, to the microsecond (:class:`NameWatch`)."""

    def __init__(self, dirs: Sequence[Path], complete: Path | None = None) -> None:
        self.dirs = tuple(dirs)
        self.complete = complete
        self.peak = 0
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="space", daemon=True)
        self._name = NameWatch(complete) if complete is not None else None

    @property
    def complete_s(self) -> float | None:
        """Seconds from the start until *complete* appeared (None: not seen)."""
        seen = self._name.seen if self._name is not None else None
        return None if seen is None else seen - self.started

    def __enter__(self) -> SpaceWatch:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._name is not None:
            self._name.close()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(SPACE_STEP):
                break

    def sample(self) -> None:
        self.peak = max(self.peak, sum(allocated_below(d) for d in self.dirs))


class NameWatch:
    """When *path* gets its name in its directory (inotify IN_MOVED_TO or IN_CREATE): a
    thread blocked on the event stamps it with ``time.perf_counter()``, where sampling its
    existence would add up to a sampling step to a core finished between two samples."""

    IN_CREATE = 0x100
    IN_MOVED_TO = 0x80
    EVENT = struct.Struct("iIII")

    def __init__(self, path: Path) -> None:
        import ctypes

        self.path = path
        self.seen: float | None = None
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_CLOEXEC)
        if self._fd < 0:
            raise BenchError(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        mask = self.IN_CREATE | self.IN_MOVED_TO
        if libc.inotify_add_watch(self._fd, os.fsencode(path.parent), mask) < 0:
            os.close(self._fd)
            raise BenchError(f"inotify_add_watch {path.parent}: {os.strerror(ctypes.get_errno())}")
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="name-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        want = os.fsencode(self.path.name)
        while self.seen is None:
            ready, _, _ = select.select([self._fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            data = os.read(self._fd, 65536)
            now = time.perf_counter()
            at = 0
            while at < len(data):
                _wd, _mask, _cookie, size = self.EVENT.unpack_from(data, at)
                at += self.EVENT.size
                if data[at : at + size].rstrip(b"\0") == want:
                    self.seen = now
                at += size

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        for fd in (self._fd, self._stop_r, self._stop_w):
            os.close(fd)


def allocated_below(path: Path) -> int:
    """Bytes allocated to the files below *path* (st_blocks; files that vanish are skipped)."""
    total = 0
    for top, _dirs, files in os.walk(path):
        for name in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(top, name)).st_blocks * 512
    return total


# --- the workload -------------------------------------------------------------------------------


def build_workload(out_dir: Path) -> Path:
    """Compile bench/workload.c into *out_dir*."""
    exe = out_dir / "workload"
    proc = subprocess.run(
        [
            "gcc",
            "-O2",
            "-pthread",
            "-Wall",
            "-Wextra",
            "-o",
            str(exe),
            str(BENCH_DIR / "workload.c"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"workload.c: gcc failed: {proc.stderr.strip()}")
    return exe


@dataclass(frozen=True)
class Shape:
    """What a workload holds beside its memory: its threads (:data:`BASE_THREADS` at least; the
    others idle in futex, read, epoll_wait and nanosleep), more one-page mappings, its memory
    MADV_DONTFORK."""

    threads: int = BASE_THREADS
    maps: int = 0
    dontfork: bool = False
    #: MB/s of pages a thread of the workload keeps writing (0: none but the busy threads'
    #: stacks)
    dirty: int = 0

    def argv(self) -> list[str]:
        out = ["dontfork"] if self.dontfork else []
        if self.threads > BASE_THREADS:
            out.append(f"threads={self.threads - BASE_THREADS}")
        if self.maps:
            out.append(f"maps={self.maps}")
        if self.dirty:
            out.append(f"dirty={self.dirty}")
        return out

    def label(self) -> str:
        parts = [f"{self.threads} threads"] if self.threads > BASE_THREADS else []
        parts += [f"{self.maps:,} mappings"] if self.maps else []
        parts += ["MADV_DONTFORK"] if self.dontfork else []
        parts += [f"dirtying {self.dirty} MB/s"] if self.dirty else []
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "maps": self.maps,
            "dontfork": self.dontfork,
            "dirty": self.dirty,
        }

    @classmethod
    def parse(cls, word: str) -> Shape:
        """``threads=N`` or ``maps=N``.

        :raises ValueError: anything else.
        """
        key, _, value = word.partition("=")
        n = int(value)
        if key == "threads" and n >= BASE_THREADS:
            return cls(threads=n)
        if key == "maps" and n > 0:
            return cls(maps=n)
        raise ValueError(word)


#: the server-shaped workloads of issue 12
SHAPES = (Shape(threads=10), Shape(threads=100), Shape(threads=1000), Shape(maps=30_000))


class Workload:
    """A running ``workload MIB``, spoken to over its stdin/stdout line protocol."""

    def __init__(self, exe: Path, mib: int, *, shape: Shape = Shape()) -> None:
        self.mib = mib
        self.proc = subprocess.Popen(
            [str(exe), str(mib), *shape.argv()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            # its own session: CRIU refuses a process whose session leader is outside its PID
            # namespace (a bench run entered into a container); PR_SET_PDEATHSIG still ties
            # the workload to us
            start_new_session=True,
        )
        # The largest RLIMIT_CORE allowed: the product honours the target's own limit as the
        # kernel does, and an inherited `ulimit -c 0` would mean no core at all.
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
        resource.prlimit(self.proc.pid, resource.RLIMIT_CORE, (hard, hard))
        line = self._readline()
        if not line.startswith("ready "):
            self.stop()
            raise BenchError(f"workload {mib} MiB: did not start ({line!r})")
        self.pid = int(line.split()[1])

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"workload {self.mib} MiB: exited (status {self.proc.poll()})")
        return line.strip()

    def _ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._readline()

    def reset(self) -> None:
        """Start a new window for the longest heartbeat gap."""
        if self._ask("reset") != "ok":
            raise BenchError(f"workload {self.mib} MiB: bad answer to reset")

    def gap_ms(self) -> float:
        """The longest heartbeat gap since :meth:`reset`, in ms; fails if the workload is not
        running any more (a dump must never harm it) or its heartbeat stopped."""
        # Let the heartbeat wake up once after a thaw before asking.
        time.sleep(0.02)
        if self.proc.poll() is not None:
            raise BenchError(f"workload {self.mib} MiB: died (status {self.proc.returncode})")
        words = self._ask("gap").split()
        if len(words) != 3 or words[0] != "gap":
            raise BenchError(f"workload {self.mib} MiB: bad answer to gap: {words}")
        if int(words[2]) == 0:
            raise BenchError(f"workload {self.mib} MiB: heartbeat did not beat in the window")
        return int(words[1]) / 1000.0

    def gap_at_ms(self, start_ns: int, end_ns: int) -> float:
        """The longest gap since :meth:`reset` that overlaps [start_ns, end_ns] (CLOCK_MONOTONIC,
        a tool's own freeze), in ms; 0 when no beat was late then."""
        words = self._ask(f"gapat {start_ns} {end_ns}").split()
        if len(words) != 2 or words[0] != "gapat":
            raise BenchError(f"workload {self.mib} MiB: bad answer to gapat: {words}")
        return int(words[1]) / 1000.0

    def fork_ms(self) -> float:
        """How long fork() of the workload takes (it forks itself), in ms."""
        words = self._ask("fork").split()
        if len(words) != 2 or words[0] != "fork":
            raise BenchError(f"workload {self.mib} MiB: bad answer to fork: {words}")
        return int(words[1]) / 1000.0

    def state(self) -> str:
        """The target's state letter from /proc (R, S, T, ...)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1]
        return "?"

    def stop(self) -> None:
        with suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with suppress(OSError):
                    f.close()


@contextmanager
def workload(exe: Path, mib: int, *, shape: Shape = Shape()) -> Iterator[Workload]:
    w = Workload(exe, mib, shape=shape)
    try:
        yield w
    finally:
        w.stop()


def baseline_gap_ms(w: Workload, seconds: float = 1.0) -> float:
    """The longest heartbeat gap with nothing dumping: the noise floor of the machine."""
    w.reset()
    time.sleep(seconds)
    return w.gap_ms()


# --- freeze peers -------------------------------------------------------------------------------


@dataclass
class DumpRun:
    """One dump of the workload by one peer."""

    wall_s: float  #: end to end, as the user waits for it
    gap_ms: float  #: the target's longest heartbeat gap in the window around the dump
    frozen_ms: float | None = None  #: CRIU's frozen_time, or the tool's own freeze figure
    core_apparent: int = 0
    core_allocated: int = 0
    dump_s: float | None = None  #: the snapshot alone (CRIU), when known
    convert_s: float | None = None  #: the conversion alone, when known
    images: Path | None = None  #: the images kept for the conversion benchmark
    #: the tool's freeze in its steps (clone: stop, save, fork, resume), in ms
    steps_ms: dict[str, float] = field(default_factory=dict)
    #: the heartbeat gap that overlaps the tool's own freeze (when it says when that was)
    freeze_gap_ms: float | None = None
    #: from the command's start until the core was complete (its final name appeared)
    complete_s: float | None = None
    #: the peak of the blocks the dump allocated (core, temporary files, images, scratch)
    peak_extra: int | None = None
    #: precopy: rounds run while the target ran, and MiB they copied (its -v summary line)
    rounds: int | None = None
    precopied_mib: float | None = None
    #: how the tool's pages reached the core (its report's ``capture``: stream or images)
    capture: str | None = None


class Peer:
    """A way to take a core of a running process."""

    name = ""
    #: a reference peer that may run once when slow (the product's peers always run in full)
    slow = False
    #: compared at every size until the core is complete (issue 13: clone against gcore), so
    #: run :attr:`Config.small_runs` times at every size, not only the small ones
    compared = False

    def dump(self, w: Workload, scratch: Path, keep_images: bool) -> DumpRun:
        raise NotImplementedError


class GcorePeer(Peer):
    name = "gcore"
    slow = True
    compared = True

    def dump(self, w: Workload, scratch: Path, keep_images: bool) -> DumpRun:
        out = scratch / "gcore-out"
        out.mkdir()
        core = out / "gcore.core"
        w.reset()
        try:
            # gdb writes the core in place: it is complete when gdb exits
            with SpaceWatch([out]) as space:
                argv = ["gdb", "-p", str(w.pid), "-batch", "-nx", "-ex", f"gcore {core}"]
                child = run_child(argv).check("gcore")
                space.sample()
            gap = w.gap_ms()
            if not core.exists():
                raise BenchError(f"gcore: wrote no core ({child.stderr.strip()[-200:]})")
            apparent, allocated = file_sizes(core)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return DumpRun(
            child.seconds,
            gap,
            core_apparent=apparent,
            core_allocated=allocated,
            complete_s=child.seconds,
            peak_extra=space.peak,
        )


def criu_direct(pid: int, images: Path) -> Child:
    """``criu dump --leave-running`` with the flags issue 4 settled on, into *images*."""
    images.mkdir(mode=0o700)
    argv = [CRIU_BIN, "dump", "-t", str(pid), "-D", str(images), *LIVE_OPTIONS]
    return run_child([*argv, "-o", "dump.log", "-v2"]).check("criu dump")


def frozen_ms_from(images: Path) -> float | None:
    """CRIU's frozen_time (us in stats-dump) of the dump in *images*, in ms."""
    from converters.images import read_stats

    stats_path = images / "stats-dump"
    if not stats_path.exists():
        return None
    frozen = read_stats(stats_path).get("frozen_time")
    return None if frozen is None else frozen / 1000.0


def convert_cli(images: Path, out_dir: Path) -> tuple[Child, Path]:
    """``criu-livedump convert IMAGES -o OUT`` in a child; returns it and the one core."""
    out_dir.mkdir(exist_ok=True)
    child = run_child([tool("criu-livedump"), "convert", str(images), "-o", str(out_dir)])
    child.check("criu-livedump convert")
    cores = sorted(out_dir.glob("core.*"))
    if len(cores) != 1:
        raise BenchError(f"criu-livedump convert: expected one core in {out_dir}, got {cores}")
    return child, cores[0]


class CriuDirectPeer(Peer):
    """CRIU run directly, then ``criu-livedump convert``: the product's two halves, used until
    ``criu-livedump dump`` works."""

    name = "criu"

    def dump(self, w: Workload, scratch: Path, keep_images: bool) -> DumpRun:
        images = scratch / "criu-images"
        out = scratch / "criu-out"
        w.reset()
        try:
            with SpaceWatch([images, out]) as space:
                dumped = criu_direct(w.pid, images)
                converted, core = convert_cli(images, out)
                space.sample()
            gap = w.gap_ms()
            apparent, allocated = file_sizes(core)
            return DumpRun(
                dumped.seconds + converted.seconds,
                gap,
                frozen_ms=frozen_ms_from(images),
                core_apparent=apparent,
                core_allocated=allocated,
                dump_s=dumped.seconds,
                convert_s=converted.seconds,
                images=images if keep_images else None,
                complete_s=dumped.seconds + converted.seconds,
                peak_extra=space.peak,
            )
        finally:
            shutil.rmtree(out, ignore_errors=True)
            if not keep_images:
                shutil.rmtree(images, ignore_errors=True)


class CliPeer(Peer):
    """``criu-livedump dump PID --method METHOD -o CORE --json``: the product, end to end."""

    def __init__(self, method: str) -> None:
        self.name = method
        self.method = method
        self.compared = method == "clone"

    def argv(self, pid: int, scratch: Path, core: Path, keep_images: bool) -> list[str]:
        # precopy says how many rounds it ran, and what they copied, in its -v summary line
        verbose = ["-v"] if self.method == "precopy" else []
        argv = [tool("criu-livedump"), *verbose, "dump", str(pid), "--method", self.method]
        argv += ["-o", str(core), "--scratch", str(scratch), "--json"]
        return [*argv, "--keep-images"] if keep_images else argv

    def dump(self, w: Workload, scratch: Path, keep_images: bool) -> DumpRun:
        work = scratch / f"{self.name}-scratch"
        work.mkdir()
        out = scratch / f"{self.name}-out"
        out.mkdir()
        core = out / f"{self.name}.core"
        w.reset()
        try:
            # the core's directory holds its temporary file until the rename
            with SpaceWatch([work, out], complete=core) as space:
                child = run_child(self.argv(w.pid, work, core, keep_images))
                space.sample()
            child.check(f"criu-livedump dump --method {self.method}")
            gap = w.gap_ms()
            report = json.loads(child.stdout)
            freeze_gap = _freeze_gap_ms(w, report)
            if not core.exists():
                why = find_key(report, "no_core_reason") or "no reason given"
                raise BenchError(f"criu-livedump dump --method {self.method}: no core: {why}")
            apparent, allocated = file_sizes(core)
            rounds = PRECOPY_SUMMARY.search(child.stderr)
            images = None
            if keep_images:
                kept = find_key(report, "images_dir")
                images = Path(kept) if isinstance(kept, str) else None
            return DumpRun(
                child.seconds,
                gap,
                frozen_ms=_report_ms(report),
                core_apparent=apparent,
                core_allocated=allocated,
                dump_s=_report_s(report, "dump_seconds"),
                convert_s=_report_s(report, "convert_seconds"),
                images=images,
                steps_ms=_report_steps(report),
                freeze_gap_ms=freeze_gap,
                # the name's event, else the command's exit: complete by then
                complete_s=None
                if space.complete_s is None
                else min(space.complete_s, child.seconds),
                peak_extra=space.peak,
                rounds=int(rounds[1]) if rounds else None,
                precopied_mib=float(rounds[2]) if rounds else None,
                capture=_report_str(report, "capture"),
            )
        finally:
            shutil.rmtree(out, ignore_errors=True)
            if not keep_images:
                shutil.rmtree(work, ignore_errors=True)


#: precopy's -v summary (criu_livedump/snapshot/precopy/method.py: complete())
PRECOPY_SUMMARY = re.compile(r"precopy: (\d+) rounds, ([\d.]+) MiB copied")


def _report_str(report: Any, name: str) -> str | None:
    value = find_key(report, name)
    return value if isinstance(value, str) and value else None


def _report_ms(report: Any) -> float | None:
    """The freeze the CLI's report gives (``frozen_time_us``: CRIU's frozen_time), in ms."""
    value = find_key(report, "frozen_time_us")
    return float(value) / 1000.0 if isinstance(value, int | float) and value > 0 else None


def _freeze_gap_ms(w: Workload, report: Any) -> float | None:
    """The heartbeat gap overlapping the freeze the report places in time
    (``freeze_start_monotonic_ns`` + ``frozen_time_us``), None when it does not."""
    start = find_key(report, "freeze_start_monotonic_ns")
    frozen = find_key(report, "frozen_time_us")
    if not isinstance(start, int) or not start or not isinstance(frozen, int):
        return None
    return w.gap_at_ms(start, start + frozen * 1000)


def _report_steps(report: Any) -> dict[str, float]:
    """The freeze's steps the CLI's report gives (``freeze_steps_us``), in ms."""
    steps = find_key(report, "freeze_steps_us")
    if not isinstance(steps, dict):
        return {}
    return {k: float(v) / 1000.0 for k, v in steps.items() if isinstance(v, int | float)}


def _report_s(report: Any, *names: str) -> float | None:
    for name in names:
        value = find_key(report, name)
        if isinstance(value, int | float):
            return float(value)
    return None


def probe_cli(method: str, exe: Path, scratch: Path) -> str | None:
    """None when ``criu-livedump dump --method METHOD`` dumps an 8 MiB workload, else why not."""
    work = scratch / f"probe-{method}"
    work.mkdir()
    try:
        with workload(exe, 8) as w:
            CliPeer(method).dump(w, work, keep_images=False)
            if w.state() in ("T", "t"):
                return "left the target stopped"
    except BenchError as e:
        return str(e)
    except (json.JSONDecodeError, OSError) as e:
        return f"criu-livedump dump --method {method}: {e}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return None


# --- the benchmark ------------------------------------------------------------------------------


#: Up to this size a plain workload gets :attr:`Config.small_runs` runs a peer unless ``--runs``
#: says otherwise, and so do gcore and clone at every size. Such a run takes seconds, and one
#: peer's run ranged 0.7-3 s at 1 GiB here, 9.4-13.5 s at 8 GiB (gcore's 11.2-22.6 s): the page
#: cache it fills may come from memory the host took back, and past 4 GiB the kernel throttles
#: the writer to the disk. A median of 3 is one unlucky run from moving; the other peers' runs
#: at 8 GiB take 30-50 s each.
SMALL_MIB = 1024
SMALL_RUNS = 5
#: runs per peer and size otherwise (``--runs`` when given)
RUNS = 3


@dataclass
class Config:
    sizes: tuple[int, ...]
    runs: int
    quick: bool
    gcore: bool
    coredump_tool: bool
    scratch_parent: Path
    results_dir: Path
    markdown: Path | None
    plot: bool
    #: size of the all-MADV_DONTFORK workload (0: not measured)
    dontfork_mib: int = 0
    #: the server-shaped workloads, each of :data:`SHAPE_MIB` MiB
    shapes: tuple[Shape, ...] = ()
    #: size of the workload dirtying *dirty_mbps* MB/s (0: not measured)
    dirty_mib: int = 0
    dirty_mbps: int = DIRTY_MBPS
    #: runs per peer on a plain workload of up to :data:`SMALL_MIB`, and of the compared peers
    #: at every size (``--runs`` when given)
    small_runs: int = SMALL_RUNS

    def runs_for(self, peer: Peer, mib: int, plain: bool) -> int:
        """Runs of *peer* on a workload of *mib* MiB."""
        return self.small_runs if plain and (mib <= SMALL_MIB or peer.compared) else self.runs


def settle() -> None:
    """Write the page cache's dirty pages back (sync(2)) before a run, outside its timing: every
    run then starts from the same writeback state, and none pays for what the run before it
    wrote (a criu run leaves its images and its core: 2 GiB at 1 GiB), whatever the order."""
    os.sync()


def measure_peer(
    peer: Peer,
    w: Workload,
    scratch: Path,
    runs: int,
    keep_images: bool,
    deadline: float,
    say: Progress,
) -> tuple[dict[str, Any], Path | None]:
    """Run *peer* up to *runs* times on *w*, back to back, keeping the images of the last run
    when asked.

    Each run but the first follows a run of its own peer: what a run leaves behind weighs on
    the next (a criu or precopy run frees twice the workload's size, which this VM's free page
    reporting hands back to the host, and whoever allocates next pays the host's faults).
    Interleaved, every peer ran behind those: at 1 GiB gcore took 1.60 s and clone 1.56 s until
    complete (1.01 and 0.98 s back to back), the clone's fork at 4 GiB 59-61 ms (47-50 ms).

    A slow peer (gcore) runs once when its first run exceeds :data:`SLOW_PEER_SECONDS`; any
    peer stops early when another run would pass *deadline* (the run's time budget). Whether a
    run is the last is decided before it starts, so that the last one can keep its images.
    """
    done: list[DumpRun] = []
    images = None
    for i in range(runs):
        final = i == runs - 1
        if done:
            slow = peer.slow and done[0].wall_s > SLOW_PEER_SECONDS
            late = time.monotonic() + done[-1].wall_s > deadline
            if slow or late:
                if not keep_images:
                    break
                final = True  # one more run, to keep its images for the conversion
        settle()
        run = peer.dump(w, scratch, keep_images=keep_images and final)
        state = w.state()
        if state in ("T", "t"):
            raise BenchError(f"{peer.name}: left the workload stopped (state {state})")
        done.append(run)
        say(f"  {peer.name} {w.mib} MiB run {i + 1}: gap {run.gap_ms:.1f} ms, {run.wall_s:.2f} s")
        if run.images is not None:
            images = run.images
        if final:
            break
    result = {
        "runs": len(done),
        "gap_ms": stat([r.gap_ms for r in done]),
        "wall_s": stat([r.wall_s for r in done]),
        "frozen_ms": stat([r.frozen_ms for r in done if r.frozen_ms is not None]),
        "freeze_gap_ms": stat([r.freeze_gap_ms for r in done if r.freeze_gap_ms is not None]),
        "dump_s": stat([r.dump_s for r in done if r.dump_s is not None]),
        "convert_s": stat([r.convert_s for r in done if r.convert_s is not None]),
        "complete_s": stat([r.complete_s for r in done if r.complete_s is not None]),
        "peak_extra": stat([r.peak_extra for r in done if r.peak_extra is not None]),
        "rounds": stat([r.rounds for r in done if r.rounds is not None]),
        "precopied_mib": stat([r.precopied_mib for r in done if r.precopied_mib is not None]),
        "core_apparent": done[-1].core_apparent,
        "core_allocated": done[-1].core_allocated,
    }
    if done[-1].capture is not None:
        result["capture"] = done[-1].capture
    steps = sorted({k for r in done for k in r.steps_ms}, key=list(done[-1].steps_ms).index)
    if steps:
        result["steps_ms"] = {
            k: stat([r.steps_ms[k] for r in done if k in r.steps_ms]) for k in steps
        }
    return result, images


def measure_conversion(images: Path, scratch: Path, runs: int, say: Progress) -> dict[str, Any]:
    """``criu-livedump convert`` of *images* against ``cp --sparse=always`` of its pages."""
    nbytes = pages_bytes(images)
    conv_s: list[float] = []
    rss: list[float] = []
    apparent = allocated = 0
    out = scratch / "convert-out"
    for _ in range(runs):
        try:
            child, core = convert_cli(images, out)
            apparent, allocated = file_sizes(core)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        conv_s.append(child.seconds)
        rss.append(child.maxrss_kib / 1024.0)
    cp_s: list[float] = []
    copy = scratch / "cp-out"
    sources = [str(p) for p in sorted(images.glob("pages-*.img"))]
    for _ in range(runs):
        copy.mkdir()
        try:
            cp_s.append(
                run_child(["cp", "--sparse=always", *sources, str(copy)]).check("cp").seconds
            )
        finally:
            shutil.rmtree(copy, ignore_errors=True)
    mb = nbytes / 1e6
    result: dict[str, Any] = {
        "pages_bytes": nbytes,
        "seconds": stat(conv_s),
        "mb_s": stat([mb / s for s in conv_s]),
        "peak_rss_mib": stat(rss),
        "cp_seconds": stat(cp_s),
        "cp_mb_s": stat([mb / s for s in cp_s]),
        "core_apparent": apparent,
        "core_allocated": allocated,
    }
    result["vs_cp"] = ratio(median(result["mb_s"]), median(result["cp_mb_s"]))
    say(f"  convert {nbytes / MIB:.0f} MiB: {median(result['mb_s']):.0f} MB/s")
    return result


def measure_coredump_tool(exe: Path, scratch: Path, say: Progress) -> dict[str, Any]:
    """CRIU's own ``coredump`` tool on a small process (it is quadratic), once, with a timeout;
    the converter on the same images, for the per-byte comparison."""
    images = scratch / "coredump-images"
    out = scratch / "coredump-out"
    tool_py = CRIU_SRC / "coredump" / "coredump"
    result: dict[str, Any] = {"mib": COREDUMP_TOOL_MIB, "timeout_s": COREDUMP_TOOL_TIMEOUT}
    try:
        with workload(exe, COREDUMP_TOOL_MIB) as w:
            criu_direct(w.pid, images)
        nbytes = pages_bytes(images)
        out.mkdir()
        env = dict(os.environ)
        env["PYTHONPATH"] = f"{CRIU_SRC / 'lib'}:{CRIU_SRC / 'coredump'}"
        try:
            child = run_child(
                [sys.executable, str(tool_py), "-i", str(images), "-o", str(out)],
                timeout=COREDUMP_TOOL_TIMEOUT,
                env=env,
            ).check("criu coredump")
        except BenchError as e:
            result["error"] = str(e)
            say(f"  criu coredump: {e}")
            return result
        cores = sorted(out.glob("core.*"))
        result.update(
            pages_bytes=nbytes,
            seconds=child.seconds,
            mb_s=nbytes / 1e6 / child.seconds,
            peak_rss_mib=child.maxrss_kib / 1024.0,
            core_apparent=cores[0].stat().st_size if cores else 0,
        )
        shutil.rmtree(out, ignore_errors=True)
        ours, _ = convert_cli(images, out)
        result["ours_seconds"] = ours.seconds
        result["ours_mb_s"] = nbytes / 1e6 / ours.seconds
        say(f"  criu coredump {COREDUMP_TOOL_MIB} MiB: {result['mb_s']:.2f} MB/s")
        return result
    finally:
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def machine_facts(scratch_parent: Path) -> dict[str, Any]:
    def first(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
        except OSError:
            return "unavailable"
        return (out.stdout.strip().splitlines() or ["unavailable"])[0]

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    fs = _fstype(scratch_parent)
    thp = "unknown"
    with suppress(OSError):
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        thp = text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip()
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_total_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "criu": first([CRIU_BIN, "--version"]),
        "gdb": first(["gdb", "--version"]),
        "python": platform.python_version(),
        "scratch": f"{scratch_parent} ({fs})",
        "thp": thp,
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def run_bench(cfg: Config, say: Progress) -> dict[str, Any]:
    """Run every measurement of *cfg*; return the results document."""
    started = time.monotonic()
    # Peers stop repeating runs past 80% of the budget, leaving room for the conversion, the
    # coredump tool and the report.
    # the server-shaped workloads take a full run's budget (a thousand threads dump slowly)
    budget = BUDGET_QUICK_S if cfg.quick and not cfg.shapes else BUDGET_FULL_S
    deadline = started + 0.8 * budget
    now = datetime.datetime.now(datetime.UTC)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "date": now.isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "quick": cfg.quick,
        "config": {
            "sizes_mib": list(cfg.sizes),
            "shapes": [sh.as_dict() for sh in cfg.shapes],
            "runs": cfg.runs,
            "small_runs": cfg.small_runs,
            "gcore": cfg.gcore,
            "slow_peer_s": SLOW_PEER_SECONDS,
            "repeat_deadline_s": round(deadline - started),
            "budget_s": budget,
        },
        "machine": machine_facts(cfg.scratch_parent),
        "peers": {},
        "sizes": [],
    }
    scratch = Path(tempfile.mkdtemp(prefix="criu-livedump-bench.", dir=cfg.scratch_parent))
    try:
        exe = build_workload(scratch)
        peers: list[Peer] = []
        if cfg.gcore:
            peers.append(GcorePeer())
            results["peers"]["gcore"] = "gdb -p PID -batch -ex 'gcore FILE'"
        say("probing criu-livedump dump --method criu")
        why = probe_cli("criu", exe, scratch)
        if why is None:
            peers.append(CliPeer("criu"))
            results["peers"]["criu"] = "criu-livedump dump --method criu"
        else:
            peers.append(CriuDirectPeer())
            results["peers"]["criu"] = (
                "criu dump --leave-running + criu-livedump convert "
                f"(criu-livedump dump unusable: {why})"
            )
        for method in ("clone", "precopy"):
            say(f"probing criu-livedump dump --method {method}")
            why = probe_cli(method, exe, scratch)
            if why is None:
                peers.append(CliPeer(method))
                results["peers"][method] = f"criu-livedump dump --method {method}"
            else:
                results["peers"][method] = f"not measured: {why}"

        for mib in cfg.sizes:
            results["sizes"].append(measure_size(exe, mib, peers, scratch, cfg, deadline, say))
        if cfg.dontfork_mib:
            dontfork = Shape(dontfork=True)
            results["dontfork"] = measure_size(
                exe, cfg.dontfork_mib, peers, scratch, cfg, deadline, say, shape=dontfork
            )
        if cfg.dirty_mib:
            writing = Shape(dirty=cfg.dirty_mbps)
            results["dirty"] = measure_size(
                exe, cfg.dirty_mib, peers, scratch, cfg, deadline, say, shape=writing
            )
        results["shapes"] = [
            measure_size(exe, SHAPE_MIB, peers, scratch, cfg, deadline, say, shape=shape)
            for shape in cfg.shapes
        ]
        if cfg.coredump_tool:
            say(f"CRIU coredump tool on {COREDUMP_TOOL_MIB} MiB")
            results["criu_coredump"] = measure_coredump_tool(exe, scratch, say)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    results["targets"] = evaluate_targets(results)
    return results


def room_for(mib: int, scratch: Path, *, keep: bool) -> str | None:
    """Why a workload of *mib* MiB does not fit here (None: it fits). The workload is in
    memory; a peer's images and core are on the scratch filesystem at once (a core, or a copy
    of the pages, more when the criu peer's images are kept for the conversion); on tmpfs they
    are memory too. A margin of a GiB for the other tenants of the machine."""
    on_disk = (3 if keep else 2) * mib + 1024
    tmpfs = _fstype(scratch) == "tmpfs"
    need_mem = (mib + 1024 + (on_disk if tmpfs else 0)) * MIB
    if mem_available() < need_mem:
        have = mem_available() / 2**30
        return f"needs {need_mem / 2**30:.1f} GiB of memory available, have {have:.1f} GiB"
    st = os.statvfs(scratch)
    free = st.f_bavail * st.f_frsize
    if not tmpfs and free < on_disk * MIB:
        return f"needs {on_disk / 1024:.1f} GiB free in {scratch}, have {free / 2**30:.1f} GiB"
    return None


def _fstype(path: Path) -> str:
    from criu_livedump.scratch import fstype

    return fstype(path)


def measure_size(
    exe: Path,
    mib: int,
    peers: list[Peer],
    scratch: Path,
    cfg: Config,
    deadline: float,
    say: Progress,
    *,
    shape: Shape = Shape(),
) -> dict[str, Any]:
    """Every peer on one workload of *mib* MiB, then the conversion of the criu peer's images.

    A *shape* other than the plain one (more threads or mappings, or the memory MADV_DONTFORK,
    which the clone copies while the target is frozen) is measured without the conversion.
    """
    plain = shape == Shape()
    dontfork = shape.dontfork
    entry: dict[str, Any] = {
        "mib": mib,
        "freeze": {},
        "dontfork": dontfork,
        "shape": shape.as_dict(),
    }
    skipped = room_for(mib, scratch, keep=plain and mib <= CONVERT_MAX_MIB)
    if skipped is not None:
        entry["skipped"] = skipped
        say(f"{mib} MiB: skipped ({skipped})")
        return entry
    label = f"{mib} MiB" + ("" if plain else f", {shape.label()}")
    say(f"{label}: starting the workload")
    size_dir = scratch / f"size-{mib}-{'-'.join(shape.argv()) or 'plain'}"
    size_dir.mkdir()
    try:
        with workload(exe, mib, shape=shape) as w:
            entry["baseline_gap_ms"] = baseline_gap_ms(w)
            # fork() is the floor of any copy-on-write snapshot: the kernel copies the page
            # tables (dup_mmap()) while the target waits.
            entry["fork_ms"] = stat([w.fork_ms() for _ in range(cfg.runs)])
            images = None
            for peer in peers:
                keep = peer.name == "criu" and plain and mib <= CONVERT_MAX_MIB
                runs = cfg.runs_for(peer, mib, plain)
                try:
                    figures, kept = measure_peer(peer, w, size_dir, runs, keep, deadline, say)
                except BenchError as e:
                    entry["freeze"][peer.name] = {"error": str(e)}
                    say(f"  {peer.name}: {e}")
                    continue
                entry["freeze"][peer.name] = figures
                images = kept or images
        fr = entry["freeze"]
        gcore_gap = median(fr.get("gcore", {}).get("gap_ms"))
        criu_gap = median(fr.get("criu", {}).get("gap_ms"))
        for name in ("criu", "clone", "precopy"):
            if name in fr and "gap_ms" in fr[name]:
                fr[name]["gcore_over_this"] = ratio(gcore_gap, median(fr[name]["gap_ms"]))
        for name in ("clone", "precopy"):
            if "gap_ms" in fr.get(name, {}):
                fr[name]["criu_over_this"] = ratio(criu_gap, median(fr[name]["gap_ms"]))
        if "gap_ms" in fr.get("precopy", {}):
            fr["precopy"]["clone_over_this"] = _clone_over_precopy(
                fr["precopy"], fr.get("clone", {})
            )
        if images is not None:
            entry["convert"] = measure_conversion(images, size_dir, cfg.runs, say)
    finally:
        shutil.rmtree(size_dir, ignore_errors=True)
    return entry


# --- targets ------------------------------------------------------------------------------------


def _size(results: dict[str, Any], mib: int) -> dict[str, Any] | None:
    return next((s for s in results["sizes"] if s["mib"] == mib and "skipped" not in s), None)


def _largest_converted(results: dict[str, Any]) -> dict[str, Any] | None:
    done = [s for s in results["sizes"] if "convert" in s]
    return max(done, key=lambda s: s["mib"]) if done else None


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issues' performance targets, each met, missed or not measured, with the reason."""
    targets: list[dict[str, Any]] = []

    def add(name: str, met: bool | None, detail: str) -> None:
        targets.append({"target": name, "met": met, "detail": detail})

    name = (
        f"clone freezes a {CLONE_FREEZE_TARGET_MIB} MiB target under "
        f"{CLONE_FREEZE_TARGET_MS:.0f} ms"
    )
    size = _size(results, CLONE_FREEZE_TARGET_MIB)
    clone = (size or {}).get("freeze", {}).get("clone")
    if size is None:
        add(name, None, f"not measured: no {CLONE_FREEZE_TARGET_MIB} MiB run (--quick or skipped)")
    elif clone is None:
        add(name, False, f"--method clone unavailable: {results['peers'].get('clone')}")
    elif "error" in clone:
        add(name, False, f"--method clone failed: {clone['error']}")
    else:
        gap = median(clone["gap_ms"])
        assert gap is not None
        detail = f"heartbeat gap median {gap:.1f} ms over {clone['gap_ms']['n']} run(s)"
        own = median(clone.get("frozen_ms"))
        if own is not None:
            detail += f"; the tool's own freeze figure {own:.1f} ms"
        fork = median(size.get("fork_ms"))
        if fork is not None:
            detail += (
                f"; fork() of the same process alone takes {fork:.1f} ms here (the kernel "
                "copies its page tables; transparent huge pages: "
                f"{results.get('machine', {}).get('thp', 'unknown')}, the workload does not "
                "madvise)"
            )
        add(name, gap < CLONE_FREEZE_TARGET_MS, detail)

    name = (
        f"convert a {CONVERT_SPEEDUP_MIB} MiB dump >= {CONVERT_SPEEDUP_TARGET:.0f}x faster per "
        f"byte than CRIU's coredump on {COREDUMP_TOOL_MIB} MiB"
    )
    tool_res = results.get("criu_coredump")
    size = _size(results, CONVERT_SPEEDUP_MIB)
    conv = (size or {}).get("convert") or (_largest_converted(results) or {}).get("convert")
    if tool_res is None:
        add(name, None, "not measured: coredump tool skipped")
    elif "mb_s" not in tool_res:
        add(name, None, f"not measured: coredump tool failed: {tool_res.get('error')}")
    elif conv is None:
        add(name, None, "not measured: no conversion ran")
    else:
        speedup = median(conv["mb_s"]) / tool_res["mb_s"]
        where = "" if size else f" (measured at {conv['pages_bytes'] / MIB:.0f} MiB, not 1 GiB)"
        add(name, speedup >= CONVERT_SPEEDUP_TARGET, f"{speedup:.0f}x{where}")

    name = f"conversion peak RSS under {CONVERT_RSS_TARGET_MIB:.0f} MiB"
    convs = [s for s in results["sizes"] if "convert" in s]
    if not convs:
        add(name, None, "not measured: no conversion ran")
    else:
        worst = max(c["convert"]["peak_rss_mib"]["max"] for c in convs)
        add(name, worst < CONVERT_RSS_TARGET_MIB, f"max {worst:.0f} MiB over all sizes")

    targets += _shape_targets(results)
    targets += _stream_targets(results)
    targets += _precopy_targets(results)
    default = BUDGET_QUICK_S if results["quick"] else BUDGET_FULL_S
    budget = results.get("config", {}).get("budget_s", default)
    what = "--quick" if budget == BUDGET_QUICK_S else "make bench"
    add(
        f"{what} under {budget // 60} min",
        results["elapsed_s"] < budget,
        f"{results['elapsed_s']:.0f} s",
    )
    return targets


def _precopy_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's targets: precopy's heartbeat gap at most :data:`PRECOPY_FREEZE_TARGET_MS` at
    each of :data:`PRECOPY_TARGET_MIBS` (the workload writes only its busy threads' stacks:
    well under 10 MB/s), and on the workload dirtying memory, a gap no longer than clone's
    with the rounds within their bound."""
    out: list[dict[str, Any]] = []
    for mib in PRECOPY_TARGET_MIBS:
        name = f"{_mib_label(mib)}: precopy freezes it in <= {PRECOPY_FREEZE_TARGET_MS:.0f} ms"
        pre = ((size := _size(results, mib)) or {}).get("freeze", {}).get("precopy")
        if size is None or pre is None or "error" in pre:
            why = "no such run" if size is None or pre is None else pre["error"]
            out.append({"target": name, "met": None if pre is None else False, "detail": why})
            continue
        # the gap overlapping its freeze: a precopy window spans minutes of rounds on a shared
        # machine, whose noise the window's longest gap then measures (given in the detail)
        gap = gap_at_freeze(pre)
        clone = median(size["freeze"].get("clone", {}).get("gap_ms"))
        detail = (
            f"heartbeat gap at its freeze median {_f(gap)} ms (clone {_f(clone)} ms) over "
            f"{pre['runs']} runs; longest gap of the whole dump {_f(median(pre['gap_ms']))} ms, "
            f"no dump {_f(size.get('baseline_gap_ms'))} ms"
        )
        out.append({"target": name, "met": gap is not None and gap <= PRECOPY_FREEZE_TARGET_MS,
                    "detail": detail})  # fmt: skip
    dirty = results.get("dirty")
    name = "dirtying memory: precopy's gap no longer than clone's, its rounds bounded"
    fr = (dirty or {}).get("freeze", {})
    pre, clone = fr.get("precopy", {}), fr.get("clone", {})
    if dirty is None or "gap_ms" not in pre or "gap_ms" not in clone:
        out.append({"target": name, "met": None, "detail": "not measured"})
        return out
    gap, clone_gap = gap_at_freeze(pre), gap_at_freeze(clone)
    rounds = (pre.get("rounds") or {}).get("max")
    met = gap is not None and clone_gap is not None and gap <= clone_gap
    met = met and rounds is not None and rounds <= PRECOPY_MAX_ROUNDS
    detail = (
        f"{dirty['mib']} MiB dirtying {dirty['shape']['dirty']} MB/s: gap {_f(gap)} ms against "
        f"clone's {_f(clone_gap)} ms; at most {rounds} rounds (bound {PRECOPY_MAX_ROUNDS})"
    )
    out.append({"target": name, "met": met, "detail": detail})
    return out


def _stream_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 13's targets at 1, 4 and 8 GiB (the sizes measured of them): the clone's core
    complete no later than gcore's in the same run, and its peak extra space within its core's
    allocated size plus :data:`EXTRA_SPACE_SLACK_MIB`."""
    sizes = [s for m in STREAM_TARGET_MIBS if (s := _size(results, m)) is not None]
    label = ", ".join(_mib_label(m) for m in STREAM_TARGET_MIBS)
    time_name = f"until the core is complete: clone no later than gcore ({label})"
    space_name = (
        f"extra space: clone's peak within its core + {EXTRA_SPACE_SLACK_MIB} MiB ({label})"
    )
    times: list[tuple[bool, str]] = []
    spaces: list[tuple[bool, str]] = []
    for s in sizes:
        clone, gcore = s["freeze"].get("clone", {}), s["freeze"].get("gcore", {})
        at = _mib_label(s["mib"])
        ours, theirs = median(clone.get("complete_s")), median(gcore.get("complete_s"))
        if ours is not None and theirs is not None:
            times.append((ours <= theirs, f"{at}: {ours:.2f} s against {theirs:.2f} s"))
        peak, core = median(clone.get("peak_extra")), clone.get("core_allocated")
        if peak is not None and core is not None:
            over = (peak - core) / MIB
            spaces.append((over <= EXTRA_SPACE_SLACK_MIB, f"{at}: {over:+.0f} MiB over the core"))
    out: list[dict[str, Any]] = []
    for name, found in ((time_name, times), (space_name, spaces)):
        if not found:
            out.append({"target": name, "met": None, "detail": "not measured at these sizes"})
        else:
            met = all(ok for ok, _ in found)
            out.append({"target": name, "met": met, "detail": "; ".join(d for _, d in found)})
    return out


def _shape(results: dict[str, Any], want: Shape) -> dict[str, Any] | None:
    """The measured entry of shape *want*, if any."""
    for s in results.get("shapes", []):
        if "skipped" not in s and s.get("shape") == want.as_dict():
            found: dict[str, Any] = s
            return found
    return None


def _seen_ms(peer: dict[str, Any]) -> tuple[float | None, str]:
    """The freeze the target saw: the heartbeat gap at the tool's own freeze where the tool
    places it in time, else the longest gap of the window around the dump."""
    at = median(peer.get("freeze_gap_ms"))
    if at is not None:
        return max(at, LATE_BEAT_MS), "heartbeat gap at the freeze"
    return median(peer.get("gap_ms")), "longest heartbeat gap around the dump"


def _shape_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's targets: the clone's freeze as the target saw it (medians) of 1000 threads,
    and against gcore's, and of 30,000 mappings against fork() alone."""
    out: list[dict[str, Any]] = []
    name = (
        f"{THREADS_TARGET} threads: clone freeze <= {THREADS_FREEZE_TARGET_MS:.0f} ms and "
        f">= {THREADS_GCORE_RATIO_TARGET:.0f}x shorter than gcore's"
    )
    s = _shape(results, Shape(threads=THREADS_TARGET))
    clone = (s or {}).get("freeze", {}).get("clone", {})
    gcore = (s or {}).get("freeze", {}).get("gcore", {})
    seen, how = _seen_ms(clone)
    gcore_gap = median(gcore.get("gap_ms"))
    if s is None:
        out.append({"target": name, "met": None, "detail": "not measured: no such shape"})
    elif seen is None or gcore_gap is None:
        why = clone.get("error") or gcore.get("error") or "a peer did not run"
        out.append({"target": name, "met": False, "detail": f"not measured: {why}"})
    else:
        detail = (
            f"clone {seen:.1f} ms ({how}; tool's own {_f(median(clone.get('frozen_ms')))} ms, "
            f"window gap {_f(median(clone.get('gap_ms')))} ms), gcore gap {gcore_gap:.1f} ms: "
            f"{gcore_gap / seen:.1f}x; no dump {_f(s.get('baseline_gap_ms'))} ms"
        )
        met = seen <= THREADS_FREEZE_TARGET_MS and gcore_gap / seen >= THREADS_GCORE_RATIO_TARGET
        out.append({"target": name, "met": met, "detail": detail})
    name = f"{MAPS_TARGET:,} mappings: clone freeze <= fork() + {MAPS_OVER_FORK_TARGET_MS:.0f} ms"
    s = _shape(results, Shape(maps=MAPS_TARGET))
    clone = (s or {}).get("freeze", {}).get("clone", {})
    seen, how = _seen_ms(clone)
    fork = median((s or {}).get("fork_ms"))
    if s is None:
        out.append({"target": name, "met": None, "detail": "not measured: no such shape"})
    elif seen is None or fork is None:
        why = clone.get("error") or "clone did not run"
        out.append({"target": name, "met": False, "detail": f"not measured: {why}"})
    else:
        own = median(clone.get("frozen_ms"))
        detail = f"clone {seen:.1f} ms ({how}; tool's own {_f(own)} ms), fork() {fork:.1f} ms"
        met = seen <= fork + MAPS_OVER_FORK_TARGET_MS
        out.append({"target": name, "met": met, "detail": detail})
    return out


# --- output: JSON, PNG, Markdown ----------------------------------------------------------------


def results_name(results: dict[str, Any]) -> str:
    date = results["date"][:10]
    return f"{date}-{results['host']}" + ("-quick" if results["quick"] else "")


def write_results(results: dict[str, Any], results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{results_name(results)}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def latest_results(results_dir: Path) -> dict[str, Any]:
    docs = [json.loads(p.read_text()) for p in results_dir.glob("*.json")]
    if not docs:
        raise BenchError(f"{results_dir}: no results")
    # A full run outranks any later --quick run: BENCHMARKS.md shows the full sizes.
    return max(docs, key=lambda d: (not d["quick"], d["date"]))


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Freeze time against size (log-log), one line per peer and measure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(10, 4.5))
    series = [
        ("gcore", "gap_ms", "gcore (heartbeat gap)", "o-", "tab:red"),
        ("criu", "gap_ms", "criu (heartbeat gap)", "s-", "tab:blue"),
        ("criu", "frozen_ms", "criu (CRIU frozen_time)", "s--", "tab:blue"),
        ("clone", "gap_ms", "clone (heartbeat gap)", "^-", "tab:green"),
        ("clone", "frozen_ms", "clone (the tool's own freeze figure)", "^--", "tab:green"),
    ]
    drawn = 0
    for peer, key, label, style, color in series:
        xs, ys, lo, hi = [], [], [], []
        for s in results["sizes"]:
            fig_ = s.get("freeze", {}).get(peer, {})
            st = fig_.get(key)
            if st and st.get("median") is not None:
                xs.append(s["mib"])
                ys.append(st["median"])
                lo.append(st["median"] - st["min"])
                hi.append(st["max"] - st["median"])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, color=color, label=label, capsize=3)
            drawn += 1
    base = [(s["mib"], s["baseline_gap_ms"]) for s in results["sizes"] if "baseline_gap_ms" in s]
    if base:
        ax.plot(
            [b[0] for b in base],
            [b[1] for b in base],
            ":",
            color="grey",
            label="no dump (noise floor)",
        )
    forks = [(s["mib"], s["fork_ms"]["median"]) for s in results["sizes"] if "fork_ms" in s]
    if forks:
        ax.plot(
            [f[0] for f in forks],
            [f[1] for f in forks],
            ":",
            color="tab:green",
            label="fork() alone (page-table copy floor)",
        )
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    sizes = [s["mib"] for s in results["sizes"] if "skipped" not in s]
    ax.set_xticks(sizes, [str(m) for m in sizes])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("target memory (MiB)")
    ax.set_ylabel("freeze (ms, median; bars min-max)")
    ax.set_title(f"Target freeze vs size ({results['host']}, {results['date'][:10]})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _f(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def _mm(st: dict[str, Any] | None, fmt: str = ".1f") -> str:
    """'median (min-max)' of a stat, or '-'."""
    if not st or st.get("median") is None:
        return "-"
    if st["n"] == 1:
        return f"{st['median']:{fmt}} (1 run)"
    return f"{st['median']:{fmt}} ({st['min']:{fmt}}-{st['max']:{fmt}})"


def render_markdown(results: dict[str, Any], json_rel: str, png_rel: str | None) -> str:
    """BENCHMARKS.md from one results document."""
    sections = (
        _md_intro(results, json_rel),
        _md_machine(results),
        _md_freeze(results, png_rel),
        _md_dontfork(results),
        _md_precopy(results),
        _md_shapes(results),
        _md_complete(results),
        _md_wall_time(results),
        _md_conversion(results),
        _md_targets_and_sizes(results),
        _md_reading(results),
    )
    return "\n".join(line for section in sections for line in section)


def _md_intro(results: dict[str, Any], json_rel: str) -> list[str]:
    """The title, where the figures come from, and how to read a freeze."""
    out: list[str] = []
    w = out.append
    w("# Benchmarks")
    w("")
    w(
        "Generated by `make bench` (`bench/run.py`) from "
        f"[`{json_rel}`]({json_rel}); do not edit by hand. "
        f"{'Quick run (`--quick`). ' if results['quick'] else ''}"
        f"Run took {results['elapsed_s']:.0f} s."
    )
    w("")
    w(
        "The workload (`bench/workload.c`) holds N MiB of non-zero private anonymous memory, 4 "
        "busy threads and a heartbeat thread that sleeps 1 ms at a time and records its longest "
        "gap. The **freeze** is that longest gap in a window around each dump: what the target "
        "itself saw. For CRIU the table also gives CRIU's own `frozen_time` from `stats-dump`, "
        "for clone the tool's own figure (seize to detach, steps 1-4 of issue 5). `fork() alone` "
        "is the workload forking itself: the kernel's page-table copy, the floor of any "
        "copy-on-write snapshot. "
        "Each cell is the median with (min-max) over the runs; all peers ran in the same "
        "invocation on the same workload process, each peer's runs back to back, so compare "
        "them as ratios: the machine is shared and absolute figures drift. A plain workload of "
        f"up to {SMALL_MIB // 1024} GiB gets {SMALL_RUNS} runs a peer by default, and so do "
        f"gcore and clone at every size, the other peers {RUNS}. gcore runs once at a size "
        "where its first run takes over a minute, and no peer starts another run past 80% of "
        "the time budget; cells from a single run say so."
    )
    w("")
    return out


def _md_machine(results: dict[str, Any]) -> list[str]:
    """The machine and the peers."""
    out: list[str] = []
    w = out.append
    m = results["machine"]
    w("## Machine")
    w("")
    keys = ("kernel", "cpu", "cores", "mem_total_gib", "thp", "criu", "gdb", "python", "scratch")
    for key in keys:
        w(f"- {key}: {m.get(key)}")
    w(
        f"- load average at start / end: {' '.join(m['loadavg_start'])} / "
        f"{' '.join(m.get('loadavg_end', []))}"
    )
    w("")
    w("Peers:")
    w("")
    for name in ("gcore", "criu", "clone"):
        if name in results["peers"]:
            w(f"- `{name}`: {results['peers'][name]}")
    w("")
    return out


def _md_freeze(results: dict[str, Any], png_rel: str | None) -> list[str]:
    """The freeze of the target, per size and peer."""
    out: list[str] = []
    w = out.append
    w("## Freeze of the target")
    w("")
    w(
        "| size | no dump (noise) | gcore gap ms | criu gap ms | criu frozen_time ms "
        "| clone gap ms | clone freeze (tool) ms | fork() alone ms | gcore / criu "
        "| gcore / clone | criu / clone |"
    )
    w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in results["sizes"]:
        if "skipped" in s:
            w(f"| {s['mib']} MiB | skipped: {s['skipped']} ||||||||||")
            continue
        fr = s["freeze"]

        def cell(peer: str, key: str, fr: dict[str, Any] = fr) -> str:
            p = fr.get(peer)
            if p is None:
                return "n/a"
            if "error" in p:
                return "failed"
            return _mm(p.get(key))

        w(
            f"| {s['mib']} MiB | {_f(s.get('baseline_gap_ms'))} | {cell('gcore', 'gap_ms')} "
            f"| {cell('criu', 'gap_ms')} | {cell('criu', 'frozen_ms')} | {cell('clone', 'gap_ms')} "
            f"| {cell('clone', 'frozen_ms')} | {_mm(s.get('fork_ms'))} "
            f"| {_x(fr.get('criu', {}).get('gcore_over_this'))} "
            f"| {_x(fr.get('clone', {}).get('gcore_over_this'))} "
            f"| {_x(fr.get('clone', {}).get('criu_over_this'))} |"
        )
    errors = [
        (s["mib"], peer, p["error"])
        for s in results["sizes"]
        for peer, p in s.get("freeze", {}).items()
        if "error" in p
    ]
    for mib, peer, err in errors:
        w(f"\n- {peer} at {mib} MiB failed: {err}")
    if png_rel:
        w("")
        w(f"![freeze time vs size]({png_rel})")
    w("")
    return out


def _md_dontfork(results: dict[str, Any]) -> list[str]:
    """The all-MADV_DONTFORK workload, when it ran."""
    out: list[str] = []
    w = out.append
    df = results.get("dontfork")
    if df is not None and "skipped" not in df:
        fr = df["freeze"]

        def dcell(peer: str, key: str) -> str:
            p = fr.get(peer)
            if p is None:
                return "n/a"
            return "failed" if "error" in p else _mm(p.get(key))

        w(f"### {df['mib']} MiB, all of it MADV_DONTFORK")
        w("")
        out += _md_carried(results, "dontfork")
        w(
            "The same workload with its memory in MADV_DONTFORK, as V8 keeps the JavaScript heap "
            "of node and Chromium: a fork does not copy it, so `fork() alone` is short, and the "
            "clone method reads those pages from the target while it is still frozen "
            "(`criu_livedump/snapshot/clone/fork_lost.py`), which is part of its freeze."
        )
        w("")
        w(
            "| gcore gap ms | criu gap ms | criu frozen_time ms | clone gap ms "
            "| clone freeze (tool) ms | fork() alone ms | gcore / clone | criu / clone |"
        )
        w("|---:|---:|---:|---:|---:|---:|---:|---:|")
        w(
            f"| {dcell('gcore', 'gap_ms')} | {dcell('criu', 'gap_ms')} "
            f"| {dcell('criu', 'frozen_ms')} | {dcell('clone', 'gap_ms')} "
            f"| {dcell('clone', 'frozen_ms')} | {_mm(df.get('fork_ms'))} "
            f"| {_x(fr.get('clone', {}).get('gcore_over_this'))} "
            f"| {_x(fr.get('clone', {}).get('criu_over_this'))} |"
        )
        for peer, p in fr.items():
            if "error" in p:
                w(f"\n- {peer} failed: {p['error']}")
        w("")
    return out


def _md_precopy(results: dict[str, Any]) -> list[str]:
    """Method precopy beside clone at each size, and on the workload dirtying memory."""
    rows = [s for s in results["sizes"] if "skipped" not in s and "precopy" in s["freeze"]]
    dirty = results.get("dirty")
    if dirty is not None and "skipped" not in dirty and "precopy" in dirty["freeze"]:
        rows.append(dirty)
    if not rows:
        return []
    out = ["### Precopy (issue 14)", ""]
    out += _md_carried(results, "dirty")
    out += [
        "`--method precopy` copies the big private anonymous areas while the target runs, in "
        "rounds (userfaultfd WP_ASYNC + PAGEMAP_SCAN), then freezes it for the last written "
        "set, with those areas MADV_DONTFORK so the clone's fork copies only the rest. Its "
        "freeze steps: stop / save / scan_copy / madvise / fork / resume.",
        "",
        "The gap at the freeze is the heartbeat's longest gap overlapping the tool's freeze; "
        "the dump's is the longest of its whole window (precopy's spans its rounds).",
        "",
        "| workload | clone gap ms | precopy gap at its freeze ms | precopy gap of the dump ms "
        "| precopy freeze (tool) ms | steps ms | rounds | MiB pre-copied | clone / precopy at "
        "the freeze |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for s in rows:
        fr = s["freeze"]
        pre, clone = fr["precopy"], fr.get("clone", {})
        shape = Shape(**dirty["shape"]) if dirty is not None and s is dirty else Shape()
        label = _mib_label(s["mib"]) + (f", {shape.label()}" if shape.dirty else "")
        if "error" in pre:
            out.append(f"| {label} | {_mm(clone.get('gap_ms'))} | failed: {pre['error']} |||||||")
            continue
        out.append(
            f"| {label} | {_mm(clone.get('gap_ms'))} | {_mm(pre.get('freeze_gap_ms'))} "
            f"| {_mm(pre.get('gap_ms'))} | {_mm(pre.get('frozen_ms'))} | {_precopy_steps(pre)} "
            f"| {_mm(pre.get('rounds'), '.0f')} | {_mm(pre.get('precopied_mib'), '.0f')} "
            f"| {_x(_clone_over_precopy(pre, clone))} |"
        )
    out.append("")
    return out


def _clone_over_precopy(pre: dict[str, Any], clone: dict[str, Any]) -> float | None:
    """Clone's gap over precopy's, each at its freeze where measured (precopy's whole window
    spans its rounds: its longest gap measures the machine, not the freeze)."""
    return ratio(gap_at_freeze(clone), gap_at_freeze(pre))


#: precopy's freeze steps in their order (criu_livedump/snapshot/precopy/method.py: complete())
PRECOPY_STEPS = ("stop", "save", "scan_copy", "madvise", "fork", "resume")


def _precopy_steps(p: dict[str, Any]) -> str:
    """Precopy's steps, medians in ms, in :data:`PRECOPY_STEPS` order."""
    steps = p.get("steps_ms") or {}
    return " / ".join(_f(median(steps.get(k))) for k in PRECOPY_STEPS) if steps else "-"


def _steps_cell(p: dict[str, Any] | None) -> str:
    """The clone's steps, medians in ms: ``stop / save / fork / resume``."""
    steps = (p or {}).get("steps_ms") or {}
    if not steps:
        return "-"
    return " / ".join(f"{median(v):.1f}" for v in steps.values())


def _md_shapes(results: dict[str, Any]) -> list[str]:
    """The server-shaped workloads (issue 12), when they ran."""
    shapes = [s for s in results.get("shapes", []) if "skipped" not in s]
    if not shapes:
        return []
    out: list[str] = []
    w = out.append
    w(f"### Shaped like servers: many threads, many mappings ({shapes[0]['mib']} MiB each)")
    w("")
    out += _md_carried(results, "shapes")
    w(
        "The workload with more threads (idle in futex, read, epoll_wait and nanosleep, as a "
        "server's pools are) or more mappings (one page each). Every thread is stopped and "
        "saved while the target is frozen, and fork() copies every mapping: `fork() alone` is "
        "the same process forking itself. `clone gap at its freeze` is the heartbeat's gap "
        "that overlaps the freeze where the tool's report places it (`freeze_start_monotonic_ns`"
        "): the freeze as the target saw it, without the noise of the whole dump's window (0: no "
        "late beat then). The clone's own figure is split into its steps "
        "(`stop / save / fork / resume`, medians)."
    )
    w("")
    w(
        "| shape | no dump (noise) | fork() alone ms | gcore gap ms | criu gap ms "
        "| criu frozen_time ms | clone gap ms | clone gap at its freeze ms "
        "| clone freeze (tool) ms | clone stop / save / fork / resume ms | gcore / clone |"
    )
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for s in shapes:
        fr = s["freeze"]

        def cell(peer: str, key: str, fr: dict[str, Any] = fr) -> str:
            p = fr.get(peer)
            if p is None:
                return "n/a"
            return "failed" if "error" in p else _mm(p.get(key))

        sh = s["shape"]
        label = f"{sh['maps']:,} mappings" if sh["maps"] else f"{sh['threads']} threads"
        w(
            f"| {label} | {_f(s.get('baseline_gap_ms'))} | {_mm(s.get('fork_ms'))} "
            f"| {cell('gcore', 'gap_ms')} | {cell('criu', 'gap_ms')} "
            f"| {cell('criu', 'frozen_ms')} | {cell('clone', 'gap_ms')} "
            f"| {cell('clone', 'freeze_gap_ms')} "
            f"| {cell('clone', 'frozen_ms')} | {_steps_cell(fr.get('clone'))} "
            f"| {_x(fr.get('clone', {}).get('gcore_over_this'))} |"
        )
    for s in shapes:
        for peer, p in s["freeze"].items():
            if "error" in p:
                w(f"\n- {peer} with {s['shape']} failed: {p['error']}")
    w("")
    return out


def _scaled(st: dict[str, Any] | None, factor: float) -> dict[str, Any] | None:
    """A stat with every figure divided by *factor* (bytes to MiB)."""
    if not st or st.get("median") is None:
        return None
    return {**st, **{k: st[k] / factor for k in ("median", "min", "max")}}


def _md_complete(results: dict[str, Any]) -> list[str]:
    """Issue 13's table: per size and peer, the freeze, the time until the core is complete
    and the peak extra space, in the issue's own layout."""
    rows = [s for s in results["sizes"] if "skipped" not in s]
    if not any("complete_s" in p for s in rows for p in s["freeze"].values()):
        return []
    out: list[str] = []
    w = out.append
    w("## Until the core is complete, and the space it takes")
    w("")
    w(
        f"Cores, images and scratch on {results['machine'].get('scratch')}; the workload's "
        f"memory is the machine's ({results['machine'].get('mem_total_gib')} GiB), so 8 GiB "
        "fits beside everything else. **Until the core is complete**: from the command's "
        "start until the core's final name appeared (an inotify event; the tool writes a "
        "temporary file and renames it), for gcore, which writes its core in place, until gdb "
        "exited. **Extra space at peak**: the most blocks allocated at once to everything the "
        "dump wrote (the core, its temporary file, CRIU's images, the tool's scratch), "
        f"sampled every {SPACE_STEP * 1000:.0f} ms. The freeze is the heartbeat's longest gap "
        "around the dump. `/ gcore`: the median against gcore's in the same run. A peer's "
        "name says how its pages reached the core where its report tells: `stream` (straight "
        "from CRIU into the core's file) or `images` (CRIU's pages images, then the "
        "conversion's copy)."
    )
    w("")
    w(
        "| target | peer | freeze ms | until the core is complete s | / gcore "
        "| extra space at peak MiB | core allocated MiB |"
    )
    w("|---:|---|---:|---:|---:|---:|---:|")
    for s in rows:
        gcore = median(s["freeze"].get("gcore", {}).get("complete_s"))
        for name, p in s["freeze"].items():
            if "error" in p:
                w(f"| {_mib_label(s['mib'])} | {name} | failed |||||")
                continue
            alloc = p.get("core_allocated")
            peer = f"{name} ({p['capture']})" if p.get("capture") else name
            w(
                f"| {_mib_label(s['mib'])} | {peer} | {_mm(p.get('gap_ms'))} "
                f"| {_mm(p.get('complete_s'), '.2f')} "
                f"| {_x(ratio(median(p.get('complete_s')), gcore))} "
                f"| {_mm(_scaled(p.get('peak_extra'), MIB), '.0f')} "
                f"| {'-' if alloc is None else f'{alloc / MIB:.0f}'} |"
            )
    w("")
    return out


def _mib_label(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib} MiB"


def _md_wall_time(results: dict[str, Any]) -> list[str]:
    """Wall time of the whole command."""
    out: list[str] = []
    w = out.append
    w("## End-to-end wall time (the whole command)")
    w("")
    w("| size | gcore s | criu s (all of `dump`) | criu dump s (CRIU) | criu convert s | clone s |")
    w("|---:|---:|---:|---:|---:|---:|")
    for s in results["sizes"]:
        if "skipped" in s:
            continue
        fr = s["freeze"]
        w(
            f"| {s['mib']} MiB | {_mm(fr.get('gcore', {}).get('wall_s'), '.2f')} "
            f"| {_mm(fr.get('criu', {}).get('wall_s'), '.2f')} "
            f"| {_mm(fr.get('criu', {}).get('dump_s'), '.2f')} "
            f"| {_mm(fr.get('criu', {}).get('convert_s'), '.2f')} "
            f"| {_mm(fr.get('clone', {}).get('wall_s'), '.2f')} |"
        )
    w("")
    return out


def _md_conversion(results: dict[str, Any]) -> list[str]:
    """The conversion alone, and CRIU's own coredump tool."""
    out: list[str] = []
    w = out.append
    w("## Conversion (`criu-livedump convert` on the criu peer's images)")
    w("")
    w(
        "Throughput counts the bytes of the pages images (the dumped memory) per second; "
        "`cp --sparse=always` of the same pages images is the floor for moving those bytes. "
        "Peak RSS is the converter process's own (wait4 rusage). Measured after the workload "
        "was stopped, so the converter and cp have the CPUs to themselves (the `criu convert` "
        "column above is the same conversion inside `dump`, sharing the CPUs with the "
        "workload's busy threads)."
    )
    w("")
    w(
        "| size | convert s | convert MB/s | cp MB/s | convert / cp | peak RSS MiB "
        "| core apparent MiB | core allocated MiB |"
    )
    w("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in results["sizes"]:
        c = s.get("convert")
        if c is None:
            continue
        w(
            f"| {s['mib']} MiB | {_mm(c['seconds'], '.2f')} | {_mm(c['mb_s'], '.0f')} "
            f"| {_mm(c['cp_mb_s'], '.0f')} | {_f(c['vs_cp'], '.2f')} "
            f"| {_mm(c['peak_rss_mib'], '.0f')} | {c['core_apparent'] / MIB:.1f} "
            f"| {c['core_allocated'] / MIB:.1f} |"
        )
    tool_res = results.get("criu_coredump")
    if tool_res:
        w("")
        w(
            f"CRIU's own `coredump` tool on a {tool_res['mib']} MiB workload (one run, "
            f"timeout {tool_res['timeout_s']:.0f} s; it is quadratic in the page count):"
        )
        w("")
        out += _md_carried(results, "criu_coredump")
        if "mb_s" in tool_res:
            w(
                f"- CRIU coredump: {tool_res['seconds']:.2f} s, {tool_res['mb_s']:.2f} MB/s, "
                f"peak RSS {tool_res['peak_rss_mib']:.0f} MiB"
            )
            w(
                f"- criu-livedump convert, same images: {tool_res['ours_seconds']:.2f} s, "
                f"{tool_res['ours_mb_s']:.0f} MB/s"
            )
        else:
            w(f"- failed: {tool_res.get('error')}")
    w("")
    return out


def _md_targets_and_sizes(results: dict[str, Any]) -> list[str]:
    """The issues' targets, and the cores' sizes."""
    out: list[str] = []
    w = out.append
    w("## Targets")
    w("")
    w("| target | result | detail |")
    w("|---|---|---|")
    for t in results["targets"]:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        w(f"| {t['target']} | {verdict} | {t['detail']} |")
    w("")
    w("## Core size")
    w("")
    w(
        "Apparent size (st_size) and allocated size (st_blocks), MiB: the converter leaves holes "
        "where the memory was never touched, gcore writes zeros."
    )
    w("")
    w(
        "| size | gcore apparent | gcore allocated | criu apparent | criu allocated "
        "| clone apparent | clone allocated |"
    )
    w("|---:|---:|---:|---:|---:|---:|---:|")
    for s in results["sizes"]:
        if "skipped" in s:
            continue
        cells = []
        for peer in ("gcore", "criu", "clone"):
            p = s["freeze"].get(peer, {})
            for key in ("core_apparent", "core_allocated"):
                cells.append(f"{p[key] / MIB:.1f}" if key in p else "-")
        w(f"| {s['mib']} MiB | " + " | ".join(cells) + " |")
    w("")
    return out


def _md_reading(results: dict[str, Any]) -> list[str]:
    """Notes for the reader."""
    out: list[str] = []
    w = out.append
    w("## Reading these figures")
    w("")
    w(
        "- The heartbeat gap includes scheduling noise: with 4 busy threads on 2 shared cores the "
        "heartbeat misses its 1 ms beat by several ms even when nothing dumps (the `no dump` "
        "column). A freeze is only meaningful well above that floor."
    )
    w(
        "- `criu` freezes the target while CRIU copies every page (through its parasite into "
        "the images), so its freeze grows with the memory size, as gcore's does; CRIU's "
        "`frozen_time` and the heartbeat gap measure the same pause from two sides."
    )
    w(
        f"- Images and cores live on {results['machine'].get('scratch')}: on a disk the "
        "figures include its write rate and the page cache the dumps share with the target; "
        "on tmpfs they exclude both."
    )
    w(
        "- Every tool competes with the workload's 4 busy threads for 2 cores (and with other "
        "tenants of the machine): wall times, the conversion inside `dump` in particular (it "
        "runs at the caller's nice value unless `sched_prio` says otherwise), are those of a "
        "loaded machine. The standalone conversion table shows the converter's own speed."
    )
    for s in results["sizes"]:
        inside = median(s.get("freeze", {}).get("criu", {}).get("convert_s"))
        alone = median(s.get("convert", {}).get("seconds"))
        slowdown = ratio(inside, alone)
        if slowdown is not None:
            w(
                f"  At {s['mib']} MiB the conversion inside `dump` took {inside:.2f} s against "
                f"{alone:.2f} s alone ({slowdown:.1f}x)."
            )
    w("")
    return out


#: sections a run may leave out (``--shapes none``, ``--dontfork-mib 0``,
#: ``--no-coredump-tool``); BENCHMARKS.md then shows them from the newest earlier results
CARRIED = ("dontfork", "dirty", "shapes", "criu_coredump")


def with_carried(results: dict[str, Any], json_path: Path, base: Path) -> dict[str, Any]:
    """*results* to render, plus each :data:`CARRIED` section it lacks from the newest earlier
    results file that has it, named (relative to *base*) under ``carried``."""
    shown = dict(results)
    earlier = []
    for path in json_path.parent.glob("*.json"):
        if path != json_path:
            with suppress(OSError, ValueError):
                earlier.append((json.loads(path.read_text()), path))
    earlier.sort(key=lambda d: str(d[0].get("date", "")), reverse=True)
    for key in CARRIED:
        if _measured(results.get(key)):
            continue
        for doc, path in earlier:
            if _measured(doc.get(key)):
                shown[key] = doc[key]
                shown.setdefault("carried", {})[key] = {
                    "file": os.path.relpath(path, base),
                    "date": str(doc.get("date", "?"))[:10],
                }
                break
    return shown


def _measured(section: Any) -> bool:
    if isinstance(section, list):
        return any(_measured(s) for s in section)
    return isinstance(section, dict) and bool(section) and "skipped" not in section


def _md_carried(results: dict[str, Any], key: str) -> list[str]:
    """The line saying a section comes from an earlier run, if it does."""
    src = results.get("carried", {}).get(key)
    if src is None:
        return []
    return [f"Not measured in this run: from [`{src['file']}`]({src['file']}), {src['date']}.", ""]


def publish(results: dict[str, Any], cfg: Config) -> Path:
    """Write the JSON, the PNG and the Markdown; return the JSON's path."""
    json_path = write_results(results, cfg.results_dir)
    png = None
    if cfg.plot:
        png = plot(results, json_path.with_suffix(".png"))
    if cfg.markdown is not None:
        base = cfg.markdown.parent
        cfg.markdown.write_text(
            render_markdown(
                with_carried(results, json_path, base),
                os.path.relpath(json_path, base),
                os.path.relpath(png, base) if png else None,
            )
        )
    return json_path


def parse_args(argv: Sequence[str] | None) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} MiB only")
    p.add_argument("--sizes", help="comma-separated sizes in MiB (overrides --quick's), or 'none'")
    p.add_argument(
        "--shapes",
        help=f"comma-separated server-shaped {SHAPE_MIB} MiB workloads, threads=N or maps=N, or "
        f"'none' (default: {','.join(_shape_word(sh) for sh in SHAPES)}; --quick: none)",
    )
    p.add_argument(
        "--runs",
        type=int,
        help=f"runs per peer and size (default {RUNS}; {SMALL_RUNS} for a plain workload of up to"
        f" {SMALL_MIB} MiB, and for gcore and clone at every size)",
    )
    p.add_argument(
        "--dontfork-mib",
        type=int,
        help=f"size of the all-MADV_DONTFORK workload, 0 for none (default {DONTFORK_MIB})",
    )
    p.add_argument(
        "--dirty",
        help=f"MIB:MBPS, the workload dirtying MBPS MB/s while dumped, or 'none' (default "
        f"{DIRTY_MIB}:{DIRTY_MBPS}; --quick: none)",
    )
    p.add_argument("--no-gcore", action="store_true", help="skip the gcore peer")
    p.add_argument("--no-coredump-tool", action="store_true", help="skip CRIU's coredump tool")
    p.add_argument(
        "--scratch",
        type=Path,
        default=DEFAULT_SCRATCH,
        help=f"parent of scratch: images and cores (default {DEFAULT_SCRATCH}, a disk)",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--markdown", type=Path, default=MARKDOWN, help="BENCHMARKS.md to regenerate")
    p.add_argument("--no-markdown", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="regenerate BENCHMARKS.md from the latest full results (else the latest quick ones)",
    )
    a = p.parse_args(argv)
    if a.sizes == "none":
        sizes: tuple[int, ...] = ()
    elif a.sizes:
        try:
            sizes = tuple(int(x) for x in a.sizes.split(","))
        except ValueError:
            p.error(f"--sizes {a.sizes}: not a comma-separated list of integers")
    else:
        sizes = QUICK_SIZES if a.quick else FULL_SIZES
    if a.shapes == "none":
        shapes: tuple[Shape, ...] = ()
    elif a.shapes:
        try:
            shapes = tuple(Shape.parse(x) for x in a.shapes.split(","))
        except ValueError:
            p.error(f"--shapes {a.shapes}: not threads=N (N >= {BASE_THREADS}) or maps=N words")
    else:
        shapes = () if a.quick or a.sizes else SHAPES
    if (a.runs is not None and a.runs < 1) or any(s < 1 for s in sizes):
        p.error("--runs and --sizes must be positive")
    if a.dontfork_mib is not None and a.dontfork_mib < 0:
        p.error("--dontfork-mib must not be negative")
    dirty = (0, DIRTY_MBPS) if a.quick or a.sizes else (DIRTY_MIB, DIRTY_MBPS)
    if a.dirty == "none":
        dirty = (0, DIRTY_MBPS)
    elif a.dirty:
        try:
            dirty_mib, dirty_mbps = (int(x) for x in a.dirty.split(":"))
        except ValueError:
            p.error(f"--dirty {a.dirty}: not MIB:MBPS")
        if dirty_mib < 1 or dirty_mbps < 1:
            p.error("--dirty: MIB and MBPS must be positive")
        dirty = (dirty_mib, dirty_mbps)
    cfg = Config(
        sizes=sizes,
        runs=RUNS if a.runs is None else a.runs,
        small_runs=SMALL_RUNS if a.runs is None else a.runs,
        quick=a.quick or sizes != FULL_SIZES,
        gcore=not a.no_gcore,
        coredump_tool=not a.no_coredump_tool,
        scratch_parent=a.scratch,
        results_dir=a.results_dir,
        markdown=None if a.no_markdown else a.markdown,
        plot=not a.no_plot,
        dontfork_mib=DONTFORK_MIB if a.dontfork_mib is None else a.dontfork_mib,
        shapes=shapes,
        dirty_mib=dirty[0],
        dirty_mbps=dirty[1],
    )
    return cfg, a.report_only


def _shape_word(shape: Shape) -> str:
    return f"maps={shape.maps}" if shape.maps else f"threads={shape.threads}"


def main(argv: Sequence[str] | None = None) -> int:
    cfg, report_only = parse_args(argv)
    say = Progress()
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so that every finally runs: workloads killed, scratch removed

    old = signal.signal(signal.SIGTERM, terminate)
    try:
        if report_only:
            results = latest_results(cfg.results_dir)
            results["targets"] = evaluate_targets(results)
        else:
            results = run_bench(cfg, say)
        path = publish(results, cfg)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    print(path)
    for t in results["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        say(f"target: {t['target']}: {verdict} ({t['detail']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
