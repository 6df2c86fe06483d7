"""``dump``'s progress (issue 13): the library's events and shared byte counters, the CLI's one
updating line on a terminal and nothing on a pipe, and the ``--json`` byte counters of real
dumps (``bytes_written``, ``peak_scratch_bytes``)."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import procs
import pytest
from conftest import StartTarget

from criu_livedump.cli import TerminalProgress, progress_line
from criu_livedump.progress import Counts, Phase, Progress

EXE = Path(sys.executable).parent / "criu-livedump"
MIB = 1 << 20
#: bounded waits for the CLI under a pseudo-terminal
DUMP_TIMEOUT = 120.0


def test_counters_are_shared_with_a_forked_child() -> None:
    progress = Progress()
    progress.captured(3 * MIB)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        progress.written(5 * MIB)
        progress.captured(1 * MIB)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert progress.counts() == Counts(captured=4 * MIB, written=5 * MIB)


def test_a_sampled_total_never_lowers_the_count() -> None:
    progress = Progress()
    progress.captured_at_least(10)
    progress.captured_at_least(4)
    assert progress.counts().captured == 10
    progress.captured_at_least(12)
    assert progress.counts().captured == 12
    progress.written_at_least(7)
    progress.written_at_least(3)
    progress.written(1)  # a later stage adds to the total
    assert progress.counts() == Counts(captured=12, written=8)


def test_the_line_says_the_stage_then_the_freeze_and_the_bytes() -> None:
    nothing = Counts(0, 0)
    assert progress_line(Phase.INSPECT, None, nothing, 0.0) == "inspecting..."
    assert progress_line(Phase.FREEZE, None, nothing, 0.0) == "freezing..."
    during_criu = progress_line(Phase.CAPTURE, None, Counts(3 * MIB, 0), 1.5 * MIB)
    assert during_criu.startswith("target frozen while CRIU copies it;")
    assert "captured 3.0 MiB" in during_criu and "at 1.5 MiB/s" in during_criu
    after = progress_line(Phase.WRITE, 12_345, Counts(3 << 30, 2 * MIB), 0.0)
    assert after.startswith("frozen 12.3 ms, target running;")
    assert "captured 3.00 GiB, written 2.0 MiB" in after


def _read_all(fd: int, until: float) -> bytes:
    """What the other side of *fd* (a pty master) wrote until it closed, bounded in time."""
    out = b""
    while time.monotonic() < until:
        ready, _, _ = select.select([fd], [], [], max(until - time.monotonic(), 0))
        if not ready:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every slave descriptor is closed
            break
        if not chunk:
            break
        out += chunk
    return out


def test_the_terminal_line_is_redrawn_in_place_and_ended_by_a_newline() -> None:
    master, slave = pty.openpty()
    try:
        line = TerminalProgress(slave)
        line.phase(Phase.FREEZE)
        line.frozen(1_500)
        line.phase(Phase.WRITE)
        line.written(2 * MIB)
        line.close()
        os.close(slave)
        slave = -1
        shown = _read_all(master, time.monotonic() + 10).decode()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    # one line redrawn in place: carriage returns, clear-to-end, one newline at the very end
    assert shown.count("\n") == 1 and shown.endswith("\n"), shown
    last = shown.rstrip("\r\n").rsplit("\r", 1)[-1]
    assert last.startswith("frozen 1.5 ms, target running;"), shown
    assert "written 2.0 MiB" in last, shown


@pytest.mark.live
def test_dump_shows_its_progress_on_a_terminal_only(
    programs: dict[str, Path], targets: StartTarget, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CRIU dump)")
    target = targets(programs["threads"], "2", rseq=False)
    base = [str(EXE), "dump", str(target.pid), "core_limit=unlimited", "--method", "criu"]

    master, slave = pty.openpty()
    try:
        proc = procs.popen(
            [*base, "-o", str(tmp_path / "core.tty")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
        )
        os.close(slave)
        slave = -1
        try:
            shown = _read_all(master, time.monotonic() + DUMP_TIMEOUT).decode(errors="replace")
            assert procs.wait_exit(proc, DUMP_TIMEOUT)
        finally:
            procs.kill_group(proc)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, shown
    progress, _, report = shown.partition("\n")  # the line, then the report (the tty's \r\n)
    last = progress.rstrip("\r").rsplit("\r", 1)[-1]
    assert "\x1b[K" in progress and progress.count("\r") >= 2, shown
    assert last.startswith("frozen ") and ", target running; captured " in last, shown
    written = last.split("written ", 1)[1].split(" at ", 1)[0]
    assert not written.startswith("0 B"), shown
    assert "core written to" in report, shown

    piped = procs.run([*base, "-o", str(tmp_path / "core.pipe")], timeout=DUMP_TIMEOUT)
    assert piped.returncode == 0, piped.stderr
    err = piped.stderr.decode()
    assert "target running" not in err and "\r" not in err and "\x1b" not in err, err
    assert "core written to" in err


def _allocated(path: Path) -> int:
    total = 0
    for top, _dirs, files in os.walk(path):
        total += sum(os.lstat(os.path.join(top, f)).st_blocks * 512 for f in files)
    return total


@pytest.mark.live
@pytest.mark.parametrize("keep_images", [False, True], ids=["no-images-kept", "keep-images"])
@pytest.mark.parametrize("method", ["criu", "clone"])
def test_json_counts_the_bytes_written_and_the_scratch_peak(
    programs: dict[str, Path],
    targets: StartTarget,
    tmp_path: Path,
    mappings_datafile: Path,
    method: str,
    keep_images: bool,
) -> None:
    """Whichever way the pages reach the core (streamed or through CRIU's images, which
    ``--keep-images`` always takes)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (CRIU dump)")
    target = targets(programs["mappings"], mappings_datafile, "16", rseq=False)
    core = tmp_path / "core"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = [str(EXE), "dump", str(target.pid), "core_limit=unlimited", "--method", method]
    argv += ["-o", str(core), "--json", "--scratch", str(scratch)]
    proc = procs.run([*argv, *(["--keep-images"] if keep_images else [])], timeout=DUMP_TIMEOUT)
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)

    # what the file holds: every written byte allocated, holes not (a block's rounding and
    # the filesystem's extent blocks aside); of the 16 MiB area, 3 pages were ever touched
    st = core.stat()
    assert report["size"] == st.st_size
    assert 0 < report["bytes_written"] < st.st_size - 15 * MIB
    assert report["bytes_written"] <= st.st_blocks * 512 <= report["bytes_written"] + MIB
    assert report["peak_scratch_bytes"] > 0  # CRIU's images of the process at least
    if keep_images:
        # the kept images are what scratch held at the end: the peak is at least that
        assert report["images_dir"] is not None
        assert report["peak_scratch_bytes"] >= _allocated(scratch) > 0
