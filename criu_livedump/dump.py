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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from converters.options import UNLIMITED, ConvertOptions, write_sidecar
from criu_livedump import criu, job, scratch, target
from criu_livedump.check import CAP, cap_names, capabilities, has_cap
from criu_livedump.errors import LivedumpError, PermissionDeniedError, RequestError
from criu_livedump.pattern import DestinationKind, destination
from criu_livedump.request import DumpRequest, Method, check_privileges

log = logging.getLogger(__name__)

#: binfmt_elf's min_coredump: a limit below one page means no core (fs/coredump.c do_coredump()).
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: Automatic pre-dump: one round for targets at least this large, when dirty tracking exists.
AUTO_PRE_DUMP_RSS = 256 << 20


@dataclass
class DumpReport:
    """What a live dump did; :meth:`lines` for humans (stderr), :meth:`as_dict` for ``--json``."""

    pid: int
    comm: str
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "comm": self.comm,
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
        }

    def lines(self) -> list[str]:
        head = f"process {self.pid} ({self.comm})"
        if self.no_core_reason:
            return [f"{head}: no core written: {self.no_core_reason}"]
        out = [
            f"{head}: core written to {self.destination} ({_size(self.size)}"
            + (", truncated at the core limit" if self.truncated else "")
            + ")",
            f"frozen {self.frozen_us / 1000:.1f} ms; dump {self.dump_seconds:.2f} s, "
            f"conversion {self.convert_seconds:.2f} s, total {self.total_seconds:.2f} s",
        ]
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
            with open(f"/proc/{member}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        uids.update(int(x) for x in line.split()[1:4])
        except OSError:
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


def cpu_times(pid: int) -> dict[str, list[int]]:
    """CPU times for NT_PRSTATUS in the sidecar's form: ``{"TID": [utime_us, stime_us],
    "children": [cutime_us, cstime_us]}``; the leader's entry is the thread-group total, as
    fs/binfmt_elf.c fill_prstatus() uses thread_group_cputime() for it."""
    tick_us = 1_000_000 // os.sysconf("SC_CLK_TCK")

    def fields(path: str) -> list[str]:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()

    out: dict[str, list[int]] = {}
    try:
        group = fields(f"/proc/{pid}/stat")
        # utime, stime, cutime, cstime are fields 14-17 of proc_pid_stat(5)
        out[str(pid)] = [int(group[11]) * tick_us, int(group[12]) * tick_us]
        out["children"] = [int(group[13]) * tick_us, int(group[14]) * tick_us]
        for tid in os.listdir(f"/proc/{pid}/task"):
            if int(tid) != pid:
                mine = fields(f"/proc/{pid}/task/{tid}/stat")
                out[tid] = [int(mine[11]) * tick_us, int(mine[12]) * tick_us]
    except (OSError, ValueError, IndexError):
        pass  # the target exited: the converter writes zeros
    return out


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def live_dump(
    pid: int, request: DumpRequest, *, criu_path: str | None = None, stdout: IO[bytes] | None = None
) -> DumpReport:
    """Dump running process *pid* as *request* asks; the target keeps running.

    :param stdout: where ``-o -`` writes (its file descriptor is handed to the child).
    :raises LivedumpError: a refusal (before anything is frozen) or a failure, one line each.
    """
    started = time.monotonic()
    if request.method == Method.CLONE:
        raise RequestError("--method clone: not available yet in this build; use --method criu")

    # 1. Facts and refusals: nothing is frozen yet.
    facts = target.inspect(pid, tree=request.tree)
    target.check_ptrace_allowed(facts, force=request.force)
    blocker_options = target.check_blockers(facts)
    check_privileges(request, target_core_hard=facts.core_hard)
    report = DumpReport(pid=pid, comm=facts.comm)
    signal = request.signal or 0
    limit = effective_limit(request, facts)
    sink, no_core = resolve_sink(request, facts, signal, limit)
    if sink is None:
        report.no_core_reason = no_core
        report.total_seconds = time.monotonic() - started
        return report
    if sink.kind == job.SinkKind.FILE and sink.path is not None and os.path.lexists(sink.path):
        raise LivedumpError(f"{sink.path}: already exists; refusing to overwrite it")
    report.destination = sink.describe()
    binary = criu.find(criu_path)
    creds = criu_credentials(facts)
    report.criu_ran_as = creds.description
    rounds = _pre_dump_rounds(request, binary, facts.rss)
    priorities = job.Priorities(request.sched_prio, request.io_prio, request.oom_score_adj)

    # 2. CRIU into a private scratch directory.
    parent = scratch.choose_parent(facts.rss, request.scratch)
    work = scratch.create(parent, uid=creds.uid, gid=creds.gid)
    keep = request.keep_images
    try:
        dump_job = criu.DumpJob(
            pid=pid,
            scratch=work,
            externals=(),
            pre_dump_rounds=rounds,
            extra_args=(*blocker_options, *creds.extra_args),
            preexec=job.scheduling_preexec(priorities),
            wrapper=creds.wrapper,
            owner=None if creds.uid is None else (creds.uid, creds.gid or 0),
        )
        report.criu_options = (*blocker_options, *creds.extra_args)
        result = criu.dump(binary, dump_job)
        report.dump_seconds = result.seconds
        report.frozen_us = result.stats.frozen_time
        report.freezing_us = result.stats.freezing_time
        report.pre_dump_rounds = rounds
        report.resumed_by_us = result.resumed_by_us

        # 3. Facts the images lack, then the conversion at the requested priorities.
        write_sidecar(
            result.images_dir,
            coredump_filter=facts.coredump_filter,
            core_limit=None if sink.kind == job.SinkKind.PIPE else limit,
            signal=signal,
            boot_id=_boot_id(),
            pid=pid,
            # The images' pstree says 0 for the dumped root's parent; the kernel writes it.
            ppid=facts.ppid,
            times=cpu_times(pid),
        )
        options = ConvertOptions(
            coredump_filter=request.coredump_filter,
            core_limit=None,
            signal=signal,
            pid=pid,
        )
        out_fd = (
            stdout.fileno() if stdout is not None and sink.kind == job.SinkKind.STDOUT else None
        )
        outcome = job.run_conversion(
            result.images_dir, pid, sink, options, priorities, stdout_fd=out_fd
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
    except BaseException:
        if keep:
            log.warning("images kept in %s", work)
        else:
            scratch.remove(work)
        raise
    if keep:
        report.images_dir = str(result.images_dir)
    else:
        scratch.remove(work)
    report.total_seconds = time.monotonic() - started
    return report


__all__ = ["DumpReport", "criu_credentials", "live_dump", "resolve_sink"]
