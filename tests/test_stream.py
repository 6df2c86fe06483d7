"""Streamed capture (criu_livedump/stream.py, issue 13): under ``--method clone`` to a file,
CRIU's pages go straight into the core, so a scratch far smaller than the target is enough;
the other destinations and options take CRIU's images and say why; faults in the middle of the
stream (CRIU killed, the stream's server gone) end in one error, no core, no temporary file,
nothing left in scratch, and the target running.

The kernel comparisons of ``--method clone`` (tests/test_kernel_compare.py) run through the
stream too: their LiveDump asserts ``capture == "stream"``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import procs
import pytest
from harness.corefile import CoreView
from test_faults import EXE, Heartbeat, assert_running, heartbeat, small_tmpfs
from test_page_server import PAGE, SHARED_PAGES, TARGET, page_bytes

from criu_livedump import stream
from criu_livedump.dump import live_dump
from criu_livedump.errors import CriuError, LivedumpError, PageStreamError
from criu_livedump.request import build_request
from criu_livedump.snapshot import page_server as ps

pytestmark = [pytest.mark.live]
__all__ = ["heartbeat"]  # the fixture, shared with test_faults

#: a target four times the scratch: 256 MiB of private pages, 64 MiB of tmpfs
TARGET_MIB, SCRATCH = 256, "64m"


@pytest.fixture
def big_target() -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    proc = procs.popen(
        [sys.executable, "-c", TARGET, str(TARGET_MIB << 8)], stdout=subprocess.PIPE, text=True
    )
    try:
        priv, shared = procs.readline(proc.stdout, 60, "the target's addresses").split()
        yield proc, int(priv), int(shared)
    finally:
        procs.kill_group(proc)
        proc.wait()


def test_target_larger_than_scratch(
    big_target: tuple[subprocess.Popen[str], int, int], tmp_path: Path
) -> None:
    """256 MiB of private pages through a 64 MiB tmpfs scratch: streamed into the core, every
    page where its address says, the shared area's too; the scratch left empty."""
    proc, priv, shared = big_target
    core = tmp_path / "core"
    with small_tmpfs(tmp_path / "scratch", SCRATCH) as scratch:
        argv = [str(EXE), "dump", str(proc.pid), "--method", "clone", "--core-limit", "unlimited"]
        done = procs.run([*argv, "-o", str(core), "--scratch", str(scratch), "--json"], text=True)
        assert done.returncode == 0, done.stderr
        assert os.listdir(scratch) == []
    report = json.loads(done.stdout)
    assert (report["capture"], report["capture_reason"]) == ("stream", "")
    assert proc.poll() is None
    assert sorted(os.listdir(tmp_path)) == ["core", "scratch"]  # no temporary file beside it
    with CoreView(core) as view:
        for i in range(TARGET_MIB * 256):
            assert view.read(priv + i * PAGE, PAGE) == page_bytes(b"P", i), f"page {i}"
        for i in range(SHARED_PAGES):
            assert view.read(shared + i * PAGE, PAGE) == page_bytes(b"S", i), f"shared {i}"


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("-o", "-"), "-o - cannot seek"),
        (("--keep-images",), "--keep-images keeps CRIU's own pages images"),
        (("--method", "criu"), "--method criu: CRIU dumps the target itself"),
        (("--core-limit", "1g"), "the core limit (1073741824 bytes)"),
        (("--coredump-filter", "0x32"), "coredump_filter 0x32 leaves anonymous private memory"),
    ],
    ids=["stdout", "keep-images", "criu", "core-limit", "filter"],
)
def test_fallback_says_why(
    heartbeat: Heartbeat, tmp_path: Path, args: tuple[str, ...], reason: str
) -> None:
    """Where the pages cannot stream, CRIU's images are taken as before: the core is written,
    and the report says how and why (``--json``; ``-v`` logs the same line)."""
    to_stdout = "-o" in args
    out = [] if to_stdout else ["-o", str(tmp_path / "core"), "--json"]
    method = [] if "--method" in args else ["--method", "clone"]
    limit = [] if "--core-limit" in args else ["--core-limit", "unlimited"]
    argv = [str(EXE), "-v", "dump", str(heartbeat.pid), *method, *limit, *out, *args]
    done = procs.run([*argv, "--scratch", str(tmp_path)])
    assert done.returncode == 0, done.stderr
    assert f"capture: CRIU's images, then the conversion ({reason}" in done.stderr.decode()
    if not to_stdout:
        report = json.loads(done.stdout)
        assert report["capture"] == "images" and report["capture_reason"].startswith(reason)
        if "--keep-images" in args:
            kept = Path(report["images_dir"])
            assert any(kept.glob("pages-*.img")) and any(kept.glob("pagemap-*.img"))
            subprocess.run(["rm", "-rf", str(kept)], check=True)
    assert_running(heartbeat)


def _criu_children() -> list[int]:
    """Our children named criu (CRIU, started by criu.dump())."""
    found = []
    for task in os.listdir("/proc/self/task"):
        kids = Path(f"/proc/self/task/{task}/children").read_text().split()
        for kid in kids:
            try:
                if Path(f"/proc/{kid}/comm").read_text().strip() == "criu":
                    found.append(int(kid))
            except FileNotFoundError:
                continue
    return found


def _kill_criu(stats: ps.StreamStats) -> None:
    """Kill CRIU once pages have arrived (the stream is under way)."""
    if stats.written:
        for pid in _criu_children():
            # called again for each run still arriving: the dump's runner may have reaped a
            # CRIU killed by an earlier call between the listing and this kill
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _server_gone(stats: ps.StreamStats) -> None:
    """The stream's server goes away once pages have arrived (its socket shut down)."""
    if stats.written:
        raise PageStreamError("the test's server went away")


@pytest.mark.parametrize(
    ("hook", "error"),
    [(_kill_criu, CriuError), (_server_gone, PageStreamError)],
    ids=["criu-killed", "server-gone"],
)
def test_fault_mid_stream(
    heartbeat: Heartbeat,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    hook: object,
    error: type[LivedumpError],
) -> None:
    """A fault once pages are streaming (triggered by the first pages written, not by time):
    one error, no core and no temporary file, scratch empty, the target running untouched."""
    checksum = heartbeat.checksum()
    monkeypatch.setattr(stream, "run_hook", hook)
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    out.mkdir()
    scratch.mkdir()
    request = build_request(
        output=str(out / "core"), core_limit="unlimited", method="clone", scratch=str(scratch)
    )
    with pytest.raises(error) as raised:
        live_dump(heartbeat.pid, request)
    assert "\n" not in raised.value.message
    assert os.listdir(out) == []
    assert os.listdir(scratch) == []
    assert _criu_children() == []
    assert_running(heartbeat)
    assert heartbeat.checksum() == checksum
    assert procs.children(heartbeat.pid) == {}
