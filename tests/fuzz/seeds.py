"""Seed image sets for the mutation fuzzer: synthetic ones (tests/images.py) and a real
``criu dump`` of a tiny C program made at run time.

A seed is held in memory as ``{relative path: bytes}`` plus symlinks, so that a worker can
mutate and write a case without copying directories. The directory converted is always
``img/``; a pre-dump chain keeps its parent in ``prev/`` with ``img/parent -> ../prev``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import images  # noqa: E402

PAGE = images.PAGE
CRIU = Path("/usr/local/sbin/criu")

#: the real seed: anonymous heap and data, a shared anonymous mapping, then wait to be dumped
TINY_C = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
static char data[3 * 4096] = {1};
int main(void)
{
    char *heap = malloc(40000);
    char *shared = mmap(0, 4 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int fd;
    memset(heap, 0x5a, 40000);
    memset(data, 0x11, sizeof(data));
    if (shared == MAP_FAILED)
        return 1;
    memset(shared, 0x22, 4096);
    if (write(1, "r", 1) != 1)
        return 1;
    fd = open("/dev/null", O_RDWR);
    dup2(fd, 1);
    close(fd);
    for (;;)
        pause();
}
"""


@dataclass
class Seed:
    """An image set in memory. ``files`` and ``links`` are keyed by path relative to the case
    directory (``img/pstree.img``, ``prev/pages-1.img``, ``img/parent``)."""

    name: str
    files: dict[str, bytes]
    links: dict[str, str] = field(default_factory=dict)
    #: --files-root for the conversion; None: the case directory's ``root/``
    files_root: str | None = None


def load_dir(name: str, top: Path, files_root: str | None = None) -> Seed:
    """Read every file and symlink under *top* into a :class:`Seed`."""
    files: dict[str, bytes] = {}
    links: dict[str, str] = {}
    for path in sorted(top.rglob("*")):
        rel = str(path.relative_to(top))
        if path.is_symlink():
            links[rel] = os.readlink(path)
        elif path.is_file():
            files[rel] = path.read_bytes()
    return Seed(name, files, links, files_root)


def rich_set(directory: Path, root: Path) -> Path:
    """Two processes, threads, anonymous, file-backed and memfd mappings, a vDSO-like VMA."""
    (root / "lib").mkdir(parents=True, exist_ok=True)
    (root / "lib" / "libx.so").write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    base = 0x1000_0000
    p1 = images.Proc(
        100,
        threads=[100, 101, 102],
        regs={101: {"orig_ax": 0, "ax": 0, "ip": 0x1000_0000}},
        vmas=[
            images.vma(base, base + 8 * PAGE),
            images.file_vma(base + 16 * PAGE, base + 19 * PAGE, file_id=3),
            images.memfd_vma(base + 32 * PAGE, base + 36 * PAGE, file_id=4),
            images.vma(
                base + 40 * PAGE,
                base + 42 * PAGE,
                prot=images.PROT_R | images.PROT_X,
                status=images.VMA_AREA_REGULAR | images.VMA_AREA_VDSO,
            ),
            images.file_vma(base + 48 * PAGE, base + 52 * PAGE, file_id=6),
        ],
        pages=[
            (base + PAGE, images.pattern(base + PAGE, 3)),
            (base + 17 * PAGE, images.pattern(base + 17 * PAGE)),
            (base + 40 * PAGE, images.pattern(base + 40 * PAGE, 2)),
        ],
    )
    p2 = images.Proc(
        200,
        ppid=100,
        vmas=[images.vma(base, base + 2 * PAGE)],
        pages=[(base, images.pattern(base))],
        lazy_runs=[(base + PAGE, 1)],
    )
    img = images.build(
        directory,
        [p1, p2],
        files=[
            images.reg_file(3, "/lib/libx.so", 4 + 256 * 40, 0o100755),
            images.memfd_file(4, 9),
            images.reg_file(6, "/lib/gone.so", 4 * PAGE),
        ],
        memfds=[images.memfd_inode(9, "shm", 4 * PAGE, 77)],
        shmem={77: [(0, images.pattern(0, 1, tag=5)), (2 * PAGE, images.pattern(2 * PAGE))]},
        sidecar={"coredump_filter": 0x3F},
    )
    # /lib/gone.so was deleted before the dump: CRIU kept it as a chunked ghost-file image
    images.remap_ghost(img, (6, 1))
    gone = images.pattern(0, 4, tag=9)
    images.ghost_image(img / "ghost-file-1.img", gone, chunks=[(0, PAGE), (2 * PAGE, PAGE)])
    return img


def chain_set(top: Path) -> Path:
    """A pre-dump chain: ``img/`` saves one page and defers three to ``prev/`` (its parent)."""
    base = 0x2000_0000
    images.build(
        top / "prev",
        [images.Proc(100, vmas=[images.vma(base, base + 8 * PAGE)],
                     pages=[(base, images.pattern(base, 4, tag=1))])],
    )  # fmt: skip
    img = images.build(
        top / "img",
        [
            images.Proc(
                100,
                vmas=[images.vma(base, base + 8 * PAGE)],
                pages=[(base + PAGE, images.pattern(base + PAGE, 1, tag=2))],
                parent_runs=[(base, 1), (base + 2 * PAGE, 2)],
            )
        ],
    )
    os.symlink("../prev", img / "parent")
    return img


def synthetic_seeds(work: Path) -> list[Seed]:
    """The synthetic seeds, built under *work* (which must not exist yet)."""
    work.mkdir(parents=True)
    rich = work / "rich"
    rich_set(rich / "img", rich / "root")
    simple = work / "simple"
    images.simple(simple / "img")
    chain = work / "chain"
    chain_set(chain)
    return [
        load_dir("rich", rich, None),
        load_dir("simple", simple, None),
        load_dir("chain", chain, None),
    ]


def real_seed(work: Path) -> Seed | None:
    """A ``criu dump --leave-running`` of :data:`TINY_C`; None without root, gcc or CRIU.

    The program is killed and reaped before this returns, whatever happens.
    """
    if os.geteuid() != 0 or not CRIU.exists() or shutil.which("gcc") is None:
        return None
    work.mkdir(parents=True, exist_ok=True)
    src, binary = work / "tiny.c", work / "tiny"
    src.write_text(TINY_C)
    built = subprocess.run(
        ["gcc", "-O1", "-o", str(binary), str(src)], capture_output=True, check=False
    )
    if built.returncode != 0:
        return None
    img = work / "real" / "img"
    img.mkdir(parents=True)
    proc = subprocess.Popen(
        [str(binary)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={},
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.read(1) != b"r":
            return None
        proc.stdout.close()
        done = subprocess.run(
            [str(CRIU), "dump", "-t", str(proc.pid), "-D", str(img), "--leave-running",
             "--tcp-close", "--skip-in-flight", "--file-locks", "--network-lock", "skip",
             "-o", "dump.log"],
            capture_output=True,
            check=False,
        )  # fmt: skip
    finally:
        proc.kill()
        proc.wait()
    if done.returncode != 0:
        return None
    for junk in ("dump.log", "stats-dump"):
        (img / junk).unlink(missing_ok=True)
    # the real seed reads mapped files (the C library) from this host: --files-root /
    return load_dir("real", work / "real", "/")


def make_seeds(real: bool = True) -> list[Seed]:
    """Every seed this host can make (the real one needs root, gcc and CRIU)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-seeds-") as tmp:
        seeds = synthetic_seeds(Path(tmp) / "synthetic")
        if real:
            r = real_seed(Path(tmp) / "real")
            if r is not None:
                seeds.append(r)
    return seeds
