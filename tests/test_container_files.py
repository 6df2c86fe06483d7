"""A real Podman checkpoint archive converted on this host (issue 16): the core's file bytes come
from the container's own image, found in local container storage, with the archive's
rootfs-diff.tar over it, and equal the kernel's own core of the same process; without the
image, holes and one line saying what to pass; never this host's files of the same names.

The image is built here without any registry: ``podman import`` of a root filesystem holding
this host's dynamic loader, a copy of its C library whose GNU build-id note is changed (the same
size, another file), and tests/programs/container_files.c. The kernel's core of the container's
process is taken through a ``|`` core_pattern handler (run in the host's namespaces), under
tests/syslock.py's lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import procs
import pytest
from elftools.elf.elffile import ELFFile
from harness.corefile import CoreView, parse_nt_file
from harness.kernel import CorePipe, kernel_core_of
from podman import RUN_OPTIONS, require_podman
from podman import podman as run_podman
from programs import build as programs_build

from converters.elf import NT
from converters.options import CheckpointFiles, ConvertOptions
from criu_livedump.checkpoint_rootfs import image_refs, open_checkpoint

pytestmark = [pytest.mark.live]

PAGE = os.sysconf("SC_PAGE_SIZE")
LIBC_NAME = "/usr/lib/x86_64-linux-gnu/libc.so.6"
LOADER_NAME = "/lib64/ld-linux-x86-64.so.2"
TIMEOUT = 60.0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "criu-livedump"
    return procs.run([str(exe), *args], text=True)


def _own_libc() -> Path:
    with open("/proc/self/maps") as f:
        for line in f:
            name = line.split(maxsplit=5)[-1].strip()
            if name.endswith("/libc.so.6"):
                return Path(name)
    pytest.skip("this interpreter maps no libc.so.6")


def _with_other_build_id(data: bytes) -> bytes:
    """*data* (an ELF file) with each byte of its GNU build-id flipped: another file of the
    same size, whose first page differs only there (pyelftools finds the note)."""
    out = bytearray(data)
    for section in ELFFile(BytesIO(data)).iter_sections():
        if section.header.sh_type != "SHT_NOTE":
            continue
        for note in section.iter_notes():
            if note.n_type == "NT_GNU_BUILD_ID":
                at = note.n_offset + 12 + ((note.n_namesz + 3) & ~3)
                for i in range(note.n_descsz):
                    out[at + i] ^= 0x5A
                return bytes(out)
    pytest.skip("the host's C library has no build-id note")


@pytest.fixture(scope="module")
def podman() -> None:
    require_podman()


@dataclass
class Checkpointed:
    archive: Path
    kernel_core: Path
    ns_pid: int
    image: str
    libc: bytes
    host_libc_head: bytes


@pytest.fixture(scope="module")
def checkpointed(podman: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Checkpointed]:
    """The container's target, checkpointed (``--leave-running --export``), then dumped by the
    kernel (SIGABRT); its image and container are removed at the end."""
    tmp = tmp_path_factory.mktemp("container-files")
    tag = uuid.uuid4().hex[:12]
    image = f"localhost/criu-livedump-test-files:{tag}"
    name = f"criu-livedump-test-files-{tag}"
    host_libc = _own_libc().read_bytes()
    libc = _with_other_build_id(host_libc)
    archive_rootfs = _rootfs_tar(tmp, libc)
    run_podman("import", str(archive_rootfs), image)
    try:
        run_podman("run", "-d", "--name", name, *RUN_OPTIONS, image, "/prog")
        try:
            ns_pid, host_pid = _target(name)
            archive = tmp / "checkpoint.tar"
            run_podman("container", "checkpoint", "--leave-running", "--export", str(archive), name)
            # every mapped file's bytes in the kernel's core (the checkpoint has no filter: a
            # conversion takes the kernel's default 0x33 unless told)
            Path(f"/proc/{host_pid}/coredump_filter").write_text("0x3f\n")
            # a pipe: the process's own mount namespace would take a file pattern as its own path
            kernel = kernel_core_of(host_pid, CorePipe(tmp / "kernel", timeout=TIMEOUT))
            yield Checkpointed(archive, kernel, ns_pid, image, libc, host_libc[:PAGE])
        finally:
            run_podman("rm", "-f", "-t", "0", name, check=False)
    finally:
        run_podman("rmi", "-f", image, check=False)


def _rootfs_tar(tmp: Path, libc: bytes) -> Path:
    """A root filesystem: the program as /prog, the loader, and the changed C library."""
    files = {
        "prog": programs_build.build("container_files").read_bytes(),
        LOADER_NAME.lstrip("/"): Path(os.path.realpath(LOADER_NAME)).read_bytes(),
        LIBC_NAME.lstrip("/"): libc,
    }
    out = tmp / "rootfs.tar"
    with tarfile.open(out, "w") as tf:
        for d in ["lib64", "usr", "usr/lib", "usr/lib/x86_64-linux-gnu", "etc", "proc", "sys",
                  "dev", "run", "tmp"]:  # fmt: skip
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o755
            tf.addfile(info, BytesIO(data))
    return out


def _target(name: str) -> tuple[int, int]:
    """(pid in the container, pid here) of the container's target, once it is ready."""

    def ready() -> list[str] | None:
        words = run_podman("logs", name, check=False).stdout.split()
        return words[words.index("ready") :] if "ready" in words else None

    ns_pid = int(procs.wait_for(ready, TIMEOUT, f"container {name} saying ready", 0.2)[1])
    init = int(run_podman("inspect", "--format", "{{.State.Pid}}", name).stdout)
    children = procs.children(init)
    assert len(children) == 1, children
    return ns_pid, next(iter(children))


def _file_heads(core: Path) -> dict[str, tuple[int, bytes]]:
    """The first page of every file mapping at file offset 0 in *core*, by file name (first
    mapping each), with its address; zeros where the core has no bytes."""
    heads: dict[str, tuple[int, bytes]] = {}
    with CoreView(core) as view:
        note = view.note(NT.FILE)
        assert note is not None
        for entry in parse_nt_file(note.desc)[1]:
            if entry.pgoff or entry.name in heads:
                continue
            try:
                data = view.read(entry.start, PAGE)
            except ValueError:
                data = bytes(PAGE)
            heads[entry.name] = (entry.start, data)
    return heads


def _convert(archive: Path, out: Path, *flags: str) -> tuple[dict[str, object], str]:
    proc = _cli("convert", str(archive), "-o", str(out), "--json", *flags)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_archive_reads_the_containers_image(checkpointed: Checkpointed, tmp_path: Path) -> None:
    """``convert ARCHIVE`` with no flags: every library's header page, the program's and the
    file the container wrote (from rootfs-diff.tar) equal the kernel's core's."""
    data, stderr = _convert(checkpointed.archive, tmp_path / "out")
    kernel = _file_heads(checkpointed.kernel_core)
    ours = _file_heads(tmp_path / "out" / f"core.{checkpointed.ns_pid}")
    assert set(ours) == set(kernel)
    for name in (LIBC_NAME, LOADER_NAME, "/prog", "/data.elf"):
        assert kernel[name][1].startswith(b"\x7fELF"), name  # the kernel dumped it
        assert ours[name] == kernel[name], name
    # the container's C library, not this host's: they differ in that very page
    assert kernel[LIBC_NAME][1] == checkpointed.libc[:PAGE] != checkpointed.host_libc_head
    assert "not read" not in stderr and "not the file" not in stderr, stderr
    assert data["ok"] is True


def test_archive_whole_files_equal_the_kernels(checkpointed: Checkpointed, tmp_path: Path) -> None:
    """Under coredump_filter 0x3f every byte of every file mapping (the container's own C
    library whole, read from its image; the data file, from rootfs-diff.tar) equals the
    kernel's core's."""
    _convert(checkpointed.archive, tmp_path / "out", "--coredump-filter", "0x3f")
    ours_path = tmp_path / "out" / f"core.{checkpointed.ns_pid}"
    compared = 0
    with CoreView(checkpointed.kernel_core) as kernel, CoreView(ours_path) as ours:
        note = kernel.note(NT.FILE)
        assert note is not None
        for entry in parse_nt_file(note.desc)[1]:
            load = kernel.load_at(entry.start)
            assert load is not None and load.filesz == load.memsz, entry
            size = entry.end - entry.start
            assert ours.read(entry.start, size) == kernel.read(entry.start, size), entry.name
            compared += size
    assert compared >= len(checkpointed.libc) // 2  # libc's mappings were among them


def test_archive_with_host_files_root(checkpointed: Checkpointed, tmp_path: Path) -> None:
    """``--files-root /`` asks for this host's files: its C library, of the same size but
    another build-id, is refused with a warning; its loader is the same file and is read."""
    _, stderr = _convert(checkpointed.archive, tmp_path / "out", "--files-root", "/")
    kernel = _file_heads(checkpointed.kernel_core)
    ours = _file_heads(tmp_path / "out" / f"core.{checkpointed.ns_pid}")
    assert ours[LIBC_NAME][1] == bytes(PAGE)
    assert checkpointed.host_libc_head not in (tmp_path / "out" / "core.1").read_bytes()
    assert f"warning: {LIBC_NAME}: not the file the process mapped (build-id " in stderr
    assert ours[LOADER_NAME] == kernel[LOADER_NAME]
    assert ours["/data.elf"] == kernel["/data.elf"]


def test_archive_without_its_image(checkpointed: Checkpointed, tmp_path: Path) -> None:
    """The image gone from local storage: the files only it held are holes, one line says what
    to pass; the container's own changes still come from the archive. Runs last in this
    module (it removes the image)."""
    run_podman("rmi", "-f", checkpointed.image)
    _, stderr = _convert(checkpointed.archive, tmp_path / "out")
    kernel = _file_heads(checkpointed.kernel_core)
    ours = _file_heads(tmp_path / "out" / f"core.{checkpointed.ns_pid}")
    for name in (LIBC_NAME, LOADER_NAME, "/prog"):
        assert ours[name][1] == bytes(PAGE), name
    assert ours["/data.elf"] == kernel["/data.elf"]
    summary = [line for line in stderr.splitlines() if " not read: " in line]
    assert len(summary) == 2, stderr  # one per core: the init's and the target's
    assert f"whose container image {checkpointed.image} (id " in summary[0]
    assert ") is not in local container storage" in summary[0]
    assert "pass --files-root DIR" in summary[0]
    assert (
        checkpointed.host_libc_head
        not in (tmp_path / "out" / f"core.{checkpointed.ns_pid}").read_bytes()
    )


def test_image_refs_from_config(tmp_path: Path) -> None:
    """config.dump's image id and name as podman arguments; never anything that podman could
    take for an option, whatever the archive says."""
    config = tmp_path / "config.dump"
    config.write_text(
        json.dumps(
            {"rootfsImageID": "ab" * 32, "rootfsImageName": "--root=/", "rootfsImage": "x:1"}
        )
    )
    assert image_refs(config) == (["ab" * 32], ["x:1"])
    config.write_text("[1, 2]")
    assert image_refs(config) == ([], [])
    assert image_refs(tmp_path / "absent") == ([], [])


def test_plain_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    """A CRIU image directory without Podman's metadata keeps its options (the images' own
    facts decide where files come from); an archive of it is a checkpoint from elsewhere."""
    images = tmp_path / "img"
    images.mkdir()
    (images / "pstree.img").write_bytes(b"")
    options = ConvertOptions()
    with open_checkpoint(images, options) as (d, got):
        assert (d, got) == (images, options)
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(images / "pstree.img", "checkpoint/pstree.img")
    with open_checkpoint(archive, options, tmp_dir=tmp_path) as (d, got):
        assert d.name == "checkpoint"
        top = d.parent
        assert got.checkpoint == CheckpointFiles(
            "", None, top / "rootfs-diff.tar", top / "deleted.files", top / "devshm-checkpoint.tar"
        )
