"""Targets whose session leader is outside their PID namespace (getsid() is 0 for them).

That is every process of a container entered with ``nsenter`` or ``docker exec`` that never
called setsid(), and it is how CI runs this suite. CRIU 4.2 refuses such a task whatever its
options (criu/cr-dump.c:dump_one_task()). The tool must see it coming: ``--method criu`` is
refused before anything is frozen, and ``auto`` (with ``--tree`` too) dumps through the clone,
which calls setsid() before CRIU sees it. One probe (tests/foreign_session_probe.py) runs inside a
fresh PID namespace and reports; these tests judge its report.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile
from harness.criu import criu_binary

pytestmark = [pytest.mark.live]

TOOL = Path(sys.executable).parent / "criu-livedump"
BLOCKED = 6


@pytest.fixture(scope="module")
def probe(programs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is missing")
    work = tmp_path_factory.mktemp("foreign")
    argv = [
        "unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "--",
        sys.executable, str(Path(__file__).with_name("foreign_session_probe.py")),
        str(programs["threads"]), str(TOOL), criu_binary(), str(work),
    ]  # fmt: skip
    # close_fds (the default) and our own stdin: descriptors opened in our mount namespace
    # would be files CRIU cannot place in the probe's (so pipes here, not procs.run's files;
    # unshare --kill-child takes the probe's processes down with it)
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=300, check=False, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    report["work"] = work
    yield report


def test_the_probe_reproduces_a_foreign_session(probe: Any) -> None:
    assert probe["getsid"] == 0
    assert probe["ready"].startswith("ready")
    assert probe["before"]["nssid"][-1] == "0"


def test_criu_itself_refuses_it(probe: Any) -> None:
    """The blocker exists because CRIU fails; when a CRIU learns to dump these, this fails
    and the blocker should go."""
    assert probe["raw_criu"]["rc"] != 0
    assert "is outside of its pid namespace" in probe["raw_criu_log"]


def test_method_criu_is_refused_before_freezing(probe: Any) -> None:
    result = probe["criu"]
    assert result["rc"] == BLOCKED, result["stderr"]
    lines = result["stderr"].splitlines()
    assert lines == [
        f"error: process {probe['pid']}: cannot be dumped: --method criu: its session leader is"
        " outside its PID namespace (session id 0 there), and CRIU cannot dump such a process",
        "hint: --method clone can dump it",
    ]
    assert result["stdout"] == ""
    # CRIU never ran: no parasite, no tracer, and the target kept its state
    assert probe["after_criu"] == probe["before"]
    assert not (probe["work"] / "criu.core").exists()


def test_tree_dumps_it_through_the_clones(probe: Any) -> None:
    """CRIU refuses the tree, so ``auto`` takes the clone of each of its processes."""
    result = probe["tree"]
    assert result["rc"] == 0, result["stderr"]
    assert "(clone)" in result["stderr"]
    assert (probe["work"] / "tree.core").exists()


def test_auto_dumps_it_through_the_clone(probe: Any) -> None:
    result = probe["auto"]
    assert result["rc"] == 0, result["stderr"]
    report = json.loads(result["stdout"])
    assert report["method"] == "clone"
    assert report["core_path"] == str(probe["work"] / "auto.core")
    assert probe["alive"]
    assert probe["after_auto"] == probe["before"]
    with (probe["work"] / "auto.core").open("rb") as f:
        elf = ELFFile(f)
        assert elf["e_type"] == "ET_CORE"
        notes = [
            n for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE" for n in seg.iter_notes()
        ]
    prstatus = [n for n in notes if n["n_type"] == "NT_PRSTATUS"]
    assert len(prstatus) == probe["threads"]
    (psinfo,) = (n for n in notes if n["n_type"] == "NT_PRPSINFO")
    # the kernel's fill_psinfo() reports the session as the target's namespace sees it
    assert psinfo["n_desc"]["pr_sid"] == 0
