"""Golden cases (STYLE.md "Tests" point 3): small image sets in tests/golden/NAME, each with the
summary of the cores it must give, reviewed against the kernel's rules (fs/coredump.c,
fs/binfmt_elf.c); the review notes are in each case.json.

A case holds its images as ``crit decode --pretty`` JSON (re-encoded here with pycriu through
:func:`converters.images.dump_image`), page data as raw ``pages-N.img``, mapped files under
``root/`` and ``expected.json``: per variant (conversion options) and per process, the program
headers, note types in order, NT_FILE, AUXV, PRPSINFO, a digest of each thread's registers and
the sha256 of each segment's bytes. The core is read back with :mod:`struct` alone, not with
the converter's own layout code.

``GOLDEN_UPDATE=1`` rewrites expected.json from the current converter (never in CI): review
the diff against the kernel's rules before committing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from converters import ConvertOptions, convert
from converters.images import dump_image

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("GOLDEN_UPDATE") == "1"

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
NHDR = struct.Struct("<III")
PRSTATUS = struct.Struct("<3ih2xQQ4i8q216si4x")
PRPSINFO = struct.Struct("<bcbb4xQII4i16s80s")
assert (PRSTATUS.size, PRPSINFO.size) == (0x150, 0x88)
NT_NAMES = {1: "PRSTATUS", 2: "PRFPREG", 3: "PRPSINFO", 6: "AUXV", 0x53494749: "SIGINFO",
            0x46494C45: "FILE", 0x202: "X86_XSTATE", 0x205: "X86_XSAVE_LAYOUT"}  # fmt: skip
PT_NAMES = {1: "LOAD", 4: "NOTE"}


def _cases() -> list[str]:
    return sorted(p.name for p in GOLDEN.iterdir() if (p / "case.json").is_file())


def materialize(case: Path, work: Path) -> Path:
    """Re-encode the case's JSON images into *work*; return the images directory."""
    info = json.loads((case / "case.json").read_text())
    for sub in sorted(p for p in case.iterdir() if p.is_dir() and p.name != "root"):
        dst = work / sub.name
        dst.mkdir(parents=True)
        for path in sorted(sub.iterdir()):
            if path.name.endswith(".img.json"):
                dump_image(dst / path.name.removesuffix(".json"), json.loads(path.read_text()))
            else:
                shutil.copyfile(path, dst / path.name)
    for child, parent in info.get("parents", {}).items():
        os.symlink(f"../{parent}", work / child / "parent")
    return work / "img"


def _notes(data: bytes) -> list[tuple[str, int, bytes]]:
    out, pos = [], 0
    while pos + NHDR.size <= len(data):
        namesz, descsz, ntype = NHDR.unpack_from(data, pos)
        pos += NHDR.size
        name = data[pos : pos + namesz].rstrip(b"\0").decode()
        pos += (namesz + 3) & ~3
        out.append((name, ntype, data[pos : pos + descsz]))
        pos += (descsz + 3) & ~3
    return out


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode(errors="replace")


def summarize(core: Path) -> dict[str, Any]:
    """What a golden case pins down about one core file."""
    raw = core.read_bytes()
    e = EHDR.unpack_from(raw)
    assert e[0][:4] == b"\x7fELF" and e[1] == 4, "not an ELF core"
    phoff, phnum = e[5], e[10]
    phdrs, notes = [], []
    for i in range(phnum):
        p_type, p_flags, p_offset, p_vaddr, _, p_filesz, p_memsz, _ = PHDR.unpack_from(
            raw, phoff + i * PHDR.size
        )
        body = raw[p_offset : p_offset + p_filesz]
        if p_type == 4:
            notes = _notes(body)
            continue
        phdrs.append({
            "type": PT_NAMES.get(p_type, p_type), "vaddr": hex(p_vaddr), "memsz": p_memsz,
            "filesz": p_filesz, "flags": "".join(c if p_flags & b else "-"
                                                 for c, b in (("R", 4), ("W", 2), ("X", 1))),
            # a truncated core holds part of a segment: hash what is there, say how much
            "present": len(body), "sha256": hashlib.sha256(body).hexdigest()[:16],
        })  # fmt: skip
    summary: dict[str, Any] = {
        "size": len(raw),
        "segments": phdrs,
        "notes": [f"{name}/{NT_NAMES.get(t, hex(t))}/{len(d)}" for name, t, d in notes],
        "fp_sha256": [hashlib.sha256(d).hexdigest()[:16] for _, t, d in notes if t in (2, 0x202)],
        "threads": [],
    }
    for _, ntype, desc in notes:
        if ntype == 1 and len(desc) == PRSTATUS.size:
            f = PRSTATUS.unpack(desc)
            summary["threads"].append({
                "pid": f[6], "ppid": f[7], "pgrp": f[8], "sid": f[9], "si_signo": f[0],
                "cursig": f[3], "sigpend": hex(f[4]), "sighold": hex(f[5]),
                "rip": hex(struct.unpack_from("<Q", f[18], 16 * 8)[0]),
                "regs_sha256": hashlib.sha256(f[18]).hexdigest()[:16],
            })  # fmt: skip
        elif ntype == 3 and len(desc) == PRPSINFO.size:
            f = PRPSINFO.unpack(desc)
            summary["prpsinfo"] = {
                "state": f[0], "sname": f[1].decode(), "zomb": f[2], "nice": f[3],
                "flag": hex(f[4]), "uid": f[5], "gid": f[6], "pid": f[7], "ppid": f[8],
                "pgrp": f[9], "sid": f[10], "fname": _cstr(f[11]), "psargs": _cstr(f[12]),
            }  # fmt: skip
        elif ntype == 6:
            words = struct.unpack(f"<{len(desc) // 8}Q", desc)
            summary["auxv"] = [[words[i], hex(words[i + 1])] for i in range(0, len(words), 2)]
        elif ntype == 0x46494C45:
            count, page = struct.unpack_from("<QQ", desc)
            ranges = [struct.unpack_from("<QQQ", desc, 16 + 24 * i) for i in range(count)]
            names = desc[16 + 24 * count :].split(b"\0")[:count]
            summary["nt_file"] = {
                "page_size": page,
                "files": [[hex(s), hex(t), pg, n.decode(errors="replace")]
                          for (s, t, pg), n in zip(ranges, names, strict=True)],
            }  # fmt: skip
    return summary


def run_variant(img: Path, case: Path, options: dict[str, Any], out: Path) -> dict[str, Any]:
    info = json.loads((case / "case.json").read_text())
    root = case / info["files_root"] if "files_root" in info else out.parent / "empty-root"
    root.mkdir(exist_ok=True)
    out.mkdir()
    results = convert(img, out, ConvertOptions(files_root=root, **options))
    per_pid: dict[str, Any] = {}
    for r in results:
        entry: dict[str, Any] = {"truncated": r.truncated, "warnings": sorted(r.warnings)}
        if r.path is None:
            entry["core"] = None
        else:
            entry["core"] = summarize(r.path)
        per_pid[str(r.pid)] = entry
    return per_pid


@pytest.mark.parametrize("name", _cases())
def test_golden(name: str, tmp_path: Path) -> None:
    case = GOLDEN / name
    info = json.loads((case / "case.json").read_text())
    img = materialize(case, tmp_path / "images")
    got = {
        variant: run_variant(img, case, options, tmp_path / f"out-{variant}")
        for variant, options in info["variants"].items()
    }
    expected_path = case / "expected.json"
    if UPDATE:
        expected_path.write_text(json.dumps(got, indent=1) + "\n")
        pytest.skip(f"GOLDEN_UPDATE: wrote {expected_path}; review it against the kernel's rules")
    assert expected_path.exists(), f"{expected_path}: run with GOLDEN_UPDATE=1, then review"
    expected = json.loads(expected_path.read_text())
    assert sorted(got) == sorted(expected)
    for variant in expected:
        assert got[variant] == expected[variant], f"{name}/{variant} differs from expected.json"
