"""Soak: the target SIGKILLed at a random moment of ``dump --method criu`` (issue 11).

``make soak`` only (it skips without ``--soak``): a 4 GiB target (``heartbeat`` with a 4 GiB
region it fills itself, three threads) is dumped through the CLI with CRIU's images on disk
(``/var/tmp``, so that RAM holds the target alone), and SIGKILLed at a moment drawn uniformly
over the time a dump takes to the end of CRIU's work (measured first, on a dump that is let
finish; the conversion after it no longer involves the target). A dump that fails must end
within 30 s of the kill with one ``error:`` line; a dump whose snapshot was complete before the
kill writes its core and ends with its conversion, which the death does not touch (on a loaded
machine that can be more than 30 s after the kill). Every run leaves nothing running: no CRIU
(our subreaper would inherit an orphan), no other process of ours, nothing in the scratch or
output directories.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import procs
import pytest
from test_faults import start_heartbeat

pytestmark = [pytest.mark.live, pytest.mark.slow]

EXE = Path(sys.executable).parent / "criu-livedump"
RUNS = 20
TARGET_KIB = 4 << 20  # 4 GiB
AFTER_DEATH = 30


def _dump(pid: int, out: Path, scratch: Path, err: Path) -> subprocess.Popen[bytes]:
    argv = [str(EXE), "dump", str(pid), "--method", "criu", "--core-limit", "unlimited"]
    argv += ["-o", str(out / "core"), "--scratch", str(scratch), "--json"]
    with err.open("wb") as f, err.with_suffix(".json").open("wb") as o:
        return procs.popen(argv, stdin=subprocess.DEVNULL, stdout=o, stderr=f)


def _running(tool: int) -> str:
    """The tool, its children and any CRIU, with their states and where they wait (for the
    failure message)."""
    ps = subprocess.run(
        ["ps", "-eo", "pid,ppid,stat,wchan:32,etimes,args"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    rows = [ln for ln in ps.stdout.splitlines()[1:] if len(ln.split(None, 6)) == 7]
    return "\n".join(
        ln
        for ln in rows
        if str(tool) in ln.split()[:2] or os.path.basename(ln.split()[5]) == "criu"
    )


def test_target_killed_at_random_moments(programs: dict[str, Path], soak: bool) -> None:
    if not soak:
        pytest.skip("make soak only (20 dumps of a 4 GiB target)")
    base = Path(tempfile.mkdtemp(prefix="livedump-soak-", dir="/var/tmp"))
    scratch, out, err = base / "scratch", base / "out", base / "stderr"
    scratch.mkdir()
    out.mkdir()
    ours = set(procs.children(os.getpid()))
    rng = random.Random(int(os.environ.get("SOAK_SEED", "11")))
    outcomes: list[str] = []
    ends: list[float] = []  # kill to the end of a failed dump
    converted: list[float] = []  # kill to the end of a dump that wrote its core
    try:
        # one whole dump, let finish: how long a dump takes here
        hb = start_heartbeat(programs["heartbeat"], str(TARGET_KIB), "4096")
        try:
            tool = _dump(hb.pid, out, scratch, err)
            assert tool.wait(timeout=procs.RUN_TIMEOUT) == 0, err.read_text()
            report = json.loads(err.with_suffix(".json").read_text())
            whole = report["total_seconds"] - report["convert_seconds"]
            (out / "core").unlink()
        finally:
            hb.close()
        for run in range(RUNS):
            hb = start_heartbeat(programs["heartbeat"], str(TARGET_KIB), "4096")
            try:
                tool = _dump(hb.pid, out, scratch, err)
                delay = rng.uniform(0, whole)
                time.sleep(delay)
                os.kill(hb.pid, signal.SIGKILL)
                killed = time.monotonic()
                try:
                    code = tool.wait(timeout=procs.RUN_TIMEOUT)
                except subprocess.TimeoutExpired:
                    raise AssertionError(
                        f"run {run}: dump still runs {procs.RUN_TIMEOUT} s after the target died"
                        f" ({delay:.1f} s into a dump whose CRIU part takes {whole:.1f} s);"
                        f" running:\n{_running(tool.pid)}\nstderr: {err.read_text()}"
                    ) from None
                took = time.monotonic() - killed
            finally:
                procs.kill_group(tool)
                hb.close()
            text = err.read_text()
            errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
            if code == 0:
                # The snapshot was complete before the kill (the core is of the state at the
                # freeze): the run ends when the conversion does, which the target's death does
                # not touch, so the 30 s bound is not this run's.
                assert os.listdir(out) == ["core"], text
                (out / "core").unlink()
                outcomes.append("core written (the snapshot was complete before the kill)")
                converted.append(took)
            else:
                assert took <= AFTER_DEATH, (
                    f"run {run}: ended {took:.1f} s after the target died: {text}"
                )
                assert len(errors) == 1 and "Traceback" not in text, f"run {run}: {text}"
                assert os.listdir(out) == [], text
                outcomes.append(f"exit {code}: {errors[0]}")
                ends.append(took)
            assert os.listdir(scratch) == [], f"run {run}: scratch left"
            left = {p: s for p, s in procs.children(os.getpid()).items() if p not in ours}
            assert not [p for p, s in left.items() if s not in "ZX"], f"run {run}: left {left}"
    finally:
        shutil.rmtree(base, ignore_errors=True)
    kinds = collections.Counter(re.sub(r"process \d+", "process N", o) for o in outcomes)
    print(f"\nsoak target death: {RUNS} runs, {whole:.1f} s to the end of CRIU")
    for what, times in (("a failed dump", ends), ("a dump that wrote its core", converted)):
        if times:
            print(
                f"  seconds from the kill to the end of {what}: median"
                f" {statistics.median(times):.2f}, max {max(times):.2f} ({len(times)} runs)"
            )
    for outcome, n in kinds.most_common():
        print(f"  {n} x {outcome}")
