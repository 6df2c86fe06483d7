"""``criu-livedump dump``: the live-dump orchestrator, one direction, top to bottom.

Validated request -> target facts from /proc -> refusals *before* anything is frozen
(permissions, the snapshot methods' refusals, the core limit and destination) -> private scratch
directory -> the chosen snapshot method (:mod:`criu_livedump.snapshot`): prepare, freeze, hand
off to CRIU at the requested nice/ioprio, complete the images -> sidecar facts for the converter
-> conversion in a child at the requested priorities -> snapshot closed, scratch removed ->
report. Nothing here depends on which method runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from converters.images import preload as preload_images
from converters.options import UNLIMITED, ConvertOptions, StreamedPages
from converters.sidecar import Sidecar, write_sidecar
from criu_livedump import scratch, snapshot, stream, target
from criu_livedump.conversion_child import (
    ConversionOutcome,
    Priorities,
    SinkKind,
    SinkSpec,
    run_conversion,
    scheduling_preexec,
)
from criu_livedump.errors import (
    DestinationError,
    LivedumpError,
    RequestError,
    SnapshotError,
    TargetDiedError,
    TargetError,
)
from criu_livedump.linux import PAGE_SIZE
from criu_livedump.linux.mapped_files import close_mapped_files, open_mapped_files
from criu_livedump.linux.pidfd import Pidfd, describe_wait_status
from criu_livedump.linux.procfs import task_ids
from criu_livedump.pattern import DestinationKind, destination
from criu_livedump.progress import Phase, Progress
from criu_livedump.request import DumpRequest, capture_nice, check_privileges
from criu_livedump.snapshot import criu
from criu_livedump.snapshot.credentials import CriuCredentials, criu_credentials
from criu_livedump.target.dump_time import with_dump_time_facts

log = logging.getLogger(__name__)


@dataclass
class DumpReport:
    """What a live dump did; :meth:`lines` for humans (stderr), :meth:`as_dict` for ``--json``."""

    pid: int
    comm: str
    method: str = "criu"
    #: why that method ran (requested, auto's choice, a fallback)
    method_reason: str = ""
    destination: str | None = None
    core_path: str | None = None
    size: int = 0
    #: bytes of the core actually written (a file's holes are not)
    bytes_written: int = 0
    #: the scratch directory's peak usage (blocks allocated), sampled while CRIU ran
    peak_scratch_bytes: int = 0
    truncated: bool = False
    no_core_reason: str | None = None
    frozen_us: int = 0
    freezing_us: int = 0
    #: the freeze in its steps, where the method times them (clone: stop, save, fork, resume)
    freeze_steps_us: dict[str, int] = field(default_factory=dict)
    #: when the freeze began, CLOCK_MONOTONIC ns (0: unknown), to match the target's own timing
    freeze_start_ns: int = 0
    dump_seconds: float = 0.0
    convert_seconds: float = 0.0
    total_seconds: float = 0.0
    pre_dump_rounds: int = 0
    images_dir: str | None = None
    criu_ran_as: str = ""
    resumed_by_us: bool = False
    conversion_pid: int | None = None
    handler_status: int | None = None
    criu_options: tuple[str, ...] = ()
    #: how the pages reached the core: "stream" (straight from CRIU into the core's file) or
    #: "images" (CRIU's pages images, then the conversion's copy), and why not streamed
    capture: str = "images"
    capture_reason: str = ""
    #: the nice CRIU, the stream's writer and the conversion ran at, and why
    #: (request.capture_nice: requested, default or own)
    nice: int | None = None
    nice_source: str = ""
    #: method precopy's rounds and its copy inside the freeze (empty for the other methods)
    precopy: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: with --tree: one report per child process (destination, core_path, size, ...)
    children: list[DumpReport] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "comm": self.comm,
            "method": self.method,
            "method_reason": self.method_reason,
            "destination": self.destination,
            "core_path": self.core_path,
            "size": self.size,
            "bytes_written": self.bytes_written,
            "peak_scratch_bytes": self.peak_scratch_bytes,
            "truncated": self.truncated,
            "no_core_reason": self.no_core_reason,
            "frozen_time_us": self.frozen_us,
            "freezing_time_us": self.freezing_us,
            "freeze_steps_us": dict(self.freeze_steps_us),
            "freeze_start_monotonic_ns": self.freeze_start_ns,
            "dump_seconds": round(self.dump_seconds, 6),
            "convert_seconds": round(self.convert_seconds, 6),
            "total_seconds": round(self.total_seconds, 6),
            "pre_dump_rounds": self.pre_dump_rounds,
            "images_dir": self.images_dir,
            "criu_ran_as": self.criu_ran_as,
            "resumed_by_us": self.resumed_by_us,
            "conversion_pid": self.conversion_pid,
            "handler_status": self.handler_status,
            "criu_options": list(self.criu_options),
            "capture": self.capture,
            "capture_reason": self.capture_reason,
            "nice": self.nice,
            "nice_source": self.nice_source,
            "precopy": dict(self.precopy),
            "warnings": list(self.warnings),
            "children": [c.as_dict() for c in self.children],
        }

    def lines(self) -> list[str]:
        head = f"process {self.pid} ({self.comm})"
        if self.no_core_reason:
            return [f"{head}: no core written: {self.no_core_reason}"]
        out = [
            f"{head}: core written to {self.destination} ({_size(self.size)}"
            + (", truncated at the core limit" if self.truncated else "")
            + ")",
            f"frozen {self.frozen_us / 1000:.1f} ms ({self.method});"
            f" dump {self.dump_seconds:.2f} s, conversion {self.convert_seconds:.2f} s,"
            f" total {self.total_seconds:.2f} s",
        ]
        for c in self.children:
            out += c.lines()[:1]
        if self.images_dir:
            out.append(f"images kept in {self.images_dir}")
        out += [f"warning: {w}" for w in self.warnings]
        return out


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def effective_limit(request: DumpRequest, facts: target.TargetFacts) -> int:
    """The RLIMIT_CORE that applies: the request's, else the target's soft limit."""
    return facts.core_soft if request.core_limit is None else request.core_limit


def resolve_sink(
    request: DumpRequest, facts: target.TargetFacts, signal: int, limit: int
) -> tuple[SinkSpec | None, str | None]:
    """Where the core goes, or (None, reason) when the kernel would write no core at all.

    A file (``-o PATH`` or core_pattern) is owned by the target's fsuid, by root for a forced
    non-dumpable target (suid_dumpable=2 semantics). Pipe handlers ignore the limit except the
    value 1, which disables them (fs/coredump.c do_coredump()).
    """
    if facts.dumpable == 1:
        uid, gid = facts.uids.fs, facts.gids.fs
    else:
        uid, gid = 0, 0
    if request.output == "-":
        spec = SinkSpec(SinkKind.STDOUT)
    elif request.output is not None:
        spec = SinkSpec(SinkKind.FILE, path=Path(request.output).absolute(), uid=uid, gid=gid)
    else:
        dest = destination(facts, signal=signal)
        if dest.kind == DestinationKind.PIPE:
            assert dest.argv is not None
            if limit == 1:
                return None, "RLIMIT_CORE is 1, which disables core_pattern pipe handlers"
            return SinkSpec(SinkKind.PIPE, argv=dest.argv), None
        assert dest.path is not None
        spec = SinkSpec(SinkKind.FILE, path=dest.path, uid=uid, gid=gid)
    # binfmt_elf's min_coredump: a limit below one page means no core (fs/coredump.c
    # do_coredump())
    if limit != UNLIMITED and limit < PAGE_SIZE:
        return None, f"the core limit ({limit} bytes) is below one page ({PAGE_SIZE} bytes)"
    return spec, None


@dataclass(frozen=True)
class _Shared:
    """A child's images in the target's own (CRIU collected the tree)."""

    images_dir: Path


def _child_core(
    pid: int,
    request: DumpRequest,
    images: snapshot.TreeMember | _Shared,
    signal: int,
    runs_at: tuple[Priorities, Progress],
    method: str,
) -> DumpReport:
    """With ``--tree``: the core of one child from its images (taken by *method*: the
    target's, or its own with the snapshot's facts of it), written where the kernel would put
    that child's core (its own core_pattern expansion and RLIMIT_CORE), or next to
    ``-o PATH`` as ``PATH.PID``; *runs_at*: the conversion's priorities, and the progress its
    bytes count in."""
    try:
        facts = target.inspect(pid)
    except LivedumpError as e:
        return DumpReport(pid=pid, comm="?", no_core_reason=f"gone after the dump ({e.message})")
    report = DumpReport(pid=pid, comm=facts.comm, method=method)
    limit = effective_limit(request, facts)
    if request.output is not None:
        request_for_child = replace(request, output=f"{request.output}.{pid}")
    else:
        request_for_child = request
    try:
        sink, no_core = resolve_sink(request_for_child, facts, signal, limit)
    except LivedumpError as e:
        report.no_core_reason = e.message
        return report
    if sink is None:
        report.no_core_reason = no_core
        return report
    report.destination = sink.describe()
    own = isinstance(images, snapshot.TreeMember)
    if isinstance(images, snapshot.TreeMember):
        _write_sidecar(images.images_dir, facts, sink, limit, signal, images.sidecar)
        mapped_fds = dict(images.mapped_fds)
    else:
        mapped_fds = open_mapped_files(pid)
    options = ConvertOptions(
        coredump_filter=request.coredump_filter or facts.coredump_filter,
        core_limit=UNLIMITED if sink.kind == SinkKind.PIPE else limit,
        signal=signal,
        pid=facts.ns_pid,
        mapped_fds=mapped_fds,
    )
    try:
        priorities, progress = runs_at
        outcome = run_conversion(
            images.images_dir, facts.ns_pid, sink, options, priorities, progress=progress
        )
    except LivedumpError as e:
        report.no_core_reason = e.message
        return report
    finally:
        if not own:
            close_mapped_files(options.mapped_fds)
    report.core_path, report.size, report.truncated = outcome.path, outcome.size, outcome.truncated
    report.bytes_written = outcome.bytes_written
    report.convert_seconds = outcome.seconds
    report.warnings += outcome.warnings
    return report


def live_dump(
    pid: int,
    request: DumpRequest,
    *,
    criu_path: str | None = None,
    stdout: IO[bytes] | None = None,
    on_snapshot: Callable[[DumpReport], None] | None = None,
    decided: Pidfd | None = None,
    progress: Progress | None = None,
) -> DumpReport:
    """Dump running process *pid* as *request* asks; the target keeps running.

    The target is held by a pidfd from the start, so that a failure of any step (a /proc read
    cut short, CRIU's error) that its death caused is reported as that death, with how it
    ended when that can be read, and never in the failing step's own words.

    :param stdout: where ``-o -`` writes (its file descriptor is handed to the child).
    :param on_snapshot: called once the snapshot is taken and the target runs on, before the
        conversion (``serve`` answers the request then, as the livedump patch's write returns).
    :param decided: a pidfd of the process the caller decided on (``serve``'s access rules):
        refused unless that process still runs once *pid* is held here, so that both name one
        process and a pid reused in between is never dumped.
    :param progress: told of each stage, the freeze and the bytes captured and written
        (:mod:`criu_livedump.progress`); made before anything forks.
    :raises TargetDiedError: the target ended before its core was complete; nothing written.
    :raises LivedumpError: a refusal (before anything is frozen) or a failure, one line each.
    """
    try:
        watched = Pidfd(pid)
    except ProcessLookupError:
        raise TargetError(pid, "no such process") from None
    with watched:
        if decided is not None and decided.exited():
            raise TargetError(pid, "ended before its dump began")
        try:
            return _live_dump(pid, request, criu_path, stdout, on_snapshot, progress or Progress())
        except TargetDiedError as e:
            if e.pid == pid or not watched.exited(criu.DYING_GRACE):  # a process of its tree
                raise
            raise TargetDiedError(pid, describe_wait_status(watched.wait_status())) from e
        except (LivedumpError, OSError, ValueError) as e:
            if watched.exited(criu.DYING_GRACE):
                raise TargetDiedError(pid, describe_wait_status(watched.wait_status())) from e
            raise


def _live_dump(
    pid: int,
    request: DumpRequest,
    criu_path: str | None,
    stdout: IO[bytes] | None,
    on_snapshot: Callable[[DumpReport], None] | None,
    progress: Progress,
) -> DumpReport:
    started = time.monotonic()
    progress.phase(Phase.INSPECT)

    # 1. Facts and refusals: nothing is frozen yet. CRIU collects the whole tree below the
    # target, so its blockers are looked for there too.
    facts = target.inspect(pid, tree=True)
    target.check_ptrace_allowed(facts, force=request.force)
    method = snapshot.choose(request.method, facts, tree=request.tree)
    check_privileges(request, target_core_hard=facts.core_hard)
    report = DumpReport(pid=pid, comm=facts.comm, method=method.method.value)
    report.method_reason = snapshot.reason(request.method, facts, method, tree=request.tree)
    signal = request.signal or 0
    limit = effective_limit(request, facts)
    sink, no_core = resolve_sink(request, facts, signal, limit)
    if sink is None:
        report.no_core_reason = no_core
        report.total_seconds = time.monotonic() - started
        return report
    _check_sink(request, sink)
    report.destination = sink.describe()
    binary = criu.find(criu_path)
    creds = criu_credentials(method.criu_sees(facts))
    report.criu_ran_as = creds.description
    priorities = _priorities(request, facts, report)
    timeout = request.timeout or criu.default_timeout(facts.rss)

    # 2. The snapshot, CRIU writing into a private scratch directory; 3. the facts the images
    # lack, then the conversion at the requested priorities.
    capture = stream.capture_for(method, request, sink, (limit, facts.coredump_filter))
    capture.bind(priorities.apply_scheduling, progress)
    parent = scratch.choose_parent(facts.rss, request.scratch)
    work = scratch.create(parent, uid=creds.uid, gid=creds.gid)
    try:
        with method(facts, request, work) as snap, contextlib.closing(capture):
            meter = _Meter(work, progress, (timeout, started + timeout))
            result, done = _snapshot(snap, binary, creds, priorities, report, meter, capture)
            if on_snapshot is not None:
                on_snapshot(report)
            _write_sidecar(result.images_dir, facts, sink, limit, signal, done.sidecar)
            progress.phase(Phase.WRITE)
            into = (progress, capture.pages)
            outcome = _convert(
                result.images_dir, facts, request, sink, snap, priorities, stdout, into
            )
            _report_conversion(report, outcome, sink)
            if request.tree:
                progress.phase(Phase.CHILDREN)
                report.children += [
                    _child_core(
                        child,
                        request,
                        done.members.get(child, _Shared(result.images_dir)),
                        signal,
                        (priorities, progress),
                        report.method,
                    )
                    for child in facts.tree
                    if child != pid
                ]
            report.peak_scratch_bytes = meter.sample()
    except BaseException:
        if request.keep_images:
            log.warning("images kept in %s", work)
        else:
            scratch.remove(work)
        raise
    if request.keep_images:
        report.images_dir = str(result.images_dir)
    else:
        scratch.remove(work)
    report.total_seconds = time.monotonic() - started
    return report


def _priorities(request: DumpRequest, facts: target.TargetFacts, report: DumpReport) -> Priorities:
    """What the capture runs at: the request's I/O priority and oom_score_adj, and the nice of
    request.capture_nice's rule (the request's, else below the target's), told to the report."""
    nice = capture_nice(request.sched_prio, facts.nice)
    log.info("%s", nice.describe())
    report.nice, report.nice_source = nice.nice, nice.source
    return Priorities(nice.nice, request.io_prio, request.oom_score_adj)


class _Preload:
    """The image reader's pycriu and protobuf imported in a thread while CRIU runs: the main
    thread only waits for CRIU then, and they are needed right after it (the clone's images
    rewritten, the conversion child, which inherits them). Started once CRIU has started (its
    preexec_fn runs Python in the forked child, which must not inherit an import half done),
    joined before the next fork."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=preload_images, name="preload", daemon=True)
            self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


class _Meter:
    """The scratch directory sampled while CRIU writes into it: its peak usage for the report,
    the pages images' growth for the progress; and the whole dump's time limit (seconds,
    deadline on ``time.monotonic()``) that CRIU's runs share."""

    def __init__(self, work: Path, progress: Progress, time_limit: tuple[float, float]) -> None:
        self.work = work
        self.progress = progress
        self.time_limit = time_limit
        self.peak = 0
        self.preload = _Preload()

    def sample(self) -> int:
        """Measure now (CRIU's runner calls it every step; never raises); the peak so far."""
        self.preload.start()
        now = scratch.usage(self.work)
        self.peak = max(self.peak, now.allocated)
        self.progress.captured_at_least(now.pages)
        return self.peak


def _check_sink(request: DumpRequest, sink: SinkSpec) -> None:
    """Refuse, before anything freezes, a destination the dump could not write."""
    if request.tree and sink.kind == SinkKind.STDOUT:
        raise RequestError("--tree writes one core per process; -o - takes only one")
    if sink.kind == SinkKind.FILE and sink.path is not None and os.path.lexists(sink.path):
        raise DestinationError(f"{sink.path}: already exists; refusing to overwrite it")


def _snapshot(
    snap: snapshot.Snapshot,
    binary: criu.Criu,
    creds: CriuCredentials,
    priorities: Priorities,
    report: DumpReport,
    meter: _Meter,
    capture: stream.Capture,
) -> tuple[criu.DumpResult, snapshot.Snapshotted]:
    """The snapshot's steps around CRIU's dump; the images then describe the target.

    :param capture: where the pages go: streamed into the core when it can (it decides once
        the process CRIU dumps is known), else CRIU's images.
    """
    snap.prepare()
    meter.progress.phase(Phase.FREEZE)
    snap.freeze()
    own_freeze = snap.own_freeze_us()
    if own_freeze is not None:
        meter.progress.frozen(own_freeze)
    task = snap.handoff(binary)
    options = (*task.options, *creds.extra_args)
    meter.progress.phase(Phase.CAPTURE)
    stream_args = capture.begin(task, binary, snap.work)
    report.capture, report.capture_reason = capture.path, capture.reason
    try:
        result = _run_criu(binary, snap, task, creds, priorities, meter, stream_args)
    except LivedumpError as e:
        mine = capture.failed(e)
        if mine is e:
            raise
        raise mine from e
    finally:
        meter.preload.join()  # before anything forks again (tree CRIUs, the conversion child)
    capture.finish(result.images_dir)
    more = [
        _run_criu(binary, snap, t, criu_credentials(t.member), priorities, meter)
        for t in snap.tree_handoffs(binary)
        if t.member is not None
    ]
    done = snap.complete(result, more)
    meter.sample()
    if own_freeze is None:
        meter.progress.frozen(done.frozen_us)
    report.criu_options = options
    report.pre_dump_rounds = task.pre_dump_rounds
    report.dump_seconds = result.seconds + sum(r.seconds for r in more)
    report.resumed_by_us = result.resumed_by_us
    report.frozen_us, report.freezing_us = done.frozen_us, done.freezing_us
    report.freeze_steps_us = dict(done.freeze_steps_us)
    report.freeze_start_ns = done.freeze_start_ns
    report.precopy = dict(done.precopy)
    if done.method:
        report.method, report.method_reason = done.method, f"fallback: {done.method_reason}"
    return result, done


def _run_criu(
    binary: criu.Criu,
    snap: snapshot.Snapshot,
    task: snapshot.CriuTask,
    creds: CriuCredentials,
    priorities: Priorities,
    meter: _Meter,
    stream_args: tuple[tuple[str, ...], tuple[int, ...]] = ((), ()),
) -> criu.DumpResult:
    """CRIU's dump of *task* as *creds* say, into the snapshot's work directory (or, for a
    further process of a tree, its directory there), *meter* sampling it as CRIU writes;
    *stream_args*: the page stream's options and descriptors (stream.Capture.begin())."""
    _copy_at_capture_nice(task, priorities)
    try:
        return criu.dump(
            binary,
            criu.DumpJob(
                pid=task.pid,
                scratch=snap.work / task.images if task.images else snap.work,
                pre_dump_rounds=task.pre_dump_rounds,
                extra_args=(*task.options, *creds.extra_args, *stream_args[0]),
                pass_fds=stream_args[1],
                preexec=scheduling_preexec(priorities),
                wrapper=creds.wrapper,
                owner=None if creds.uid is None else (creds.uid, creds.gid or 0),
                leave_running=task.leave_running,
                timeout=meter.time_limit[0],
                deadline=meter.time_limit[1],
                on_step=meter.sample,
                ns_pid=task.ns_pid,
                tree=task.tree,
                originals=task.originals,
            ),
        )
    except TargetDiedError as e:
        if e.pid != task.pid or task.pid == snap.facts.pid:
            raise
        # CRIU dumped a copy of the target (the clone method's): the snapshot failed, not it
        of = snap.facts.pid if task.member is None else task.member.pid
        raise SnapshotError(
            f"process {of}: the copy CRIU dumped (process {e.pid}) {e.problem}; the target runs on"
        ) from e


def _copy_at_capture_nice(task: snapshot.CriuTask, priorities: Priorities) -> None:
    """Give the disposable copy CRIU dumps (a clone, never the target: ``leave_running``
    unset) the capture's nice. CRIU's parasite moves every page from inside it (vmsplice() in
    the copy's own thread), and the copy is born at the target's nice in the target's session
    (its autogroup), beside the target's busy threads. A copy gone already is CRIU's to
    report."""
    if task.leave_running or priorities.nice is None:
        return
    with contextlib.suppress(OSError):
        for tid in task_ids(task.pid):
            os.setpriority(os.PRIO_PROCESS, tid, priorities.nice)


def _write_sidecar(
    images_dir: Path,
    facts: target.TargetFacts,
    sink: SinkSpec,
    limit: int,
    signal: int,
    method_facts: Sidecar,
) -> None:
    sidecar = replace(
        method_facts,
        coredump_filter=facts.coredump_filter,
        core_limit=None if sink.kind == SinkKind.PIPE else limit,
        signal=signal,
    )
    write_sidecar(images_dir, with_dump_time_facts(sidecar, facts.pid))


def _convert(
    images_dir: Path,
    facts: target.TargetFacts,
    request: DumpRequest,
    sink: SinkSpec,
    snap: snapshot.Snapshot,
    priorities: Priorities,
    stdout: IO[bytes] | None,
    into: tuple[Progress, StreamedPages | None],
) -> ConversionOutcome:
    """The conversion child, counting into ``into[0]``; ``into[1]``: the pages already in the
    core's file when they streamed there."""
    options = ConvertOptions(
        coredump_filter=request.coredump_filter,
        core_limit=None,
        signal=request.signal or 0,
        pid=facts.ns_pid,
        mapped_fds=snap.mapped_fds,
        streamed=into[1],
    )
    out_fd = stdout.fileno() if stdout is not None and sink.kind == SinkKind.STDOUT else None
    return run_conversion(
        images_dir, facts.ns_pid, sink, options, priorities, stdout_fd=out_fd, progress=into[0]
    )


def _report_conversion(report: DumpReport, outcome: ConversionOutcome, sink: SinkSpec) -> None:
    report.convert_seconds = outcome.seconds
    report.conversion_pid = outcome.child_pid
    report.size = outcome.size
    report.bytes_written = outcome.bytes_written
    report.truncated = outcome.truncated
    report.core_path = outcome.path
    report.handler_status = outcome.handler_status
    report.warnings += outcome.warnings
    if outcome.path is None and sink.kind == SinkKind.FILE:
        report.no_core_reason = "; ".join(outcome.warnings) or "the converter wrote nothing"


__all__ = ["DumpReport", "live_dump", "resolve_sink"]
