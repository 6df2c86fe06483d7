"""A fast mutation fuzzer for the image reader and converter (issue 7, "Hostile input").

Each case is a seed image set (:mod:`seeds`) with one to three mutations (:mod:`mutate`),
chosen by ``random.Random(f"{seed}:{case}")`` so that a case number names a case. Cases run in a
pool of worker processes; a worker writes the case into its scratch directory, converts it into
an empty output directory under ``RLIMIT_AS`` and reports one outcome:

- ``ok``: converted;
- ``error``: one :class:`~converters.errors.ConversionError` whose message is one line naming a
  file, with no temporary file left in the output directory and no descriptor leaked;
- ``crash``: anything else (another exception, a multi-line or anonymous message, leftovers, a
  leaked descriptor, a worker that died): the case is saved with its traceback;
- ``hang``: the conversion used more than the time limit (one second) of CPU time, or ran for
  20 s of wall-clock time, twice (the case is retried once in a fresh worker); the worker is
  killed. CPU time, read from /proc/PID/stat, is what is measured, so that a worker waiting for
  a core on a loaded machine is not mistaken for a hang;
- ``memory``: MemoryError under the address-space limit.

Usage::

    python tests/fuzz/driver.py [--cases N] [--seed S] [--workers 2] [--timeout 1] \\
        [--mem-mib 1024] [--crashes DIR] [--no-real] [--replay DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from statistics import median
from typing import Any

FUZZ_DIR = Path(__file__).resolve().parent
for p in (FUZZ_DIR, FUZZ_DIR.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import mutate  # noqa: E402
import seeds as seedlib  # noqa: E402
from seeds import Seed  # noqa: E402

from converters import ConvertOptions, convert  # noqa: E402
from converters.errors import ConversionError  # noqa: E402

OUTCOMES = ("ok", "error", "crash", "hang", "memory", "fuzzer")
#: outcomes that fail a run ("fuzzer": the fuzzer could not build the case, its own bug)
FAILURES = ("crash", "hang", "memory", "fuzzer")
CRASHES_DIR = FUZZ_DIR / "crashes"
#: time a worker may take to build and write a case before the conversion starts
BUILD_SECONDS = 30.0
#: a conversion still running after this much wall-clock time is a hang whatever its CPU time
STARVED_SECONDS = 20.0
_TICKS = os.sysconf("SC_CLK_TCK")


def case_rng(seed: int, case: int) -> random.Random:
    return random.Random(f"{seed}:{case}")


def make_case(seeds: list[Seed], seed: int, case: int) -> tuple[Seed, list[str]]:
    """Case number *case* of run *seed*: which seed, which mutations."""
    rng = case_rng(seed, case)
    return mutate.mutate(rng, seeds[case % len(seeds)])


def write_case(case: Seed, top: Path, last: dict[str, object] | None = None) -> Path:
    """Lay *case* out under *top*; return the images directory to convert.

    With *last* (what the previous call wrote, updated here), only files whose content object
    changed are rewritten: a case shares the bytes of every file it did not mutate with its
    seed, and rewriting them all would cost more than converting.
    """
    if last is None or not top.exists():
        if top.exists():
            shutil.rmtree(top)
        top.mkdir(parents=True)
        last = {} if last is None else last
        last.clear()
    want: dict[str, object] = {**case.files, **{f"{k}@": v for k, v in case.links.items()}}
    for key in [k for k in last if k not in want or last[k] is not want[k]]:
        path = top / key.removesuffix("@")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        del last[key]
    for rel, data in case.files.items():
        if rel not in last:
            path = top / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            # never write through a symlink a previous case left here (it may name /etc/shadow)
            path.unlink(missing_ok=True)
            path.write_bytes(data)
            last[rel] = data
    for rel, target in case.links.items():
        if f"{rel}@" not in last:
            path = top / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError, FileNotFoundError):
                if path.is_symlink() or path.exists():
                    path.unlink()
                if target == mutate.FIFO:
                    os.mkfifo(path)
                else:
                    os.symlink(target, path)
            last[f"{rel}@"] = target
    (top / "img").mkdir(exist_ok=True)
    (top / "root").mkdir(exist_ok=True)
    return top / "img"


def files_root(case: Seed, top: Path) -> Path:
    return Path(case.files_root) if case.files_root else top / "root"


# --- one case, in a worker ------------------------------------------------------------------------


def _hwm_reset() -> None:
    # "5" resets the peak RSS (Documentation/filesystems/proc.rst, clear_refs)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def run_one(img: Path, root: Path, out: Path) -> tuple[str, str]:
    """Convert *img* into the empty directory *out*; return ``(outcome, detail)``."""
    fds = _fds()
    try:
        results = convert(img, out, ConvertOptions(files_root=root))
    except ConversionError as e:
        msg = str(e)
        problems = []
        if not msg or "\n" in msg:
            problems.append("message is not one line")
        if not any(s in msg for s in (str(img.parent), str(out), ".img", ".json")):
            problems.append("message names no file")
        left = [p.name for p in out.iterdir() if not p.name.startswith("core.")]
        if left:
            problems.append(f"left behind: {left}")
        if _fds() != fds:
            problems.append("descriptor leaked")
        if problems:
            return "crash", f"{'; '.join(problems)}: {type(e).__name__}: {msg!r}"
        return "error", f"{type(e).__name__}: {msg}"
    except MemoryError:
        return "memory", traceback.format_exc()
    except RecursionError:
        return "crash", traceback.format_exc()
    except Exception:
        return "crash", traceback.format_exc()
    want = {f"core.{r.pid}" for r in results if r.path is not None}
    got = {p.name for p in out.iterdir()}
    if got != want:
        return "crash", f"output directory holds {sorted(got)}, expected {sorted(want)}"
    if _fds() != fds:
        return "crash", "descriptor leaked on success"
    return "ok", ""


def _worker(conn: Connection, seeds: list[Seed], seed: int, scratch: str, mem: int) -> None:
    if mem:
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    os.nice(5)
    import logging

    logging.disable(logging.CRITICAL)  # warnings about holes are expected by the thousand
    top = Path(scratch) / f"w{os.getpid()}"
    out = top / "out"
    written: dict[str, object] = {}
    parent = os.getppid()
    try:
        while True:
            # a worker also holds the pool's ends of its siblings' pipes (fork), so the
            # parent's death does not always show as EOF: watch the parent pid instead
            while not conn.poll(1.0):
                if os.getppid() != parent:
                    return
            job = conn.recv()
            if job is None:
                break
            case_no: int = job
            try:
                case, _ = make_case(seeds, seed, case_no)
                img = write_case(case, top / "case", written)
            except Exception:  # a bug of the fuzzer's own, not of the converter
                conn.send((case_no, "fuzzer", traceback.format_exc(), 0.0, 0.0, 0))
                written.clear()
                continue
            if out.exists():
                shutil.rmtree(out)
            out.mkdir()
            _hwm_reset()
            conn.send(("go", case_no))  # the time limit runs from here
            started, cpu = time.perf_counter(), time.process_time()
            try:
                outcome, detail = run_one(img, files_root(case, top / "case"), out)
            except MemoryError:
                outcome, detail = "memory", "MemoryError outside the conversion"
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            conn.send((case_no, outcome, detail, seconds, cpu, _hwm()))
    finally:
        shutil.rmtree(top, ignore_errors=True)


# --- the pool -------------------------------------------------------------------------------------


@dataclass
class Totals:
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    by_seed: Counter[str] = field(default_factory=Counter)
    #: (CPU seconds, wall seconds, case) of the case that used the most CPU time
    slowest: tuple[float, float, int] = (0.0, 0.0, -1)
    slowest_wall: tuple[float, int] = (0.0, -1)
    peak_rss: int = 0
    rss: list[int] = field(default_factory=list)
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def cases(self) -> int:
        return sum(self.outcomes.values())

    def add(self, case_no: int, seed_name: str, outcome: str, detail: str, secs: float,
            cpu: float, rss: int) -> None:  # fmt: skip
        self.outcomes[outcome] += 1
        self.by_seed[seed_name] += 1
        if outcome == "error":
            self.errors[detail.split(":", 1)[0]] += 1
        if cpu > self.slowest[0]:
            self.slowest = (cpu, secs, case_no)
        if secs > self.slowest_wall[0]:
            self.slowest_wall = (secs, case_no)
        self.peak_rss = max(self.peak_rss, rss)
        if rss:
            self.rss.append(rss)
        if outcome in FAILURES:
            self.failures.append((case_no, outcome, detail))

    def report(self) -> str:
        rate = self.cases / self.seconds if self.seconds else 0.0
        lines = [
            f"fuzz: {self.cases} cases in {self.seconds:.1f} s ({rate:.0f}/s)",
            "  outcomes: " + ", ".join(f"{k} {self.outcomes[k]}" for k in OUTCOMES),
            "  errors: " + ", ".join(f"{k} {v}" for k, v in self.errors.most_common()),
            "  seeds: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_seed.items())),
            f"  slowest case: #{self.slowest[2]} {self.slowest[0] * 1000:.1f} ms CPU "
            f"({self.slowest[1] * 1000:.1f} ms wall); longest wall: #{self.slowest_wall[1]} "
            f"{self.slowest_wall[0] * 1000:.1f} ms",
            f"  peak RSS of a case: {self.peak_rss / (1 << 20):.0f} MiB, median "
            f"{median(self.rss or [0]) / (1 << 20):.0f} MiB (worker VmHWM, interpreter included)",
        ]
        for case_no, outcome, detail in self.failures[:20]:
            lines.append(f"  {outcome} #{case_no}: {detail.strip().splitlines()[-1][:200]}")
        return "\n".join(lines)


class _Slot:
    def __init__(self, ctx: Any, seeds: list[Seed], seed: int, scratch: str, mem: int) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, seeds, seed, scratch, mem))
        self.proc.daemon = True
        self.proc.start()
        child.close()
        self.job: int | None = None
        self.sent = 0.0
        self.retry = False
        #: False while the worker builds the case (the fuzzer's time, not the converter's)
        self.converting = False
        self.cpu_at_go = 0.0

    def send(self, case_no: int, retry: bool = False) -> None:
        self.job, self.sent, self.retry = case_no, time.monotonic(), retry
        self.converting = False
        self.conn.send(case_no)

    def limit(self, timeout: float) -> float:
        return timeout if self.converting else BUILD_SECONDS

    def cpu(self) -> float:
        """CPU seconds the worker has used (utime + stime from /proc/PID/stat)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / _TICKS
        except (OSError, IndexError, ValueError):
            return float("inf")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.join()
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.kill()
        self.conn.close()


def run(
    cases: int,
    seed: int = 0,
    workers: int = 2,
    timeout: float = 1.0,
    mem_mib: int = 1024,
    crashes: Path | None = CRASHES_DIR,
    seeds: list[Seed] | None = None,
    first: int = 0,
    progress: bool = False,
) -> Totals:
    """Run case numbers ``first .. first + cases - 1`` of run *seed*; return the totals."""
    if seeds is None:
        seeds = seedlib.make_seeds()
    totals = Totals()
    ctx = mp.get_context("fork")
    shm = Path("/dev/shm")
    scratch = tempfile.mkdtemp(prefix="fuzz-", dir=shm if shm.is_dir() else None)
    slots: list[_Slot] = []
    pending = list(range(first + cases - 1, first - 1, -1))
    retries: list[int] = []
    started = time.monotonic()
    last_print = started

    def spawn() -> _Slot:
        return _Slot(ctx, seeds, seed, scratch, mem_mib << 20)

    def record(case_no: int, outcome: str, detail: str, secs: float, cpu: float,
               rss: int) -> None:  # fmt: skip
        totals.add(case_no, seeds[case_no % len(seeds)].name, outcome, detail, secs, cpu, rss)
        if outcome in ("crash", "hang", "memory") and crashes is not None:
            try:
                save_case(crashes, seeds, seed, case_no, outcome, detail)
            except Exception as e:  # keep the run (and its figures) going
                print(f"case {case_no}: cannot save it: {e!r}", file=sys.stderr)

    try:
        slots = [spawn() for _ in range(workers)]
        while True:
            for slot in slots:
                if slot.job is None and (retries or pending):
                    retry = bool(retries)
                    slot.send(retries.pop() if retry else pending.pop(), retry=retry)
            busy = [s for s in slots if s.job is not None]
            if not busy:
                break
            now = time.monotonic()
            wait_for = min(max(s.sent + s.limit(timeout) - now, 0.0) for s in busy) + 0.01
            ready = mp_wait([s.conn for s in busy], wait_for)
            for i, slot in enumerate(slots):
                if slot.job is None:
                    continue
                if slot.conn in ready:
                    try:
                        msg = slot.conn.recv()
                    except EOFError:  # the worker died (a signal, an abort in C code)
                        slot.proc.join(1)
                        msg = (slot.job, "crash", f"worker died (exit {slot.proc.exitcode})",
                               0.0, 0.0, 0)  # fmt: skip
                        slot.kill()
                        slots[i] = spawn()
                    if msg[0] == "go":
                        slot.sent, slot.converting = time.monotonic(), True
                        slot.cpu_at_go = slot.cpu()
                        continue
                    record(*msg)
                    slot.job = None
                elif time.monotonic() - slot.sent > slot.limit(timeout):
                    # On a loaded machine a worker may wait for a CPU: the budget is CPU time,
                    # with a wall-clock backstop of STARVED_SECONDS.
                    if (
                        slot.converting
                        and slot.cpu() - slot.cpu_at_go < timeout
                        and time.monotonic() - slot.sent < STARVED_SECONDS
                    ):
                        continue
                    case_no, was_retry = slot.job, slot.retry
                    slot.kill()
                    slots[i] = spawn()
                    if was_retry:
                        record(case_no, "hang", f"over {timeout} s of CPU time, twice", timeout,
                               timeout, 0)  # fmt: skip
                    else:
                        retries.append(case_no)
            if progress and time.monotonic() - last_print > 10:
                last_print = time.monotonic()
                print(f"  ... {totals.cases} cases, {dict(totals.outcomes)}", file=sys.stderr,
                      flush=True)  # fmt: skip
    finally:
        for slot in slots:
            slot.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    totals.seconds = time.monotonic() - started
    return totals


def save_case(
    crashes: Path, seeds: list[Seed], seed: int, case_no: int, outcome: str, detail: str
) -> Path:
    """Write case *case_no* with its traceback under *crashes* (at most 5 per problem)."""
    signature = detail.strip().splitlines()[-1][:80] if detail.strip() else outcome
    index = crashes / "index.json"
    crashes.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = json.loads(index.read_text()) if index.exists() else {}
    target = crashes / f"{seeds[case_no % len(seeds)].name}-{seed}-{case_no}"
    if seen.get(signature, 0) >= 5:
        return target
    seen[signature] = seen.get(signature, 0) + 1
    index.write_text(json.dumps(seen, indent=1))
    case, ops = make_case(seeds, seed, case_no)
    write_case(case, target / "case")
    (target / "traceback.txt").write_text(detail)
    info = {"seed": seed, "case": case_no, "base": case.name, "mutations": ops,
            "outcome": outcome, "files_root": case.files_root}  # fmt: skip
    (target / "case.json").write_text(json.dumps(info, indent=1))
    return target


def replay(directory: Path) -> tuple[str, str]:
    """Convert one saved case in this process: ``DIR/img``, files root ``DIR/root`` (or the
    ``files_root`` its ``case.json`` names)."""
    root = directory / "root"
    info = directory.parent / "case.json"
    if info.exists() and json.loads(info.read_text()).get("files_root"):
        root = Path(json.loads(info.read_text())["files_root"])
    with tempfile.TemporaryDirectory() as out:
        return run_one(directory / "img", root, Path(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--first", type=int, default=0, help="first case number")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1.0, help="seconds before a case is a hang")
    ap.add_argument("--mem-mib", type=int, default=1024, help="RLIMIT_AS of a worker")
    ap.add_argument("--crashes", type=Path, default=CRASHES_DIR)
    ap.add_argument("--no-real", action="store_true", help="synthetic seeds only")
    ap.add_argument("--show", type=int, metavar="CASE", help="print a case's mutations and exit")
    ap.add_argument("--replay", type=Path, metavar="DIR", help="convert one saved case")
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: workers are stopped and the scratch directory removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.replay:
        outcome, detail = replay(args.replay)
        print(outcome, detail)
        return 0 if outcome in ("ok", "error") else 1
    seeds = seedlib.make_seeds(real=not args.no_real)
    if args.show is not None:
        case, ops = make_case(seeds, args.seed, args.show)
        print(case.name, *ops, sep="\n  ")
        return 0
    print(f"seeds: {', '.join(s.name for s in seeds)}", file=sys.stderr)
    totals = run(
        args.cases, args.seed, args.workers, args.timeout, args.mem_mib, args.crashes, seeds,
        args.first, progress=True,
    )  # fmt: skip
    print(totals.report())
    bad = sum(totals.outcomes[k] for k in FAILURES)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
