"""Kernel-comparison cases as data: one :class:`KernelCase` per row, run by :func:`run_case`.

A case says which program runs with which arguments, how it is started (:class:`Launcher`), how
our core is taken (:class:`Dumper`), what is done to it before the dumps, and what the
comparison tolerates (:class:`harness.compare.Tolerances`). Nothing depends on a case's name.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest
from programs import build as programs_build
from syslock import core_pattern, hugepages

from harness.compare import Tolerances
from harness.criu import criu_dump
from harness.kernel import CorePipe, kernel_core
from harness.launcher import Target, start_target
from harness.procstate import MapEntry, RseqArea

PAGE = os.sysconf("SC_PAGE_SIZE")
#: in :attr:`KernelCase.args`: the path of a fresh data file of 32 pages (see :func:`data_file`)
DATA = "DATA"


class Launcher(Protocol):
    """How a case's program is started; the target must be ready to dump when this returns
    (every thread in its blocking call: ``start_target(..., settle=True)``)."""

    def start(self, binary: Path, argv: list[str], tmp: Path) -> Target: ...


class Dumper(Protocol):
    """How our core of a running target is taken (the target keeps running)."""

    def dump(self, pid: int, tmp: Path) -> Path:
        """Our core of *pid*, somewhere under *tmp*."""
        ...


@dataclass(frozen=True)
class Direct:
    """The program started directly by the harness."""

    def start(self, binary: Path, argv: list[str], tmp: Path) -> Target:
        return start_target(binary, *argv, settle=True)


@dataclass(frozen=True)
class MountNamespace:
    """The program in a mount namespace of its own, its data file (argv[0]) moved to a tmpfs
    mounted there only: the name the images record leads nowhere from the harness's view."""

    def start(self, binary: Path, argv: list[str], tmp: Path) -> Target:
        private = tmp / "private"
        private.mkdir()
        script = (
            f"mount -t tmpfs -o size=1m tmpfs {private} && cp {argv[0]} {private}/data && "
            f'exec {binary} {private}/data "$@"'
        )
        return start_target(
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            *argv[1:],
            settle=True,
        )


def has_method(name: str) -> bool:
    """Whether the product has a ``--method`` *name* (its row in ``snapshot.METHODS``)."""
    from criu_livedump.snapshot import METHODS

    return any(m.value == name for m in METHODS)


def require_method(name: str) -> None:
    """Skip, naming the missing row, where the product has no ``--method`` *name* yet."""
    if not has_method(name):
        pytest.skip(f"--method {name}: no row in criu_livedump.snapshot.METHODS")


def _require_criu(criu: str | None) -> None:
    """Skip the case when it names a CRIU (another release) that is not installed here."""
    if criu is not None and not os.access(criu, os.X_OK):
        pytest.skip(f"{criu}: no such CRIU here")


@dataclass(frozen=True)
class CriuAndConvert:
    """``criu dump --leave-running`` driven by the harness, then :func:`converters.convert`."""

    #: the dumping CRIU (None: :func:`harness.criu.criu_binary`)
    criu: str | None = None

    def dump(self, pid: int, tmp: Path) -> Path:
        import converters
        from converters.options import ConvertOptions

        _require_criu(self.criu)
        images = criu_dump(pid, tmp / "images", criu=self.criu)
        (tmp / "ours").mkdir()
        results = converters.convert(images, tmp / "ours", ConvertOptions(signal=signal.SIGABRT))
        assert [r.pid for r in results] == [pid]
        assert results[0].path is not None
        return results[0].path


@dataclass(frozen=True)
class LiveDump:
    """The product's ``dump`` (:func:`criu_livedump.dump.live_dump`) with one ``--method``."""

    method: str
    #: the CRIU the product runs (None: its default)
    criu: str | None = None
    #: no ``-o``: the core goes where core_pattern sends it, set for the dump to a
    #: ``|HANDLER %P`` pipe (:class:`harness.kernel.CorePipe`) that writes it to a file, as a
    #: host's crash collector does
    to_handler: bool = False
    #: how the pages must reach the core (the report's ``capture``): "stream" or "images";
    #: None: either
    capture: str | None = None

    def dump(self, pid: int, tmp: Path) -> Path:
        from criu_livedump.dump import live_dump
        from criu_livedump.request import build_request

        require_method(self.method)
        _require_criu(self.criu)
        if self.to_handler:
            return self._dump_to_handler(pid, tmp)
        out = tmp / "ours" / f"core.{pid}"
        out.parent.mkdir()
        request = build_request(
            output=str(out), signal=int(signal.SIGABRT), core_limit="unlimited", method=self.method
        )
        report = live_dump(pid, request, criu_path=self.criu)
        assert report.method == self.method
        assert self.capture in (None, report.capture), (report.capture, report.capture_reason)
        assert (report.capture == "stream") == (not report.capture_reason)
        assert report.core_path is not None and Path(report.core_path) == out
        return out

    def _dump_to_handler(self, pid: int, tmp: Path) -> Path:
        from criu_livedump.dump import live_dump
        from criu_livedump.request import build_request

        pipe = CorePipe(tmp / "ours")
        request = build_request(
            signal=int(signal.SIGABRT), core_limit="unlimited", method=self.method
        )
        pattern = pipe.pattern()
        with core_pattern(pattern):
            report = live_dump(pid, request, criu_path=self.criu)
        assert report.method == self.method
        assert report.destination == pattern.replace("%P", str(pid)), report.destination
        assert report.handler_status == 0 and report.core_path is None
        assert report.capture == "images", "a pipe cannot take a stream"
        return pipe.collect(pid)


@dataclass(frozen=True)
class PrecopyEveryArea(LiveDump):
    """``dump --method precopy`` with every private anonymous area of one resident page or
    more pre-copied (the method's ``MIN_AREA`` lowered for this dump): the small targets of the
    comparisons then reach the core through the rounds, the copy inside the freeze and
    MADV_DONTFORK around the clone, not through the fork (and ``report.method`` says precopy,
    not a fallback to clone's way)."""

    method: str = "precopy"

    def dump(self, pid: int, tmp: Path) -> Path:
        import importlib
        from unittest import mock

        require_method(self.method)
        method = importlib.import_module("criu_livedump.snapshot.precopy.method")
        with mock.patch.object(method, "MIN_AREA", PAGE):
            return super().dump(pid, tmp)


@dataclass(frozen=True)
class KernelCase:
    """One target dumped twice: ours (:attr:`dumper`) and the kernel's (SIGABRT)."""

    name: str
    #: a tests/programs stem, or ``blockers/NAME`` for tests/programs/blockers/NAME.c
    program: str
    #: its arguments; :data:`DATA` stands for a fresh data file (:func:`data_file`)
    args: tuple[str, ...] = ()
    #: written to /proc/PID/coredump_filter before the dumps (None: the default, 0x33)
    coredump_filter: int | None = None
    dumper: Dumper = field(default_factory=CriuAndConvert)
    launcher: Launcher = field(default_factory=Direct)
    #: replace the data file on disk after the start, as an upgrade replaces a library: the
    #: kernel reads the mapped (now deleted) inode, not what the name leads to now
    replace_data: bool = False
    #: default-size huge pages reserved for the whole case (skipped if the kernel has not them)
    hugepages: int = 0
    tolerances: Tolerances = field(default_factory=Tolerances)
    #: every thread blocked in a syscall: every general register compared, volatile ones too
    #: (:func:`harness.compare.register_diffs`)
    every_register: bool = False


@dataclass(frozen=True)
class CaseRun:
    """What :func:`run_case` produced: both cores and what was observed before the dumps."""

    case: KernelCase
    binary: Path
    pid: int
    ours: Path
    kernel: Path
    #: /proc/PID/maps just before the kernel's dump
    maps: list[MapEntry]
    rseq: dict[int, RseqArea]
    #: the coredump_filter both dumps saw
    coredump_filter: int


def data_file(path: Path) -> Path:
    """32 pages of a recognisable pattern; mappings.c maps them 16 private, 8 shared at page 16,
    4 read-only at page 4."""
    path.write_bytes(bytes((i * 7 + (i >> 12)) & 0xFF for i in range(32 * PAGE)))
    return path


def replace_file(path: Path) -> None:
    """A new file of the same size under *path*; the old one lives on only in the mappings."""
    new = path.with_suffix(".new")
    new.write_bytes(bytes((i * 13 + 5) & 0xFF for i in range(path.stat().st_size)))
    new.rename(path)


def run_case(case: KernelCase, tmp: Path, stack: contextlib.ExitStack) -> CaseRun:
    """Start *case*'s target, take our core, then the kernel's; cleanup goes on *stack*.

    The target is killed and reaped when *stack* closes; huge pages stay reserved until then.
    """
    binary = programs_build.build(case.program)
    argv = [str(data_file(tmp / "data")) if a == DATA else a for a in case.args]
    if case.hugepages and not stack.enter_context(hugepages(case.hugepages)):
        pytest.skip(f"the kernel could not reserve {case.hugepages} huge pages")
    target = case.launcher.start(binary, argv, tmp)
    stack.callback(target.close)
    if case.replace_data:
        replace_file(tmp / "data")
    if case.coredump_filter is not None:
        target.coredump_filter = case.coredump_filter
    dumped_filter = target.coredump_filter
    ours = case.dumper.dump(target.pid, tmp)
    kernel = kernel_core(target, tmp / "kernel")
    return CaseRun(case, binary, target.pid, ours, kernel, target.maps, target.rseq, dumped_filter)
