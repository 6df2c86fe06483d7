"""Images written by older CRIU releases convert to the kernel's own core (issue 19).

Each fixture under tests/releases/ (made by tests/releases/make_fixtures.py, see its docstring
for how) holds one process state twice: CRIU's images as that release wrote them, and the
kernel's core of the same state. The images are converted here with the program's binary
(tests/releases/tiny) as the only mapped file, and the result is compared with the kernel's
core by the kernel-comparison suite's comparator (tests/harness/compare.py).
"""

from __future__ import annotations

import json
import lzma
import shutil
import signal
from pathlib import Path

import pytest
from harness.compare import Tolerances, compare_with, note_layout_diffs, restart_diffs
from harness.corefile import CoreView
from pycriu.images import pb

from converters import ConvertOptions, convert
from converters.images import load_image, read_entries

RELEASES = Path(__file__).resolve().parent / "releases"
FIXTURES = sorted(p.name for p in RELEASES.iterdir() if (p / "case.json").is_file())


def test_fixtures_present() -> None:
    assert FIXTURES == ["criu-3.17.1-reencoded", "criu-4.1.1"]


@pytest.fixture(params=FIXTURES)
def cores(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    """(ours, the kernel's) for one fixture."""
    fixture = RELEASES / request.param
    case = json.loads((fixture / "case.json").read_text())
    images = tmp_path / "images"
    shutil.copytree(fixture / "images", images)
    root = tmp_path / "root"
    program = root / str(case["program"]).lstrip("/")
    program.parent.mkdir(parents=True)
    shutil.copyfile(RELEASES / "tiny", program)
    program.chmod(0o755)  # the converter checks the mode the images recorded
    kernel = tmp_path / "kcore"
    kernel.write_bytes(lzma.decompress((fixture / "kcore.xz").read_bytes()))
    out = tmp_path / "ours"
    out.mkdir()
    (result,) = convert(images, out, ConvertOptions(files_root=root, signal=int(signal.SIGABRT)))
    assert result.pid == case["pid"] and result.path is not None
    assert result.warnings == []
    return result.path, kernel


def test_release_images_convert_to_the_kernels_core(cores: tuple[Path, Path]) -> None:
    with CoreView(cores[0]) as ours, CoreView(cores[1]) as kernel:
        diffs = compare_with(ours, kernel, Tolerances(), maps=None, rseq={})
        diffs += restart_diffs(ours, kernel) + note_layout_diffs(ours, kernel)
    assert diffs == [], "\n".join(diffs)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_fixture_pagemaps_have_the_pre_4_2_layout(fixture: str) -> None:
    """What makes these fixtures worth having: every page count is in field 2 (4.2's
    compat_nr_pages), none in field 5."""
    entries = []
    for path in (RELEASES / fixture / "images").glob("pagemap-*.img"):
        entries += load_image(path)["entries"][1:]  # after the pagemap_head
    assert entries and all(e["compat_nr_pages"] > 0 and "nr_pages" not in e for e in entries)


def test_reencoded_fixture_lacks_what_3_17_did_not_write() -> None:
    """memfd_inode_entry.mode arrived in CRIU 3.19 (dfa541095)."""
    images = RELEASES / "criu-3.17.1-reencoded" / "images"
    (inode,) = read_entries(images / "memfd.img", "MEMFD_INODE", pb.memfd_inode_entry)
    assert not inode.HasField("mode")
