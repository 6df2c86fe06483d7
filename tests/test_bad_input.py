"""Bad input (issue 3, "Bad input"): each case gives one ConversionError naming the file and the
problem, leaves no output file behind, and through the CLI one ``error:`` line and a non-zero
exit without a traceback."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import images
import pytest
from click.testing import CliRunner

from converters import ConvertOptions, convert
from converters.errors import (
    ConversionError,
    ImageFormatError,
    MissingImageError,
    UnsupportedArchError,
)

Breaker = Callable[[Path], None]


def _truncate(name: str, keep: int | None = None) -> Breaker:
    def go(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: (len(data) // 2 if keep is None else keep)])

    return go


def _overwrite(name: str, at: int, data: bytes) -> Breaker:
    def go(d: Path) -> None:
        raw = bytearray((d / name).read_bytes())
        raw[at : at + len(data)] = data
        (d / name).write_bytes(bytes(raw))

    return go


def _wrong_magic(name: str, other: str) -> Breaker:
    def go(d: Path) -> None:
        (d / name).write_bytes((d / other).read_bytes())

    return go


def _delete(name: str) -> Breaker:
    def go(d: Path) -> None:
        (d / name).unlink()

    return go


def _mtype(mtype: str) -> Breaker:
    def go(d: Path) -> None:
        proc = images.Proc(100, mtype=mtype)
        images.write_image(d / "core-100.img", "CORE", [images.core_entry(proc, 100, 0)])

    return go


def _page_size(size: int) -> Breaker:
    """mm-100.img saved by a kernel with *size*-byte pages (AT_PAGESZ)."""

    def go(d: Path) -> None:
        base = 0x1000_0000
        proc = images.Proc(
            100, vmas=[images.vma(base, base + 4 * images.PAGE)], auxv=[6, size, 0, 0]
        )
        images.build(d, [proc])

    return go


def _ghost(chunks: list[tuple[int, int]] | None, *, cut: int | None = None) -> Breaker:
    """Replace the image set by one mapping a deleted 4-page file whose ghost-file image
    holds *chunks* of ``(offset, length)`` (each written with the bytes that exist), cut to
    *cut* bytes."""

    def go(d: Path) -> None:
        page = images.PAGE
        content = bytes(range(256)) * (4 * page // 256)
        proc = images.Proc(100, vmas=[images.file_vma(0x10000, 0x10000 + 4 * page, 5)])
        images.build(d, [proc], files=[images.reg_file(5, "/gone.so", len(content))])
        images.remap_ghost(d, (5, 1))
        ghost = d / "ghost-file-1.img"
        images.ghost_image(ghost, content, chunks=chunks)
        if cut is not None:
            ghost.write_bytes(ghost.read_bytes()[:cut])

    return go


def _ghost_missing(d: Path) -> None:
    _ghost(None)(d)
    (d / "ghost-file-1.img").unlink()


# (breaker, file named in the message, words of the problem, error class)
CASES: dict[str, tuple[Breaker, str, str, type[ConversionError]]] = {
    "truncated mm": (_truncate("mm-100.img"), "mm-100.img", "past the end", ImageFormatError),
    "truncated magic": (_truncate("pstree.img", 2), "pstree.img", "truncated", ImageFormatError),
    "truncated entry header": (
        _truncate("core-100.img", 10),
        "core-100.img",
        "truncated entry header",
        ImageFormatError,
    ),
    "corrupt core": (
        _overwrite("core-100.img", 12, b"\xff" * 64),
        "core-100.img",
        "corrupt",
        ImageFormatError,
    ),
    "entry size absurd": (
        _overwrite("mm-100.img", 8, struct.pack("<I", 0xFFFFFFF0)),
        "mm-100.img",
        "past the end",
        ImageFormatError,
    ),
    "wrong magic": (
        _wrong_magic("pstree.img", "mm-100.img"),
        "pstree.img",
        "wrong magic MM, expected PSTREE",
        ImageFormatError,
    ),
    "unknown magic": (
        _overwrite("pagemap-100.img", 4, b"\x01\x02\x03\x04"),
        "pagemap-100.img",
        "wrong magic 0x04030201",
        ImageFormatError,
    ),
    "missing pages file": (
        _delete("pages-100.img"),
        "pages-100.img",
        "missing image",
        MissingImageError,
    ),
    "missing pstree": (_delete("pstree.img"), "pstree.img", "missing image", MissingImageError),
    "missing core": (_delete("core-100.img"), "core-100.img", "missing image", MissingImageError),
    "missing mm": (_delete("mm-100.img"), "mm-100.img", "missing image", MissingImageError),
    "missing pagemap": (
        _delete("pagemap-100.img"),
        "pagemap-100.img",
        "missing image",
        MissingImageError,
    ),
    "other architecture": (_mtype("PPC64"), "core-100.img", "PPC64", UnsupportedArchError),
    "aarch64 without registers": (
        _mtype("AARCH64"),
        "core-100.img",
        "no ti_aarch64",
        ImageFormatError,
    ),
    "64 KiB pages": (_page_size(65536), "mm-100.img", "page size 65536", ImageFormatError),
    "pagemap past the pages file": (
        _truncate("pages-100.img", images.PAGE),
        "pagemap-100.img",
        "points past the end of pages-100.img",
        ImageFormatError,
    ),
    "empty pstree": (_truncate("pstree.img", 8), "pstree.img", "no process", ImageFormatError),
    "ghost image missing": (
        _ghost_missing,
        "ghost-file-1.img",
        "missing image",
        MissingImageError,
    ),
    "ghost entry truncated": (
        _ghost(None, cut=14),
        "ghost-file-1.img",
        "ghost file entry claims",
        ImageFormatError,
    ),
    "ghost chunk past the image": (
        _ghost([(0, images.PAGE), (3 * images.PAGE, 2 * images.PAGE)]),
        "ghost-file-1.img",
        "is out of place",
        ImageFormatError,
    ),
    "ghost chunks overlapping": (
        _ghost([(0, 2 * images.PAGE), (images.PAGE, images.PAGE)]),
        "ghost-file-1.img",
        "is out of place",
        ImageFormatError,
    ),
}


@pytest.fixture
def broken(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str, str, type]:
    breaker, culprit, problem, cls = CASES[request.param]
    img = images.simple(tmp_path / "img")
    breaker(img)
    return img, culprit, problem, cls


@pytest.mark.parametrize("broken", sorted(CASES), indirect=True)
def test_library_error(broken: tuple[Path, str, str, type], tmp_path: Path) -> None:
    img, culprit, problem, cls = broken
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError) as exc:
        convert(img, out, ConvertOptions())
    msg = str(exc.value)
    assert type(exc.value) is cls, msg
    assert culprit in msg and problem in msg, msg
    assert "\n" not in msg
    assert list(out.iterdir()) == []  # no core, no temporary file


@pytest.mark.parametrize("broken", sorted(CASES), indirect=True)
def test_cli_error(broken: tuple[Path, str, str, type], tmp_path: Path) -> None:
    from criu_livedump.cli import cli

    img, culprit, problem, _ = broken
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(img), "-o", str(out)])
    assert result.exit_code not in (0, 1), result.output  # 1 would be an uncaught exception
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and culprit in lines[0] and problem in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists() or list(out.iterdir()) == []


def test_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(MissingImageError, match="file"):
        convert(tmp_path / "file", tmp_path, ConvertOptions())


def test_image_is_a_directory(tmp_path: Path) -> None:
    img = images.simple(tmp_path / "img")
    (img / "mm-100.img").unlink()
    (img / "mm-100.img").mkdir()
    with pytest.raises(ImageFormatError, match=r"mm-100\.img: is a directory"):
        convert(img, tmp_path, ConvertOptions())


@pytest.mark.parametrize("field", ["pid", "ppid", "pgid", "sid"])
def test_pid_out_of_range(tmp_path: Path, field: str) -> None:
    """Regression (fuzz): a pstree id above INT_MAX crashed packing NT_PRSTATUS."""
    proc = images.Proc(100, pgid=100, sid=100)
    img = images.build(tmp_path / "img", [proc])
    entry = {"pid": 100, "ppid": 1, "pgid": 100, "sid": 100, "threads": [100]}
    entry[field] = 0xFFFFFFFF
    images.write_image(img / "pstree.img", "PSTREE", [entry])
    with pytest.raises(ImageFormatError, match=rf"pstree\.img: {field} 4294967295 out of range"):
        convert(img, tmp_path, ConvertOptions())
