"""/proc/PID/map_files descriptors: the files a live process maps, whatever their names lead to
now (criu_livedump/linux/mapped_files.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from criu_livedump.linux.mapped_files import close_mapped_files, open_mapped_files

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="map_files needs CAP_SYS_ADMIN")

#: maps every file named on its command line, plus a memfd, then waits
MAPPER = """
import mmap, os, sys, time
maps = []
for name in sys.argv[1:]:
    with open(name, "rb") as f:
        maps.append(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
fd = os.memfd_create("scratch")
os.ftruncate(fd, 4096)
maps.append(mmap.mmap(fd, 4096))
print("ready", flush=True)
time.sleep(600)
"""


@contextmanager
def mapper(*files: Path) -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", MAPPER, *map(str, files)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _starts(pid: int, path: Path) -> list[int]:
    return [
        int(line.split("-")[0], 16)
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
        if line.endswith(str(path)) or line.endswith(f"{path} (deleted)")
    ]


def test_a_replaced_file_is_still_the_mapped_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"old" * 2000)
    with mapper(data) as pid:
        (tmp_path / "new").write_bytes(b"new" * 2000)
        (tmp_path / "new").rename(data)
        (start,) = _starts(pid, data)
        fds = open_mapped_files(pid)
        try:
            fd = fds[start]
            assert os.readlink(f"/proc/self/fd/{fd}") == f"{data} (deleted)"
            assert os.pread(fd, 6, 0) == b"oldold"
            # memfd and anonymous memory are CRIU's to save, not ours to read
            assert all("memfd:" not in os.readlink(f"/proc/self/fd/{f}") for f in fds.values())
        finally:
            close_mapped_files(fds)


def test_one_descriptor_per_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"x" * 4096)
    with mapper(data, data, data) as pid:
        fds = open_mapped_files(pid)
        try:
            starts = _starts(pid, data)
            assert len(starts) == 3
            assert len({fds[s] for s in starts}) == 1
        finally:
            close_mapped_files(fds)


def test_more_files_than_the_soft_descriptor_limit(tmp_path: Path) -> None:
    """The soft RLIMIT_NOFILE is raised to the hard one rather than reading by name."""
    files = []
    for i in range(40):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(b"y" * 4096)
    with mapper(*files) as pid:
        script = (
            "import os, resource, sys\n"
            "from criu_livedump.linux.mapped_files import open_mapped_files\n"
            "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir('/proc/self/fd')) + 8,"
            " hard))\n"
            f"print(len(set(open_mapped_files({pid}).values())))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout
    # 40 data files, plus the interpreter's own mapped files
    assert int(out) >= 40


def test_a_process_gone_gives_nothing() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert open_mapped_files(proc.pid) == {}


LOW = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDONLY)
# PROT_READ, MAP_PRIVATE | MAP_FIXED_NOREPLACE at 16 MiB, which maps prints as "01000000-..."
addr = libc.mmap(0x1000000, 4096, 1, 0x02 | 0x100000, fd, 0)
print("ready" if addr == 0x1000000 else f"mmap {addr} {ctypes.get_errno()}", flush=True)
time.sleep(600)
"""


def test_a_mapping_below_the_padding_of_maps(tmp_path: Path) -> None:
    """/proc/PID/maps pads addresses to 8 digits; map_files names must not be padded
    (fs/proc/base.c refuses a leading zero), or low mappings are read by name."""
    data = tmp_path / "data"
    data.write_bytes(b"low" * 2000)
    proc = subprocess.Popen(
        [sys.executable, "-c", LOW, str(data)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        assert _starts(proc.pid, data) == [0x1000000]
        fds = open_mapped_files(proc.pid)
        try:
            assert os.pread(fds[0x1000000], 3, 0) == b"low"
        finally:
            close_mapped_files(fds)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
