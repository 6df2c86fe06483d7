"""Compile the C test programs in this directory into ``bin/`` (``gcc -O1 -g -pthread``).

A binary is rebuilt only when its source is newer; the compiler writes a temporary file that is
renamed into place, so concurrent test sessions never run a half-written binary.

Usage: ``python tests/programs/build.py [NAME...]`` (default: every ``*.c``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
BIN_DIR = SOURCE_DIR / "bin"
CFLAGS = ["-O1", "-g", "-pthread", "-Wall", "-Wextra"]


class BuildError(Exception):
    """gcc failed on a test program; the message carries gcc's output."""


def sources() -> list[Path]:
    """Every C test program, sorted by name."""
    return sorted(SOURCE_DIR.glob("*.c"))


def build(name: str) -> Path:
    """Return the path of the built program *name* (``mappings``, ``mappings.c``, or
    ``blockers/io_uring`` for a program in a subdirectory, built into the same one under bin/).

    :raises BuildError: the source is missing or gcc failed.
    """
    stem = name.removesuffix(".c")
    src = SOURCE_DIR / f"{stem}.c"
    if not src.is_file():
        raise BuildError(f"{src}: no such test program")
    out = BIN_DIR / stem
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    proc = subprocess.run(
        ["gcc", *CFLAGS, "-o", str(tmp), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{src.name}: gcc failed:\n{proc.stderr}")
    os.replace(tmp, out)
    return out


def build_all() -> dict[str, Path]:
    """Build every program; return ``{stem: binary path}``."""
    return {src.stem: build(src.stem) for src in sources()}


if __name__ == "__main__":
    names = sys.argv[1:] or [src.stem for src in sources()]
    for n in names:
        print(build(n))
