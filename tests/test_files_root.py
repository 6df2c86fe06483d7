"""--files-root (issue 3 "Interface", issue 7 "Hostile input"): images naming /etc/shadow,
/dev/sda, /proc/kcore, a FIFO, a symlink out of the root. Nothing outside the root is read, no
device or special file is opened, and the warnings name the mappings that became holes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import images
import pytest

from converters import ConvertOptions, convert
from converters.options import CoreResult

PAGE = images.PAGE
BASE = 0x2000_0000
SECRET = b"TOP-SECRET-" * 400


def _set(tmp_path: Path, names: list[str]) -> Path:
    """One private file mapping (whole, under coredump_filter 0x3f) per name."""
    vmas = [
        images.file_vma(BASE + 4 * i * PAGE, BASE + (4 * i + 1) * PAGE, file_id=10 + i)
        for i in range(len(names))
    ]
    files = [images.reg_file(10 + i, n, len(SECRET)) for i, n in enumerate(names)]
    return images.build(tmp_path / "img", [images.Proc(100, vmas=vmas)], files=files)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path the converter passes to os.open()."""
    opened: list[str] = []
    real_open = os.open

    def record(path: object, *args: object, **kwargs: object) -> int:
        opened.append(os.fsdecode(path))  # type: ignore[arg-type]
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", record)
    return opened


def _run(img: Path, out: Path, root: Path) -> tuple[CoreResult, bytes]:
    out.mkdir()
    (result,) = convert(img, out, ConvertOptions(files_root=root, coredump_filter=0x3F))
    assert result.path is not None
    return result, result.path.read_bytes()


def test_escapes_are_refused(tmp_path: Path, spy: list[str]) -> None:
    root = tmp_path / "root"
    (root / "lib").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    (root / "lib" / "ok.so").write_bytes(b"\x7fELF" + bytes(PAGE))
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
    """With --files-root / (the default), device nodes and pseudo-filesystem files such as
    /proc/kcore and /proc/self/mem are still never opened; /etc/shadow is a regular file
    and is read only because the root allows it (use --files-root for foreign images)."""
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
    assert "/lib/short.so: size changed since the dump" in warned
