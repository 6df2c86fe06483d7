"""Soak: many consecutive live dumps of one target under load (issue 7).

The target (``tests/programs/heartbeat.c``) keeps one thread rewriting 4 MiB without pause and
another measuring its own freezes; it checksums a fixed 1 MiB region itself. The dumps run
in-process through the library (:func:`criu_livedump.dump.live_dump`), so that this process's
own file descriptors can be counted. Every dump must succeed; afterwards the target's checksum
is unchanged and nothing leaked: no file descriptor here, no scratch directory, no child of the
target (clones, zombies), no child of ours (watchdogs, conversion children), no thread or file
descriptor of the target.

N = 20 per method in ``make test``, 200 under ``make soak`` (``--soak``); the figures of the
full run are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
from procs import children
from test_faults import assert_running, start_heartbeat

from converters.options import UNLIMITED
from criu_livedump.dump import live_dump
from criu_livedump.request import DumpRequest, Method

pytestmark = [pytest.mark.live, pytest.mark.slow]


def _fds(pid: int | str) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("method", ["clone", "criu"])
def test_consecutive_dumps_under_load(
    programs: dict[str, Path], tmp_path: Path, soak: bool, method: str
) -> None:
    count = 200 if soak else 20
    hb = start_heartbeat(programs["heartbeat"], "1024", "4096")
    try:
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        checksum = hb.checksum()
        before = {
            "own fds": _fds("self"),
            "own children": len(children(os.getpid())),
            "target fds": _fds(hb.pid),
            "target threads": len(os.listdir(f"/proc/{hb.pid}/task")),
            "target children": len(children(hb.pid)),
            "scratch entries": len(os.listdir(scratch)),
        }
        frozen_ms, gaps_ms, sizes = [], [], []
        hb.reset()
        passes_before = int(hb.ask("mut").split()[1])
        started = time.monotonic()
        for i in range(count):
            core = tmp_path / f"core.{i}"
            request = DumpRequest(
                core_limit=UNLIMITED, output=str(core), scratch=scratch, method=Method(method)
            )
            report = live_dump(hb.pid, request)
            assert report.core_path == str(core), report.lines()
            assert report.method == method
            sizes.append(core.stat().st_size)
            core.unlink()
            frozen_ms.append(report.frozen_us / 1000)
            gap_us, _ = hb.gap()
            gaps_ms.append(gap_us / 1000)
            hb.reset()
        elapsed = time.monotonic() - started
        assert int(hb.ask("mut").split()[1]) > passes_before  # the load ran throughout
        assert hb.checksum() == checksum
        after = {
            "own fds": _fds("self"),
            "own children": len(children(os.getpid())),
            "target fds": _fds(hb.pid),
            "target threads": len(os.listdir(f"/proc/{hb.pid}/task")),
            "target children": len(children(hb.pid)),
            "scratch entries": len(os.listdir(scratch)),
        }
        assert after == before
        assert_running(hb)
        print(
            f"\nsoak {method}: {count} dumps in {elapsed:.1f} s, all succeeded;"
            f" core {statistics.median(sizes) / (1 << 20):.1f} MiB;"
            f" tool-reported freeze ms median {statistics.median(frozen_ms):.1f}"
            f" max {max(frozen_ms):.1f}; target's longest heartbeat gap ms"
            f" median {statistics.median(gaps_ms):.1f} max {max(gaps_ms):.1f};"
            f" leaks: none ({before})"
        )
    finally:
        hb.close()
