"""gdb's view of a core: backtraces of every thread, the LWPs it lists, what it warns about."""

from __future__ import annotations

import os
import re

import procs

_ENV = {"LC_ALL": "C", "TERM": "dumb", "DEBUGINFOD_URLS": ""}


def _gdb(
    command: str,
    binary: str | os.PathLike[str],
    core: str | os.PathLike[str],
    *,
    gdb: str = "gdb",
    sysroot: str | os.PathLike[str] | None = None,
) -> tuple[str, str]:
    """*command* on *core* of *binary*; *gdb* another gdb (gdb-multiarch for a foreign core)
    reading shared libraries under *sysroot*."""
    where = ["-ex", f"set sysroot {os.fspath(sysroot)}"] if sysroot is not None else []
    proc = procs.run(
        [gdb, "-batch", "-nx", "-ex", "set pagination off", *where, "-ex", command,
         os.fspath(binary), os.fspath(core)],
        text=True,
        env={**os.environ, **_ENV},
    )  # fmt: skip
    return proc.stdout, proc.stderr


def run_gdb(binary: str | os.PathLike[str], core: str | os.PathLike[str]) -> tuple[str, str]:
    """(stdout, stderr) of ``gdb -batch -nx ... 'thread apply all bt' BINARY CORE``."""
    return _gdb("thread apply all bt", binary, core)


def gdb_lwps(binary: str | os.PathLike[str], core: str | os.PathLike[str]) -> set[int]:
    """The thread ids gdb's ``info threads`` lists for *core*."""
    out = _gdb("info threads", binary, core)[0]
    return {int(x) for x in re.findall(r"\(LWP (\d+)\)", out)}


_THREAD_HEAD = re.compile(r"^Thread \d+ (\(.*\(LWP (\d+)\).*)$")
_NEW_LWP = re.compile(r"^\[New LWP \d+\]$")


def normalise_backtraces(stdout: str) -> str:
    """gdb output made independent of thread order, everything else kept.

    The kernel lists the dumping thread first and the others in the order they reached
    coredump_task_exit(); the converter lists them by tid. So the ``[New LWP n]`` lines are
    dropped and the per-thread blocks are sorted by LWP with gdb's thread number removed.
    """
    head: list[str] = []
    blocks: list[tuple[int, list[str]]] = []
    for line in stdout.splitlines():
        if _NEW_LWP.match(line):
            continue
        m = _THREAD_HEAD.match(line)
        if m:
            blocks.append((int(m.group(2)), [f"Thread {m.group(1)}"]))
        elif blocks:
            blocks[-1][1].append(line)
        else:
            head.append(line)
    # Blank lines separate gdb's blocks; where they fall depends on the order, so re-separate.
    parts = ["\n".join(head).strip()]
    parts += ["\n".join(block).strip() for _, block in sorted(blocks)]
    return "\n\n".join(parts) + "\n"


def gdb_backtraces(
    binary: str | os.PathLike[str],
    core: str | os.PathLike[str],
    *,
    gdb: str = "gdb",
    sysroot: str | os.PathLike[str] | None = None,
) -> str:
    """``thread apply all bt`` of *core*, normalised by :func:`normalise_backtraces`."""
    out = _gdb("thread apply all bt", binary, core, gdb=gdb, sysroot=sysroot)[0]
    return normalise_backtraces(out)


def gdb_warnings(binary: str | os.PathLike[str], core: str | os.PathLike[str]) -> list[str]:
    """What gdb complains about while loading *core*: stderr lines and ``warning:`` lines."""
    stdout, stderr = run_gdb(binary, core)
    lines = [line for line in stderr.splitlines() if line.strip()]
    lines += [line for line in stdout.splitlines() if line.lower().startswith("warning:")]
    return lines
