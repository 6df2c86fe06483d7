"""``dump --method precopy`` SIGKILLed in each of its steps (issue 14's acceptance): the target
runs on, with no write-protect and no registration of ours left (PAGEMAP_SCAN), no userfaultfd
among its descriptors (/proc/PID/fd and fdinfo), no live clone, no tracer, and the
MADV_DONTFORK flags it had.

The tool stops where its test hooks say (``paused STEP`` on stderr), and only the tool's own
process is killed, as the OOM killer would: its helpers (the clone's watchdog) do their part.
Steps: precopy's own (snapshot/precopy/rounds.py): armed, after round 1, 2 and 3, and resumed
(the target let go, the clone held, the areas still tracked); and inside the final freeze, the
clone's (snapshot/clone/inject.py): every thread stopped (seized), and the clone made (cloned).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

import procs
import pytest
from harness.cases import require_method
from harness.instant import WAIT, seqwriter, wait_until_writers_ran
from harness.procstate import thread_ids

from criu_livedump.linux import pagemap
from criu_livedump.linux.procfs import smaps_entries

pytestmark = [pytest.mark.live]

#: 2 writers rewriting 4 MiB for ever beside 64 MiB written once: round 1 copies 68 MiB, and
#: each later round finds the 4 MiB written again (over the 1 MiB under which rounds stop)
WRITERS = ("2", "512", "fill=64")
#: the end of the user address space, the whole of which is scanned: x86_64's TASK_SIZE_MAX
#: with 4-level page tables (arch/x86/include/asm/page_64_types.h), the bound of the range
#: PAGEMAP_SCAN accepts (fs/proc/task_mmu.c: pagemap_scan_get_args(), access_ok)
USER_END = (1 << 47) - 4096
CLONE_PAUSE_ENV = "CRIU_LIVEDUMP_CLONE_PAUSE"
EXE = Path(sys.executable).parent / "criu-livedump"

STEPS = [
    ("precopy", "armed"),
    ("precopy", "round-1"),
    ("precopy", "round-2"),
    ("precopy", "round-3"),
    ("clone", "seized"),
    ("clone", "cloned"),
    ("precopy", "resumed"),
]


def _scan(pid: int, *, inverted: int, mask: int, anyof: int = 0) -> list[tuple[int, int]]:
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        runs = pagemap.scan(fd, 0, USER_END, inverted=inverted, mask=mask, anyof=anyof,
                            returned=mask)  # fmt: skip
        return list(runs)
    finally:
        os.close(fd)


def write_protected(pid: int) -> list[tuple[int, int]]:
    """Page runs of the whole address space whose pte carries a uffd-wp bit (present) or
    marker (a swap pte, or a never-populated page under WP_UNPOPULATED): not PAGE_IS_WRITTEN
    among PAGE_IS_PRESENT|PAGE_IS_SWAPPED (fs/proc/task_mmu.c: pagemap_page_category()). An
    empty pte in a page table reads as not written too, hence the anyof."""
    written, where = pagemap.PAGE_IS_WRITTEN, pagemap.PAGE_IS_PRESENT | pagemap.PAGE_IS_SWAPPED
    return _scan(pid, inverted=written, mask=written, anyof=where)


def registered(pid: int) -> list[tuple[int, int]]:
    """Page runs in areas registered for asynchronous write-protect (PAGE_IS_WPALLOWED)."""
    return _scan(pid, inverted=0, mask=pagemap.PAGE_IS_WPALLOWED)


def holds_userfaultfd(pid: int) -> bool:
    """A userfaultfd among *pid*'s descriptors, by its link or its fdinfo (``API:`` line)."""
    from criu_livedump.snapshot.precopy import tracker

    fdinfo = Path(f"/proc/{pid}/fdinfo")
    return tracker.holds_userfaultfd(pid) or any("API:" in p.read_text() for p in fdinfo.iterdir())


def dontfork_areas(pid: int) -> list[tuple[int, int, frozenset[str]]]:
    """The mappings with VmFlags ``dc`` (MADV_DONTFORK) or ``wf`` (MADV_WIPEONFORK)."""
    return [
        (e.start, e.end, e.vmflags & {"dc", "wf"})
        for e in smaps_entries(pid)
        if e.vmflags & {"dc", "wf"}
    ]


def left_behind(pid: int) -> list[str]:
    """What of ours is still in the target, empty when nothing."""
    found = []
    if write_protected(pid):
        found.append(f"write-protected pages {write_protected(pid)[:4]}")
    if registered(pid):
        found.append(f"registered areas {registered(pid)[:4]}")
    if holds_userfaultfd(pid):
        found.append("a userfaultfd descriptor")
    # a zombie clone is tolerated, as tests/test_clone.py does: killed inside the freeze
    # (step cloned), before its watchdog exists, nobody reaps the clone from the target
    alive = {c: s for c, s in procs.children(pid).items() if s not in "ZX"}
    if alive:
        found.append(f"children {alive}")
    if "TracerPid:\t0\n" not in Path(f"/proc/{pid}/status").read_text():
        found.append("a tracer")
    return found


@pytest.mark.parametrize(("hook", "step"), STEPS, ids=[s for _, s in STEPS])
def test_tool_killed_leaves_the_target_as_it_was(tmp_path: Path, hook: str, step: str) -> None:
    require_method("precopy")
    from criu_livedump.snapshot.precopy import rounds

    env = {**os.environ, (rounds.PAUSE_ENV if hook == "precopy" else CLONE_PAUSE_ENV): step}
    with seqwriter(*WRITERS) as (target, _):
        pid = target.pid
        writers = thread_ids(pid)[1:]
        flags = dontfork_areas(pid)
        assert left_behind(pid) == []
        out = ("-o", str(tmp_path / "core"), "--scratch", str(tmp_path))
        argv = [EXE, "dump", str(pid), "--method", "precopy", "--core-limit", "unlimited", *out]
        with procs.paused_at(argv, env, step, WAIT) as tool:
            # the control: the checks below see the tool's registration and write-protect
            assert registered(pid) != [] and write_protected(pid) != []
        assert tool.returncode == -signal.SIGKILL
        with contextlib.suppress(AssertionError):  # the bounded wait, then what is left
            procs.wait_for(lambda: not left_behind(pid), WAIT, f"nothing left after {step}")
        assert left_behind(pid) == []
        assert dontfork_areas(pid) == flags
        wait_until_writers_ran(pid, writers)
        assert target.alive()
