"""``criu-livedump dump``: the live-dump orchestrator.

The flow, one direction: validated request -> target facts from /proc -> refusals *before*
anything is frozen (permissions, blockers, core limit) -> private scratch directory -> CRIU
dump with ``--leave-running`` at the requested nice/ioprio -> the target is made sure to run ->
sidecar facts for the converter -> conversion in a child at the requested priorities -> scratch
removed -> report.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from converters.options import UNLIMITED, ConvertOptions, write_sidecar
from criu_livedump import conversion_child as job
from criu_livedump import scratch, target
from criu_livedump.errors import (
    BlockerError,
    DestinationError,
    LivedumpError,
    PermissionDeniedError,
    RequestError,
)
from criu_livedump.linux import PAGE_SIZE
from criu_livedump.linux.caps import CAP, cap_names, capabilities, has_cap
from criu_livedump.linux.mapped_files import close_mapped_files, open_mapped_files
from criu_livedump.linux.procfs import read_status
from criu_livedump.pattern import DestinationKind, destination
from criu_livedump.request import DumpRequest, Method, check_privileges
from criu_livedump.snapshot import criu
from criu_livedump.snapshot.clone import images as clone_images
from criu_livedump.snapshot.clone import inject as clone
from criu_livedump.target.dump_time import clone_facts, dump_time_facts

log = logging.getLogger(__name__)

#: Automatic pre-dump: one round for targets at least this large, when dirty tracking exists.
AUTO_PRE_DUMP_RSS = 256 << 20


@dataclass
class DumpReport:
    """What a live dump did; :meth:`lines` for humans (stderr), :meth:`as_dict` for ``--json``."""

    pid: int
    comm: str
    method: str = "criu"
    destination: str | None = None
    core_path: str | None = None
    size: int = 0
    truncated: bool = False
    no_core_reason: str | None = None
    frozen_us: int = 0
    freezing_us: int = 0
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
    warnings: list[str] = field(default_factory=list)
    #: with --tree: one report per child process (destination, core_path, size, ...)
    children: list[DumpReport] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "comm": self.comm,
            "method": self.method,
            "destination": self.destination,
            "core_path": self.core_path,
            "size": self.size,
            "truncated": self.truncated,
            "no_core_reason": self.no_core_reason,
            "frozen_time_us": self.frozen_us,
            "freezing_time_us": self.freezing_us,
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


@dataclass(frozen=True)
class CriuCredentials:
    """How CRIU is started: as the caller, or as the target's uid with ambient capabilities."""

    description: str
    wrapper: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    uid: int | None = None
    gid: int | None = None


def criu_credentials(facts: target.TargetFacts) -> CriuCredentials:
    """Choose how to run CRIU for *facts*.

    CRIU reads every dumped task's rlimits with prlimit(), which kernel/sys.c
    check_prlimit_permission() allows only to a caller with the task's uids or with
    CAP_SYS_RESOURCE. Without that capability (this machine's root), CRIU runs as the target's
    uid and gid, keeps the caller's other capabilities as ambient ones (so ptrace, /proc and
    CAP_CHECKPOINT_RESTORE still work), and is told ``--unprivileged``.

    :raises PermissionDeniedError: that path cannot work for this target (mixed uids).
    """
    eff = capabilities()
    uids, gids = facts.uids, facts.gids
    me = os.getuid()
    own = all(u == me for u in uids[:3]) and all(g == os.getgid() for g in gids[:3])
    if has_cap(eff, CAP.SYS_RESOURCE) or own:
        return CriuCredentials("the caller" if own else "root")
    mixed = len(set(uids[:3])) != 1 or len(set(gids[:3])) != 1
    others = _tree_uids(facts) - {uids.real}
    if mixed or others:
        what = (
            f"its uids {uids.real}/{uids.effective}/{uids.saved} and gids "
            f"{gids.real}/{gids.effective}/{gids.saved} differ"
            if mixed
            else f"its tree also holds processes of uid {', '.join(map(str, sorted(others)))}"
        )
        raise PermissionDeniedError(
            f"process {facts.pid}: CRIU must read its rlimits, which needs CAP_SYS_RESOURCE"
            f" (missing here) or running as its uid, and {what}",
            hint="grant CAP_SYS_RESOURCE to the caller",
        )
    if not (has_cap(eff, CAP.SETUID) and has_cap(eff, CAP.SETGID) and has_cap(eff, CAP.SETPCAP)):
        raise PermissionDeniedError(
            f"process {facts.pid}: runs as uid {uids.real}; without CAP_SYS_RESOURCE CRIU must run"
            " as that uid, which needs CAP_SETUID, CAP_SETGID and CAP_SETPCAP"
        )
    caps = ",".join("+" + n.removeprefix("cap_") for n in cap_names(capabilities("self", "CapPrm")))
    wrapper = (
        "setpriv",
        f"--reuid={uids.real}",
        f"--regid={gids.real}",
        "--clear-groups",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        "--",
    )
    return CriuCredentials(
        f"uid {uids.real} gid {gids.real} with ambient capabilities (--unprivileged)",
        wrapper=wrapper,
        extra_args=("--unprivileged",),
        uid=uids.real,
        gid=gids.real,
    )


def _tree_uids(facts: target.TargetFacts) -> set[int]:
    uids: set[int] = set()
    for member in facts.tree or (facts.pid,):
        try:
            uids.update(int(x) for x in read_status(f"/proc/{member}/status")["Uid"].split()[:3])
        except (OSError, KeyError):
            continue
    return uids


def effective_limit(request: DumpRequest, facts: target.TargetFacts) -> int:
    """The RLIMIT_CORE that applies: the request's, else the target's soft limit."""
    return facts.core_soft if request.core_limit is None else request.core_limit


def resolve_sink(
    request: DumpRequest, facts: target.TargetFacts, signal: int, limit: int
) -> tuple[job.SinkSpec | None, str | None]:
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
        spec = job.SinkSpec(job.SinkKind.STDOUT)
    elif request.output is not None:
        spec = job.SinkSpec(
            job.SinkKind.FILE, path=Path(request.output).absolute(), uid=uid, gid=gid
        )
    else:
        dest = destination(facts, signal=signal)
        if dest.kind == DestinationKind.PIPE:
            assert dest.argv is not None
            if limit == 1:
                return None, "RLIMIT_CORE is 1, which disables core_pattern pipe handlers"
            return job.SinkSpec(job.SinkKind.PIPE, argv=dest.argv), None
        assert dest.path is not None
        spec = job.SinkSpec(job.SinkKind.FILE, path=dest.path, uid=uid, gid=gid)
    # binfmt_elf's min_coredump: a limit below one page means no core (fs/coredump.c
    # do_coredump())
    if limit != UNLIMITED and limit < PAGE_SIZE:
        return None, f"the core limit ({limit} bytes) is below one page ({PAGE_SIZE} bytes)"
    return spec, None


def _pre_dump_rounds(request: DumpRequest, binary: criu.Criu, rss: int) -> int:
    wanted = request.pre_dump
    if wanted == 0:
        return 0
    available = criu.feature(binary, "mem_dirty_track")
    if not available:
        if wanted:
            log.warning(
                "--pre-dump %d ignored: no memory dirty tracking here"
                " (`criu check --feature mem_dirty_track` fails)",
                wanted,
            )
        return 0
    if wanted is None:
        return 1 if rss >= AUTO_PRE_DUMP_RSS else 0
    return wanted


#: What the clone method copies out of the target itself, so CRIU never sees it.
CLONE_HANDLES = {
    target.BlockerKind.IO_URING,
    target.BlockerKind.SYSV_SHM,
    # the clone calls setsid() before CRIU sees it (clone.py, step 5)
    target.BlockerKind.FOREIGN_SESSION,
}


def choose_method(
    requested: Method, facts: target.TargetFacts, *, tree: bool = False
) -> tuple[Method, tuple[str, ...]]:
    """The method a dump uses and the CRIU options it needs; refusals before freezing.

    ``clone`` dumps a copy-on-write clone of the target alone: io_uring rings and SysV segments
    are copied out before CRIU runs, the clone holds no file descriptors, and the target's
    children are not involved. It needs a target that is neither traced (ptrace would fail),
    nor under seccomp (a filter may forbid the injected clone/close_range), nor stopped.
    ``criu`` dumps the whole tree below the target with ``--leave-running``. ``auto`` takes
    clone when it can.

    :raises BlockerError: the chosen (or every) method cannot dump this target.
    """
    why_not_clone = None
    if facts.tracer_pid:
        why_not_clone = f"it is traced by process {facts.tracer_pid}"
    elif facts.seccomp:
        why_not_clone = "it runs under seccomp, which may forbid the injected syscalls"
    elif facts.state in ("T", "t"):
        # a job-control stop would end in the injected syscall; CRIU leaves it as it was
        why_not_clone = "it is stopped (state T)"
    elif tree:
        why_not_clone = "--tree needs the whole process tree, which only CRIU collects"
    elif len(facts.nstgid) > 1:
        # criu/namespaces.c: "Can't dump a pid namespace without the process init"; a clone
        # would be process 2 there
        why_not_clone = "it is the init of a PID namespace, which CRIU dumps only from the init"
    own = [b for b in facts.blockers if b.pid == facts.pid]
    clone_refusals = [b for b in own if b.refuse and b.kind not in CLONE_HANDLES]
    if requested == Method.CLONE or (requested == Method.AUTO and why_not_clone is None):
        if why_not_clone is not None:
            raise BlockerError(
                facts.pid, f"--method clone: {why_not_clone}", hint="use --method criu"
            )
        if clone_refusals:
            raise BlockerError(facts.pid, "; ".join(b.detail for b in clone_refusals))
        options: dict[str, None] = {}
        for b in own:
            for opt in b.criu_options:
                options.setdefault(opt, None)
        return Method.CLONE, tuple(options)
    try:
        return Method.CRIU, target.check_blockers(facts)
    except BlockerError as e:
        if why_not_clone is None and not clone_refusals:
            e.hint = "--method clone can dump it"
        raise


def _child_core(
    pid: int, request: DumpRequest, images_dir: Path, signal: int, priorities: job.Priorities
) -> DumpReport:
    """With ``--tree``: the core of one child from the same images, written where the kernel
    would put that child's core (its own core_pattern expansion and RLIMIT_CORE), or next to
    ``-o PATH`` as ``PATH.PID``."""
    try:
        facts = target.inspect(pid)
    except LivedumpError as e:
        return DumpReport(pid=pid, comm="?", no_core_reason=f"gone after the dump ({e.message})")
    report = DumpReport(pid=pid, comm=facts.comm, method=Method.CRIU.value)
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
    options = ConvertOptions(
        coredump_filter=request.coredump_filter or facts.coredump_filter,
        core_limit=UNLIMITED if sink.kind == job.SinkKind.PIPE else limit,
        signal=signal,
        pid=facts.ns_pid,
        mapped_fds=open_mapped_files(pid),
    )
    try:
        outcome = job.run_conversion(images_dir, facts.ns_pid, sink, options, priorities)
    except LivedumpError as e:
        report.no_core_reason = e.message
        return report
    finally:
        close_mapped_files(options.mapped_fds)
    report.core_path, report.size, report.truncated = outcome.path, outcome.size, outcome.truncated
    report.convert_seconds = outcome.seconds
    report.warnings += outcome.warnings
    return report


def live_dump(
    pid: int, request: DumpRequest, *, criu_path: str | None = None, stdout: IO[bytes] | None = None
) -> DumpReport:
    """Dump running process *pid* as *request* asks; the target keeps running.

    :param stdout: where ``-o -`` writes (its file descriptor is handed to the child).
    :raises LivedumpError: a refusal (before anything is frozen) or a failure, one line each.
    """
    started = time.monotonic()

    # 1. Facts and refusals: nothing is frozen yet. CRIU collects the whole tree below the
    # target, so its blockers are looked for there too.
    facts = target.inspect(pid, tree=True)
    target.check_ptrace_allowed(facts, force=request.force)
    method, blocker_options = choose_method(request.method, facts, tree=request.tree)
    check_privileges(request, target_core_hard=facts.core_hard)
    report = DumpReport(pid=pid, comm=facts.comm, method=method.value)
    signal = request.signal or 0
    limit = effective_limit(request, facts)
    sink, no_core = resolve_sink(request, facts, signal, limit)
    if sink is None:
        report.no_core_reason = no_core
        report.total_seconds = time.monotonic() - started
        return report
    if request.tree and sink.kind == job.SinkKind.STDOUT:
        raise RequestError("--tree writes one core per process; -o - takes only one")
    if sink.kind == job.SinkKind.FILE and sink.path is not None and os.path.lexists(sink.path):
        raise DestinationError(f"{sink.path}: already exists; refusing to overwrite it")
    report.destination = sink.describe()
    binary = criu.find(criu_path)
    creds = criu_credentials(facts)
    report.criu_ran_as = creds.description
    rounds = _pre_dump_rounds(request, binary, facts.rss) if method == Method.CRIU else 0
    priorities = job.Priorities(request.sched_prio, request.io_prio, request.oom_score_adj)

    # 2. CRIU into a private scratch directory.
    parent = scratch.choose_parent(facts.rss, request.scratch)
    work = scratch.create(parent, uid=creds.uid, gid=creds.gid)
    keep = request.keep_images
    snap: clone.CloneSnapshot | None = None
    held: dict[int, int] = {}
    try:
        extra_facts: dict[str, Any] = {}
        if method == Method.CLONE:
            # The target's freeze is the snapshot's (steps 1-4); CRIU then works on the clone.
            side = work / "side"
            side.mkdir(mode=0o700)
            snap = clone.clone_snapshot(pid, side_dir=side)
            report.frozen_us = round(snap.freeze_seconds * 1_000_000)
            # the stopped clone's mappings are the snapshot's; CRIU kills it when done
            held = open_mapped_files(snap.clone_pid)
            snap.release_for_criu()
        dump_job = criu.DumpJob(
            pid=pid if snap is None else snap.clone_pid,
            scratch=work,
            externals=(),
            pre_dump_rounds=rounds,
            extra_args=(*blocker_options, *creds.extra_args),
            preexec=job.scheduling_preexec(priorities),
            wrapper=creds.wrapper,
            owner=None if creds.uid is None else (creds.uid, creds.gid or 0),
            leave_running=snap is None,
        )
        report.criu_options = (*blocker_options, *creds.extra_args)
        result = criu.dump(binary, dump_job)
        report.dump_seconds = result.seconds
        report.pre_dump_rounds = rounds
        report.resumed_by_us = result.resumed_by_us
        # CRIU names processes by their pids in the target's PID namespace (it dumps that
        # namespace when the target is its init), as the kernel's core does; the clone's
        # images are rewritten with the target's pids, and the clone is refused in a namespace
        image_pid = facts.ns_pid
        if snap is None:
            report.frozen_us = result.stats.frozen_time
            report.freezing_us = result.stats.freezing_time
            held = open_mapped_files(pid)
        else:
            extra_facts = clone_images.rewrite_images(result.images_dir, snap)
            copied = frozenset((a.start, a.end) for a in snap.fork_lost)
            extra_facts.update(clone_facts(snap.smaps, copied=copied))
            snap.kill()

        # 3. Facts the images lack, then the conversion at the requested priorities.
        write_sidecar(
            result.images_dir,
            coredump_filter=facts.coredump_filter,
            core_limit=None if sink.kind == job.SinkKind.PIPE else limit,
            signal=signal,
            pid=image_pid,
            **dump_time_facts(pid),
            **extra_facts,
        )
        options = ConvertOptions(
            coredump_filter=request.coredump_filter,
            core_limit=None,
            signal=signal,
            pid=image_pid,
            mapped_fds=held,
        )
        out_fd = (
            stdout.fileno() if stdout is not None and sink.kind == job.SinkKind.STDOUT else None
        )
        outcome = job.run_conversion(
            result.images_dir, image_pid, sink, options, priorities, stdout_fd=out_fd
        )
        report.convert_seconds = outcome.seconds
        report.conversion_pid = outcome.child_pid
        report.size = outcome.size
        report.truncated = outcome.truncated
        report.core_path = outcome.path
        report.handler_status = outcome.handler_status
        report.warnings += outcome.warnings
        if outcome.path is None and sink.kind == job.SinkKind.FILE:
            report.no_core_reason = "; ".join(outcome.warnings) or "the converter wrote nothing"
        if request.tree:
            for child in facts.tree:
                if child != pid:
                    report.children.append(
                        _child_core(child, request, result.images_dir, signal, priorities)
                    )
    except BaseException:
        if snap is not None:
            snap.kill()
        if keep:
            log.warning("images kept in %s", work)
        else:
            scratch.remove(work)
        raise
    finally:
        close_mapped_files(held)
    if keep:
        report.images_dir = str(result.images_dir)
    else:
        scratch.remove(work)
    report.total_seconds = time.monotonic() - started
    return report


__all__ = ["DumpReport", "criu_credentials", "live_dump", "resolve_sink"]
