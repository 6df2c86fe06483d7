"""Checkpoint archives (issue 7, "Hostile input"): tar, tar.gz, tar.zst of an image directory,
at the top or under checkpoint/, extracted privately; hostile entries refused."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import images
import pytest

from converters import ConvertOptions, convert
from converters.archive import MAX_META_BYTES, is_archive, open_images
from converters.errors import ArchiveError, ConversionError


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    return images.simple(tmp_path / "imgs")


def _pack(src: Path, archive: Path, prefix: str = "") -> Path:
    """tar *src*'s files under *prefix* with the system tar-compatible tarfile writer."""
    mode = "w:gz" if archive.name.endswith(".gz") else "w"
    plain = (
        archive.with_name(archive.name.removesuffix(".zst"))
        if archive.suffix == ".zst"
        else archive
    )
    with tarfile.open(plain, mode) as tf:
        for f in sorted(src.iterdir()):
            tf.add(f, arcname=prefix + f.name)
    if archive.suffix == ".zst":
        subprocess.run(["zstd", "-q", "--rm", "-o", str(archive), str(plain)], check=True)
    return archive


@pytest.mark.parametrize("name", ["c.tar", "c.tar.gz", "c.tar.zst"])
@pytest.mark.parametrize("prefix", ["", "checkpoint/", "./", "topdir/", "topdir/checkpoint/"])
def test_archive_converts_like_directory(
    tmp_path: Path, image_dir: Path, name: str, prefix: str
) -> None:
    archive = _pack(image_dir, tmp_path / name, prefix)
    assert is_archive(archive)
    ref, got = tmp_path / "ref", tmp_path / "got"
    ref.mkdir()
    got.mkdir()
    convert(image_dir, ref, ConvertOptions())
    with open_images(archive, tmp_dir=tmp_path) as d:
        assert d != image_dir
        # the private extraction directory is 0700 and ours
        work = next(p for p in tmp_path.iterdir() if p.name.startswith("criu-livedump-archive-"))
        assert stat.S_IMODE(work.stat().st_mode) == 0o700
        convert(d, got, ConvertOptions())
    assert (got / "core.100").read_bytes() == (ref / "core.100").read_bytes()
    assert not any(p.name.startswith("criu-livedump-archive-") for p in tmp_path.iterdir())


def test_directory_passes_through(image_dir: Path) -> None:
    with open_images(image_dir) as d:
        assert d == image_dir
    assert (image_dir / "pstree.img").exists()


def _hostile(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("pstree.img")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"\0\0\0\0"))
        member.size = len(data) if member.isreg() else 0
        tf.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return archive


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("member", "problem"),
    [
        (_member("/tmp/abs-escape"), "absolute path"),
        (_member("../escape"), "'..'"),
        (_member("checkpoint/../../escape"), "'..'"),
        (_member("link", tarfile.SYMTYPE, "/etc/shadow"), "symbolic link"),
        (_member("link", tarfile.SYMTYPE, "../outside"), "symbolic link"),
        (_member("hard", tarfile.LNKTYPE, "pstree.img"), "hard link"),
        (_member("sda", tarfile.BLKTYPE), "block device"),
        (_member("null", tarfile.CHRTYPE), "character device"),
        (_member("fifo", tarfile.FIFOTYPE), "FIFO"),
        (_member("pstree.img"), "appears twice"),
        (_member("pstree.img/x"), "file of the same name"),
    ],
)
def test_hostile_entries_refused(tmp_path: Path, member: tarfile.TarInfo, problem: str) -> None:
    archive = _hostile(tmp_path, member, b"owned")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ArchiveError) as exc, open_images(archive, tmp_dir=tmp_path):
        pytest.fail("a hostile archive was opened")
    msg = str(exc.value)
    assert str(archive) in msg and problem in msg and member.name.split("/")[-1] in msg
    # nothing was written next to the archive (or anywhere outside the removed private dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not Path("/tmp/abs-escape").exists()
    assert isinstance(exc.value, ConversionError)


def test_size_bound(tmp_path: Path, image_dir: Path) -> None:
    archive = _pack(image_dir, tmp_path / "c.tar.gz")
    with (
        pytest.raises(ArchiveError, match="expands to more than 1000 bytes"),
        open_images(archive, tmp_dir=tmp_path, max_bytes=1000),
    ):
        pass
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("criu-")] == []


def test_gzip_bomb_bounded(tmp_path: Path) -> None:
    """A 1 GiB entry of zeros compresses to about a megabyte; the bound stops it unread."""
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("pages-1.img")
        info.size = 1 << 30

        class Zeros(io.RawIOBase):
            left = 1 << 30

            def read(self, n: int = -1) -> bytes:
                n = min(self.left, 1 << 20 if n < 0 else n)
                self.left -= n
                return bytes(n)

        tf.addfile(info, Zeros())
    with (
        pytest.raises(ArchiveError, match="expands to more than"),
        open_images(archive, tmp_dir=tmp_path, max_bytes=64 << 20),
    ):
        pass


def test_huge_pax_header_refused(tmp_path: Path) -> None:
    archive = tmp_path / "pax.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("pstree.img")
        info.pax_headers = {"comment": "x" * (MAX_META_BYTES + 10)}
        tf.addfile(info, io.BytesIO(b""))
    with (
        pytest.raises(ArchiveError, match="metadata header"),
        open_images(archive, tmp_dir=tmp_path),
    ):
        pass


def test_too_many_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("converters.archive.MAX_ENTRIES", 5)
    archive = tmp_path / "many.tar"
    with tarfile.open(archive, "w") as tf:
        for i in range(10):
            tf.addfile(tarfile.TarInfo(f"f{i}"), io.BytesIO(b""))
    with (
        pytest.raises(ArchiveError, match="more than 5 entries"),
        open_images(archive, tmp_dir=tmp_path),
    ):
        pass


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x1f\x8b\x08\x00" + b"garbage" * 50, "corrupt|not a readable"),
        (b"\x28\xb5\x2f\xfd" + b"garbage" * 50, "zstd failed"),
        (b"x" * 1024, "not a readable tar"),
        (b"", "not a readable tar|empty"),
    ],
)
def test_corrupt_archives(tmp_path: Path, content: bytes, problem: str) -> None:
    archive = tmp_path / "bad.tar"
    archive.write_bytes(content)
    with pytest.raises(ArchiveError, match=problem), open_images(archive, tmp_dir=tmp_path):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["bad.tar"]


def test_truncated_archive(tmp_path: Path, image_dir: Path) -> None:
    archive = _pack(image_dir, tmp_path / "c.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError), open_images(archive, tmp_dir=tmp_path):
        pass


def test_archive_without_images(tmp_path: Path) -> None:
    archive = tmp_path / "none.tar"
    with tarfile.open(archive, "w") as tf:
        tf.addfile(tarfile.TarInfo("config.dump"), io.BytesIO(b""))
    with (
        pytest.raises(ArchiveError, match=r"no CRIU images \(pstree.img\)"),
        open_images(archive, tmp_dir=tmp_path),
    ):
        pass


def test_not_a_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ArchiveError, match="neither"), open_images(tmp_path / "fifo"):
        pass


def test_removed_even_when_the_body_fails(tmp_path: Path, image_dir: Path) -> None:
    archive = _pack(image_dir, tmp_path / "c.tar")
    with pytest.raises(RuntimeError), open_images(archive, tmp_dir=tmp_path) as d:
        assert (d / "pstree.img").exists()
        raise RuntimeError("boom")
    assert not any(p.name.startswith("criu-livedump-archive-") for p in tmp_path.iterdir())
    shutil.rmtree(image_dir)


def _cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    exe = Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin" / "criu-livedump"
    if not exe.exists():
        exe = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "criu-livedump"
    return subprocess.run([str(exe), *args], capture_output=True, check=False)


def test_cli_converts_archives(tmp_path: Path, image_dir: Path) -> None:
    archive = _pack(image_dir, tmp_path / "c.tar.zst", "checkpoint/")
    proc = _cli("convert", str(archive), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr.decode()
    ref = tmp_path / "ref"
    ref.mkdir()
    convert(image_dir, ref, ConvertOptions())
    assert (tmp_path / "out" / "core.100").read_bytes() == (ref / "core.100").read_bytes()


def test_cli_refuses_hostile_archive(tmp_path: Path) -> None:
    archive = _hostile(tmp_path, _member("checkpoint/evil", tarfile.SYMTYPE, "/etc/shadow"))
    proc = _cli("convert", str(archive), "-o", str(tmp_path / "out"))
    assert proc.returncode != 0
    (line,) = proc.stderr.decode().splitlines()
    assert line.startswith(f"error: {archive}: entry 'checkpoint/evil'")
    assert not list((tmp_path / "out").glob("core.*"))
