"""converters.sidecar: livedump.json's one writer and reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from converters.errors import ImageFormatError
from converters.sidecar import SIDECAR_NAME, VERSION, DontFork, Sidecar, read_sidecar, write_sidecar

FULL = Sidecar(
    coredump_filter=0x33,
    core_limit=-1,
    signal=6,
    ppid=1,
    boot_id="8c2e7d0c-0000-4000-8000-000000000000",
    thread_times={10: (1, 2), 11: (3, 4)},
    children_times=(5, 6),
    cpu_layout={"xcr0": 7, "components": [[2, 576, 256]]},
    sysv_keys={3: 0xABCD},
    no_saved_pages=((0x1000, 0x2000),),
    dontfork=(DontFork(0x3000, 0x5000, "rw-p", False),),
    wipeonfork=((0x6000, 0x7000),),
)


def test_round_trip(tmp_path: Path) -> None:
    write_sidecar(tmp_path, FULL)
    assert json.loads((tmp_path / SIDECAR_NAME).read_text())["version"] == VERSION
    assert read_sidecar(tmp_path) == FULL
    assert [p.name for p in tmp_path.iterdir()] == [SIDECAR_NAME]
    assert FULL.times(11) == (3, 4, 5, 6) and FULL.times(99) == (0, 0, 5, 6)


def test_absent_file_is_empty(tmp_path: Path) -> None:
    assert read_sidecar(tmp_path) == Sidecar()


def test_version_1_files_still_read(tmp_path: Path) -> None:
    """Files written before version 2: ``pid`` (never read) is ignored,
    ``xsave_layout`` is the cpu layout, ``dontfork`` entries may lack has_bytes."""
    v1 = {
        "coredump_filter": 0x33,
        "core_limit": -1,
        "signal": 6,
        "pid": 10,
        "boot_id": "8c2e7d0c-0000-4000-8000-000000000000",
        "ppid": 1,
        "times": {"10": [1, 2], "11": [3, 4], "children": [5, 6]},
        "xsave_layout": {"xcr0": 7, "components": [[2, 576, 256]]},
        "sysv_keys": {"3": 0xABCD},
        "no_saved_pages": [[0x1000, 0x2000]],
        "dontfork": [[0x3000, 0x5000, "rw-p", False], [0x8000, 0x9000, "r--p"]],
        "wipeonfork": [[0x6000, 0x7000]],
        "something_else": 1,
    }
    (tmp_path / SIDECAR_NAME).write_text(json.dumps(v1))
    read = read_sidecar(tmp_path)
    assert read.dontfork[1] == DontFork(0x8000, 0x9000, "r--p", True)
    assert read == Sidecar(
        **{**FULL.__dict__, "dontfork": (*FULL.dontfork, DontFork(0x8000, 0x9000, "r--p"))}
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"version": 3}, "version 3 is not supported (this converter reads 1 and 2)"),
        ({"version": "2"}, "version '2' is not supported (this converter reads 1 and 2)"),
        ({"version": 2, "pid": 1}, "unknown field 'pid' in version 2"),
        ({"signal": 65}, "signal 65 out of range"),
        ({"ppid": 1 << 40}, f"ppid {1 << 40} out of range"),
        ({"coredump_filter": "0x33"}, "coredump_filter is not an integer"),
        ({"core_limit": True}, "core_limit is not an integer"),
        ({"times": {"10": [1]}}, "times['10'] is not an array of 2"),
        ({"times": {"x": [1, 2]}}, "times['x'] is not a thread id"),
        ({"no_saved_pages": [[1, -2]]}, "no_saved_pages[0] -2 out of range"),
        ({"dontfork": [[1, 2]]}, "dontfork[0] is not [start, end, perms] or [start, end, perms,"),
        ({"sysv_keys": {"a": 1}}, "sysv_keys['a'] is not a shmid"),
        ({"cpu_layout": [1]}, "cpu_layout is not an object"),
        ({"boot_id": 1}, "boot_id is not a string"),
    ],
)
def test_bad_field_names_file_and_field(
    tmp_path: Path, content: dict[str, object], message: str
) -> None:
    path = tmp_path / SIDECAR_NAME
    path.write_text(json.dumps(content))
    with pytest.raises(ImageFormatError) as e:
        read_sidecar(tmp_path)
    assert str(e.value).startswith(f"{path}: {message}")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [(b"[1]", "not a JSON object"), (b"{", "not JSON: "), (b"\xff", "not UTF-8 text")],
)
def test_not_a_sidecar(tmp_path: Path, raw: bytes, message: str) -> None:
    (tmp_path / SIDECAR_NAME).write_bytes(raw)
    with pytest.raises(ImageFormatError, match=message):
        read_sidecar(tmp_path)
