"""--files-root (issue 3 "Interface", issue 7 "Hostile input", issue 16 "Foreign images"):
images naming /etc/shadow, /dev/sda, /proc/kcore, a FIFO, a symlink out of the root, a host
library that is not the mapped one. Nothing outside the root is read, no device or special file
is opened, no file other than the one the images record gives bytes, foreign images read no host
path by default, and the warnings name the mappings that became holes."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import images
import procs
import pytest
from elftools.elf.elffile import ELFFile

from converters import ConvertOptions, convert
from converters.options import CheckpointFiles, CoreResult

PAGE = images.PAGE
BASE = 0x2000_0000
SECRET = b"TOP-SECRET-" * 400


def _set(
    tmp_path: Path,
    names: list[str],
    sizes: list[int] | None = None,
    sidecar: dict[str, object] | None = None,
    **recorded: object,
) -> Path:
    """One private file mapping (whole, under coredump_filter 0x3f) per name, recorded with
    *sizes* (default: the size of SECRET) and the other reg_file_entry fields in *recorded*
    (``mode``, ``build_id``, ``mnt_id``)."""
    vmas = [
        images.file_vma(BASE + 4 * i * PAGE, BASE + (4 * i + 1) * PAGE, file_id=10 + i)
        for i in range(len(names))
    ]
    files = []
    for i, n in enumerate(names):
        entry = images.reg_file(10 + i, n, sizes[i] if sizes else len(SECRET))
        entry["reg"].update(recorded)
        files.append(entry)
    return images.build(
        tmp_path / "img", [images.Proc(100, vmas=vmas)], files=files, sidecar=sidecar
    )


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every file the converter opens with os.open() for reading (``O_PATH`` descriptors,
    which open nothing, left out; a reopened ``/proc/self/fd/N`` as the file it names)."""
    opened: list[str] = []
    real_open = os.open

    def record(path: object, flags: int, *args: object, **kwargs: object) -> int:
        name = os.fsdecode(path)  # type: ignore[arg-type]
        if name.startswith("/proc/self/fd/"):
            name = os.readlink(name)
        if not flags & os.O_PATH:
            opened.append(name)
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", record)
    return opened


def _run(
    img: Path, out: Path, root: Path | None, options: ConvertOptions | None = None
) -> tuple[CoreResult, bytes]:
    out.mkdir()
    options = replace(options or ConvertOptions(), files_root=root, coredump_filter=0x3F)
    (result,) = convert(img, out, options)
    assert result.path is not None
    return result, result.path.read_bytes()


def test_escapes_are_refused(tmp_path: Path, spy: list[str]) -> None:
    root = tmp_path / "root"
    (root / "lib").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    (root / "lib" / "ok.so").write_bytes(b"\x7fELF" + bytes(len(SECRET) - 4))
    os.symlink(secret, root / "lib" / "abs-link")  # absolute symlink out of the root
    os.symlink("../../secret", root / "lib" / "rel-link")  # relative symlink out of it
    os.symlink("/lib/ok.so", root / "lib" / "inside-link")  # absolute but meant for the root
    names = [
        "/lib/abs-link",
        "/lib/rel-link",
        "/../secret",
        "/lib/../../secret",
        str(secret),
        "relative/secret",
        "/lib/ok.so",
    ]
    result, core = _run(_set(tmp_path, names), tmp_path / "out", root)
    assert b"TOP-SECRET" not in core
    assert str(secret) not in spy and not any(p.endswith("/secret") for p in spy), spy
    for name in names[:-1]:
        assert any(w.startswith(f"{name}: ") and "holes" in w for w in result.warnings), name
    assert not any(w.startswith("/lib/ok.so:") and "holes" in w for w in result.warnings)
    assert core.count(b"\x7fELF") >= 2  # the core's own header and ok.so's first page


def test_special_files_never_opened(tmp_path: Path, spy: list[str]) -> None:
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    os.mkfifo(root / "dev" / "fifo")
    special = ["/dev/fifo"]
    try:
        os.mknod(root / "dev" / "sda", 0o600 | stat.S_IFBLK, os.makedev(8, 0))
        os.mknod(root / "dev" / "zero", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
        special += ["/dev/sda", "/dev/zero"]
    except PermissionError:
        pass  # without CAP_MKNOD the FIFO stands in for devices
    result, _ = _run(_set(tmp_path, [*special, "/dev"]), tmp_path / "out", root)
    assert not any(p.startswith(str(root)) for p in spy), spy
    for name in special:
        assert f"{name}: not a regular file; mapping at" in "\n".join(result.warnings)


def test_host_files_under_the_default_root(tmp_path: Path, spy: list[str]) -> None:
    """With --files-root / (the default for images dumped here), device nodes and
    pseudo-filesystem files such as /proc/kcore and /proc/self/mem are still never opened."""
    names = ["/dev/sda", "/dev/zero", "/dev/null", "/proc/kcore", "/proc/self/mem",
             "/sys/kernel/notes", "/dev/stdin"]  # fmt: skip
    result, _ = _run(_set(tmp_path, names), tmp_path / "out", Path("/"))
    for forbidden in names:
        assert forbidden not in spy, f"{forbidden} was opened"
    warned = "\n".join(result.warnings)
    for name in names:
        assert f"{name}: " in warned and "holes" in warned, name
    assert "/proc/self/mem: on procfs" in warned  # refused for what it is, not by absence


def test_missing_and_short_files_become_holes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "lib").mkdir(parents=True)
    (root / "lib" / "short.so").write_bytes(b"abc")
    proc = images.Proc(
        100,
        vmas=[
            images.file_vma(BASE, BASE + PAGE, file_id=1),
            images.file_vma(BASE + 4 * PAGE, BASE + 7 * PAGE, file_id=2),
        ],
    )
    img = images.build(
        tmp_path / "img",
        [proc],
        files=[
            images.reg_file(1, "/lib/gone.so", PAGE),
            images.reg_file(2, "/lib/short.so", 3 * PAGE),
        ],
    )
    result, _ = _run(img, tmp_path / "out", root)
    warned = "\n".join(result.warnings)
    assert f"/lib/gone.so: missing; mapping at {BASE:#x} written as holes" in warned
    assert (
        f"/lib/short.so: not the file the process mapped (size 3, recorded {3 * PAGE});"
        f" mapping at {BASE + 4 * PAGE:#x} written as holes"
    ) in warned


# --- issue 16: only the file the images record, and no host file for foreign images ----------

SHADOW = Path("/etc/shadow")
NOWHERE_BOOT = "00000000-0000-4000-8000-000000000000"


def _own_libc() -> Path:
    """The C library this interpreter maps, as the kernel names it."""
    with open("/proc/self/maps") as f:
        for line in f:
            name = line.split(maxsplit=5)[-1].strip()
            if "/libc.so" in name or "/libc-" in name:
                return Path(name)
    pytest.skip("no C library mapped by this interpreter")


def _build_id_words(path: Path) -> list[int]:
    """The file's GNU build-id as CRIU stores it in reg_file_entry.build_id (pyelftools' view,
    independent of the converter's parser)."""
    with path.open("rb") as f:
        for section in ELFFile(f).iter_sections():
            if section.header.sh_type != "SHT_NOTE":
                continue
            for note in section.iter_notes():
                if note.n_type == "NT_GNU_BUILD_ID":
                    raw = bytes.fromhex(note.n_desc)
                    raw += bytes(-len(raw) % 4)
                    return list(struct.unpack(f"<{len(raw) // 4}I", raw))
    pytest.skip(f"{path} has no build-id")


def _shadow() -> tuple[bytes, os.stat_result]:
    if not SHADOW.is_file():
        pytest.skip("no /etc/shadow on this host")
    return SHADOW.read_bytes(), SHADOW.stat()


@pytest.mark.parametrize("origin", ["this host", "mount namespace", "another boot", "archive"])
def test_foreign_images_read_no_host_path(tmp_path: Path, spy: list[str], origin: str) -> None:
    """Images naming /etc/shadow with its very size and mode: read from this host only when
    they were dumped here, in its mount namespace (the control); from a container's mount
    namespace, another boot or machine, or a checkpoint archive, holes and one summary line."""
    content, st = _shadow()
    recorded: dict[str, object] = {"mode": st.st_mode}
    sidecar = None
    options = ConvertOptions()
    if origin == "mount namespace":
        recorded["mnt_id"] = 106  # what CRIU records for a container's root mount
    elif origin == "another boot":
        sidecar = {"boot_id": NOWHERE_BOOT}
    elif origin == "archive":
        ck = CheckpointFiles("", None, tmp_path / "rootfs-diff.tar", tmp_path / "deleted.files")
        options = ConvertOptions(checkpoint=ck)
    img = _set(tmp_path, [str(SHADOW)], [st.st_size], sidecar, **recorded)
    result, core = _run(img, tmp_path / "out", None, options)
    if origin == "this host":
        assert content in core and str(SHADOW) in spy
        assert not result.warnings
        return
    assert content not in core
    assert str(SHADOW) not in spy
    (summary,) = [w for w in result.warnings if "not read" in w]
    assert summary.startswith("1 mapped file not read: ")
    assert "--files-root DIR" in summary
    assert len(result.warnings) == 1, result.warnings


def test_recorded_size_differs_from_the_host_file(tmp_path: Path, spy: list[str]) -> None:
    """The issue's report: /etc/shadow recorded as 1 MiB, images dumped here: holes, and a
    warning naming the mapping and the sizes, never the host file's bytes."""
    content, st = _shadow()
    img = _set(tmp_path, [str(SHADOW)], [1 << 20], mode=st.st_mode)
    result, core = _run(img, tmp_path / "out", None)
    assert content not in core
    assert result.warnings == [
        f"{SHADOW}: not the file the process mapped (size {st.st_size}, recorded {1 << 20});"
        f" mapping at {BASE:#x} written as holes"
    ]


@pytest.mark.parametrize("differs", ["nothing", "size", "mode", "build-id"])
def test_host_library_must_be_the_mapped_one(tmp_path: Path, differs: str) -> None:
    """This host's C library under its own name, recorded with a size, a mode or a build-id of
    its own: its first page is in the core only when everything matches."""
    libc = _own_libc()
    st = libc.stat()
    with libc.open("rb") as f:
        head = f.read(PAGE)
    words = _build_id_words(libc)
    size, mode = st.st_size, st.st_mode
    if differs == "size":
        size += PAGE
    elif differs == "mode":
        mode ^= 0o111
    elif differs == "build-id":
        words = [words[0] ^ 1, *words[1:]]
    img = _set(tmp_path, [str(libc)], [size], mode=mode, build_id=words)
    result, core = _run(img, tmp_path / "out", None)
    if differs == "nothing":
        assert head in core and not result.warnings
        return
    assert head not in core
    (warning,) = result.warnings
    assert warning.startswith(f"{libc}: not the file the process mapped ({differs} ")
    assert warning.endswith(f"mapping at {BASE:#x} written as holes")


def test_explicit_files_root_serves_foreign_images(tmp_path: Path) -> None:
    """--files-root DIR is read for foreign images too (the user names their root), and still
    only files that are the recorded ones."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "shadow").write_bytes(SECRET)
    (root / "etc" / "other").write_bytes(SECRET + b"!")
    img = _set(tmp_path, ["/etc/shadow", "/etc/other"], mnt_id=106, mode=0o100644)
    result, core = _run(img, tmp_path / "out", root)
    assert SECRET[:PAGE] in core
    assert result.warnings == [
        f"/etc/other: not the file the process mapped (size {len(SECRET) + 1}, recorded"
        f" {len(SECRET)}); mapping at {BASE + 4 * PAGE:#x} written as holes"
    ]


def _tar(path: Path, members: dict[str, bytes | str]) -> Path:
    """An uncompressed tar of regular files (bytes), symlinks (their target, a str) and hard
    links (``"=" + the linked member``)."""
    with tarfile.open(path, "w") as tf:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, str) and content.startswith("="):
                info.type, info.linkname = tarfile.LNKTYPE, content[1:]
                tf.addfile(info)
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tf.addfile(info)
            else:
                info.size, info.mode = len(content), 0o644
                tf.addfile(info, io.BytesIO(content))
    return path


def test_container_changes_over_its_image(tmp_path: Path, spy: list[str]) -> None:
    """A checkpoint's rootfs-diff.tar laid over its image's root, its devshm-checkpoint.tar
    as /dev/shm: changed files come from the tar (read in place), deleted ones from nowhere,
    a link in it is never followed, /dev/shm holds only what its tar has, the rest comes from
    the image."""
    image = tmp_path / "image"
    (image / "lib").mkdir(parents=True)
    (image / "dev" / "shm").mkdir(parents=True)
    for name in ("lib/changed.so", "lib/gone.so", "lib/base.so", "lib/link.so", "dev/shm/old"):
        (image / name).write_bytes(b"IMAGE:" + name.encode() + bytes(len(SECRET) - 30))
    pad = bytes(len(SECRET) - 7)
    changes = _tar(
        tmp_path / "rootfs-diff.tar",
        {
            "lib/changed.so": b"CHANGED" + pad,
            "lib/link.so": str(SHADOW),
            "lib/hard.so": "=lib/changed.so",
            "lib/hard-out.so": "=../../etc/shadow",
        },
    )
    devshm = _tar(tmp_path / "devshm-checkpoint.tar", {"./shm-obj": b"SHMSHMS" + pad})
    (tmp_path / "deleted.files").write_text(json.dumps(["/lib/gone.so"]))
    names = ["/lib/changed.so", "/lib/gone.so", "/lib/base.so", "/lib/link.so",
             "/dev/shm/shm-obj", "/dev/shm/old", "/lib/hard.so", "/lib/hard-out.so"]  # fmt: skip
    sizes = [len(SECRET)] * len(names)
    sizes[2] = (image / "lib" / "base.so").stat().st_size
    img = _set(tmp_path, names, sizes, mnt_id=106, mode=0o100644)
    ck = CheckpointFiles("example", image, changes, tmp_path / "deleted.files", devshm)
    result, core = _run(img, tmp_path / "out", None, ConvertOptions(checkpoint=ck))
    assert b"CHANGED" in core and b"IMAGE:lib/base.so" in core and b"SHMSHMS" in core
    for absent in ("changed.so", "gone.so", "link.so"):
        assert f"IMAGE:lib/{absent}".encode() not in core
    assert b"IMAGE:dev/shm/old" not in core
    assert str(SHADOW) not in spy
    assert result.warnings == [
        f"/lib/gone.so: deleted in the container; mapping at {BASE + 4 * PAGE:#x} written as holes",
        "/lib/link.so: not a regular file in the checkpoint's rootfs-diff.tar; mapping at"
        f" {BASE + 12 * PAGE:#x} written as holes",
        "/dev/shm/old: not in the checkpoint's copy of /dev/shm; mapping at"
        f" {BASE + 20 * PAGE:#x} written as holes",
        "/lib/hard-out.so: not a regular file in the checkpoint's rootfs-diff.tar; mapping at"
        f" {BASE + 28 * PAGE:#x} written as holes",
    ]
    assert core.count(b"CHANGED") == 2  # /lib/changed.so and its hard link


def test_live_descriptors_pass_unless_another_library(tmp_path: Path) -> None:
    """``dump``'s descriptors from /proc/PID/map_files are the mapped files themselves: one
    that grew since CRIU's dump is still read (the kernel reads it too), and so is a library
    recorded without build-id; one whose build-id is not the recorded one (a library mapped
    anew in between) gives holes and a warning."""
    libc = _own_libc()
    size = libc.stat().st_size
    words = _build_id_words(libc)
    data = tmp_path / "data"
    data.write_bytes(SECRET + SECRET)  # grown since the dump, which recorded len(SECRET)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    grown = _set(tmp_path / "a", [str(data), str(libc)], [len(SECRET), size])
    other = _set(tmp_path / "b", [str(libc)], [size], build_id=[words[0] ^ 1, *words[1:]])
    data_fd, libc_fd = os.open(data, os.O_RDONLY), os.open(libc, os.O_RDONLY)
    try:
        held = ConvertOptions(mapped_fds={BASE: data_fd, BASE + 4 * PAGE: libc_fd})
        result, core = _run(grown, tmp_path / "out", None, held)
        assert SECRET[:PAGE] in core and libc.read_bytes()[:PAGE] in core
        assert not result.warnings
        held = ConvertOptions(mapped_fds={BASE: libc_fd})
        result, core = _run(other, tmp_path / "out2", None, held)
        assert libc.read_bytes()[:PAGE] not in core
        (warning,) = result.warnings
        assert warning.startswith(f"{libc}: not the file the process mapped (build-id ")
    finally:
        os.close(data_fd)
        os.close(libc_fd)


def test_files_root_of_a_running_container(tmp_path: Path) -> None:
    """``--files-root /proc/PID/root`` reads a live mount namespace's files (here a tmpfs only
    it has), not this host's files of the same names: what the summary line offers for images
    of a container that still runs."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a mount namespace")
    private = tmp_path / "private"
    private.mkdir()
    (private / "data").write_bytes(b"HOST" * (len(SECRET) // 4))  # what the host sees
    script = f"mount -t tmpfs tmpfs {private} && printf %s {SECRET.decode()} > {private}/data"
    proc = procs.popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{script} && echo ok"
         " && exec sleep 60"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert procs.readline(proc.stdout, 30, "the mount namespace's tmpfs") == "ok\n"
        img = _set(tmp_path, [str(private / "data")], mnt_id=106)
        root = Path(f"/proc/{proc.pid}/root")
        result, core = _run(img, tmp_path / "out", root)
        assert SECRET[:PAGE] in core and b"HOSTHOST" not in core
        assert not result.warnings
    finally:
        procs.kill_group(proc)
