"""Running CRIU: finding the binary, ``criu check``, and ``criu dump --leave-running``.

This is the only module that starts CRIU (or any subprocess of the dump path). It also owns
the promise the design makes to the user: whatever happens to CRIU, the target is running
again when :func:`dump` returns or raises (:func:`ensure_running`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from criu_livedump.errors import (
    CriuError,
    CriuNotFoundError,
    CriuUnusableError,
    LivedumpError,
    TargetDiedError,
    TargetError,
)
from criu_livedump.linux.caps import CAP, capabilities, has_cap
from criu_livedump.linux.pidfd import Pidfd, describe_wait_status
from criu_livedump.linux.procfs import read_stat
from criu_livedump.snapshot import failures

log = logging.getLogger(__name__)

#: Where ``make setup`` installs the CRIU it builds.
DEFAULT_CRIU = Path("/usr/local/sbin/criu")
#: Oldest CRIU that works on current kernels: 3.17 fails on the ``[vvar_vclock]`` mapping of
#: Linux 6.13 and later (kernel commit e93d2521b27f; CRIU learned it in pull request 2539).
MIN_VERSION = (4, 1)
#: The releases live dumps are tested with: tests/test_kernel_compare.py runs every case with
#: each (scripts/build-criu.sh builds them). A later release may write images whose changes
#: the converter does not know yet (4.2 moved pagemap page counts, issue 19).
TESTED_RELEASES = ("4.1.1", "4.2.1")
#: The oldest release whose images ``convert`` reads (converters/images.py lists the variants).
OLDEST_IMAGES = (3, 11)


class Support(NamedTuple):
    """What this project says of a CRIU release (:func:`support`)."""

    #: live dumps may run it (False: refused)
    usable: bool
    #: newer than every release tested: a warning
    untested: bool
    #: one sentence, e.g. "too old, need 4.1 or later (tested: 4.1.1, 4.2.1)"
    text: str


def support(ver: str) -> Support:
    """Whether live dumps can use CRIU *ver*, and one sentence saying so."""
    have = version_tuple(ver)
    tested = ", ".join(TESTED_RELEASES)
    if have < MIN_VERSION:
        return Support(
            False, False, f"too old, need {_dotted(MIN_VERSION)} or later (tested: {tested})"
        )
    if have[:2] > version_tuple(TESTED_RELEASES[-1])[:2]:
        return Support(
            True,
            True,
            (
                f"newer than the releases tested ({tested}): its images may hold changes the "
                "converter does not read yet"
            ),
        )
    return Support(
        True,
        False,
        f"supported (tested: {tested}; images convert from CRIU {_dotted(OLDEST_IMAGES)} on)",
    )


def log_verbosity() -> int:
    """CRIU's ``-v``: 3, its errors, warnings and steps (what failures.diagnose reads and a
    user checks), or 4 when this library logs its own debug lines (``-vv``): CRIU's debug
    lines, about ten a MiB of pages, cost 40-65 ms a GiB here."""
    return 4 if log.isEnabledFor(logging.DEBUG) else 3


#: Options every live dump gets. ``--tcp-close`` only skips dumping TCP state and leaves the
#: target's connections alone, whereas ``--tcp-established`` puts live sockets in repair mode
#: (clients stalled for hundreds of ms), so it is never used. A disposable copy (the clone
#: method's) is left running too and killed by its snapshot: CRIU would kill it and wait for
#: its death (criu/seize.c, pstree_wait()), the copy's page tables torn down on the dump's path
#: (22 ms at 1 GiB here) instead of beside the conversion.
LIVE_OPTIONS = (
    "--leave-running",
    "--tcp-close",
    "--skip-in-flight",
    "--shell-job",
    "--file-locks",
    "--network-lock",
    "skip",
)
DUMP_LOG = "dump.log"
PRE_DUMP_LOG = "pre-dump.log"
STATS_DUMP = "stats-dump"
#: Seconds ``criu check`` and ``criu --version`` may take.
QUICK_TIMEOUT = 60.0
#: Seconds to let CRIU finish after Ctrl-C before it is killed: interrupting it while its
#: parasite is inside the target is worse than waiting.
INTERRUPT_GRACE = 30.0
#: Seconds CRIU may go on after the process it dumps has ended, before it is killed. CRIU 4.2.1
#: can then wait in wait4() for good: the target's exited threads stay zombies that only their
#: tracer, CRIU, can release; killing CRIU releases them (kernel/ptrace.c exit_ptrace()).
TARGET_GONE_GRACE = 3.0
#: Seconds a failure waits for a process seen dying (threads in do_exit() or zombies) to be
#: gone, so that the failure is told as that death: a 4 GiB target took seconds to free its
#: memory on a loaded machine (the target-death soak).
DYING_GRACE = 5.0
#: Seconds between two looks at the dumped process's threads while CRIU runs (its pidfd wakes
#: the watch at once when it exits; zombie threads held by CRIU do not, see Pidfd.exited()).
WATCH_STEP = 0.25
#: The whole dump's time limit (``--timeout``) by default: this much, plus
#: :data:`TIMEOUT_PER_GIB` per GiB of the target's resident memory.
BASE_TIMEOUT = 300.0
TIMEOUT_PER_GIB = 60.0


def default_timeout(rss: int) -> float:
    """The default whole-dump time limit for a target of *rss* resident bytes: generous (CRIU
    writes a GiB in a few seconds here), so that only a CRIU that hangs reaches it."""
    return BASE_TIMEOUT + TIMEOUT_PER_GIB * rss / (1 << 30)


@dataclass(frozen=True)
class Criu:
    """A CRIU binary and why it was chosen.

    :param path: the executable.
    :param source: how it was found ("given by --criu", "from $CRIU", ...).
    :param skipped: candidates passed over on the way, each with the reason.
    """

    path: Path
    source: str
    skipped: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"{self.path} ({self.source})"


def find(
    explicit: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Criu:
    """Find CRIU: ``--criu PATH``, then ``$CRIU``, then ``criu`` on PATH, then :data:`DEFAULT_CRIU`.

    A binary named explicitly (option or variable) must be usable; a ``criu`` on PATH that is
    older than :data:`MIN_VERSION` is passed over in favour of the one setup installs.

    :raises CriuUnusableError: an explicitly named binary is missing or not executable.
    :raises CriuNotFoundError: nothing usable anywhere.
    """
    env = os.environ if environ is None else environ
    if explicit is not None:
        return Criu(_require_executable(Path(explicit)), "given by --criu")
    if env.get("CRIU"):
        return Criu(_require_executable(Path(env["CRIU"])), "from $CRIU")
    skipped: list[str] = []
    on_path = shutil.which("criu", path=env.get("PATH", os.defpath))
    if on_path:
        found = Path(on_path)
        try:
            ver = version(Criu(found, "PATH"))
        except LivedumpError as e:
            skipped.append(f"{found}: {e}")
        else:
            if version_tuple(ver) >= MIN_VERSION:
                return Criu(found, "first criu on PATH")
            skipped.append(f"{found}: version {ver} is older than {_dotted(MIN_VERSION)}")
    if _is_executable(DEFAULT_CRIU):
        return Criu(DEFAULT_CRIU, "setup's install location", tuple(skipped))
    raise CriuNotFoundError(
        ["--criu", "$CRIU", "PATH", str(DEFAULT_CRIU)] + [f"skipped {s}" for s in skipped]
    )


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _require_executable(path: Path) -> Path:
    if not path.exists():
        raise CriuUnusableError(str(path), "no such file")
    if not path.is_file():
        raise CriuUnusableError(str(path), "not a regular file")
    if not os.access(path, os.X_OK):
        raise CriuUnusableError(str(path), "not executable", hint=f"chmod +x {path}, or fix --criu")
    return path


def version_tuple(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _dotted(ver: tuple[int, ...]) -> str:
    return ".".join(str(v) for v in ver)


def _run_quick(path: Path, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a short command of CRIU at *path* (no target involved) and capture its output."""
    argv = [str(path), *args]
    try:
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=QUICK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise CriuUnusableError(
            str(path), f"`{' '.join(args)}` did not finish in {QUICK_TIMEOUT:.0f} s"
        ) from e
    except OSError as e:
        raise CriuUnusableError(str(path), _exec_problem(e)) from e


def _exec_problem(e: OSError) -> str:
    if e.errno == errno.ENOEXEC:
        return "not an executable program (exec format error)"
    if e.errno == errno.EACCES:
        return "permission denied when executing it"
    if e.errno == errno.ENOENT:
        return "no such file (or its interpreter is missing)"
    return f"cannot execute: {os.strerror(e.errno or 0)}"


def version(criu: Criu) -> str:
    """The version CRIU reports (``criu --version``), e.g. ``"4.2.1"``; asked once per binary
    (a dump needs it twice: :func:`find`, then the page stream's header layout) until the file
    changes (``serve`` outlives an upgrade).

    :raises CriuUnusableError: the binary does not run or does not print a CRIU version.
    """
    try:
        st = os.stat(criu.path)
    except OSError:
        return _version(criu.path, None)
    return _version(criu.path, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _version(path: Path, _file: tuple[int, int, int, int] | None) -> str:
    """Keyed by the file alone: :func:`find` asks of its candidate, the dump of what it chose
    (the same file, found by another route)."""
    proc = _run_quick(path, ["--version"])
    for line in proc.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    what = _first_line(proc.stdout + proc.stderr) or f"exit status {proc.returncode}"
    raise CriuUnusableError(str(path), f"not a CRIU binary (`--version` said: {what})")


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _last_lines(text: str, n: int = 1) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " / ".join(lines[-n:])


@dataclass(frozen=True)
class CheckResult:
    """The outcome of ``criu check``: passed or not, and CRIU's own words."""

    passed: bool
    message: str


def check(criu: Criu) -> CheckResult:
    """Run ``criu check`` (the kernel has what CRIU needs to dump).

    :raises CriuUnusableError: the binary cannot be executed at all.
    """
    proc = _run_quick(criu.path, ["check"])
    text = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return CheckResult(True, _last_lines(text) or "passed")
    if proc.returncode < 0:
        return CheckResult(False, f"killed by signal {-proc.returncode}")
    errors = [ln.strip() for ln in text.splitlines() if "Error" in ln]
    detail = errors[-1] if errors else _last_lines(text)
    return CheckResult(False, detail or f"exit status {proc.returncode}")


def feature(criu: Criu, name: str) -> bool:
    """Whether ``criu check --feature NAME`` succeeds (e.g. ``mem_dirty_track``)."""
    return _run_quick(criu.path, ["check", "--feature", name]).returncode == 0


# --- dump ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DumpStats:
    """CRIU's ``stats-dump`` (struct dump_stats_entry in images/stats.proto); times in µs."""

    freezing_time: int = 0
    frozen_time: int = 0
    memdump_time: int = 0
    memwrite_time: int = 0
    pages_scanned: int = 0
    pages_skipped_parent: int = 0
    pages_written: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "freezing_time_us": self.freezing_time,
            "frozen_time_us": self.frozen_time,
            "memdump_time_us": self.memdump_time,
            "memwrite_time_us": self.memwrite_time,
            "pages_scanned": self.pages_scanned,
            "pages_skipped_parent": self.pages_skipped_parent,
            "pages_written": self.pages_written,
        }


@dataclass(frozen=True)
class DumpJob:
    """What to ask of CRIU for one live dump.

    :param pid: root of the tree CRIU collects (CRIU always takes the whole tree below it), as
        this process sees it.
    :param tree: the other processes CRIU dumps with *pid* (its descendants: CRIU always takes
        the whole tree), watched like it.
    :param originals: processes CRIU does not see whose death fails the dump at once, CRIU and
        its group killed (the processes a tree of clones stands for, root first).
    :param ns_pid: when set, CRIU runs inside *pid*'s PID namespace (:func:`in_pid_namespace`)
        and is told this id of *pid* there.
    :param scratch: private directory; rounds go to ``scratch/1 .. scratch/N+1``.
    :param pre_dump_rounds: ``criu pre-dump --track-mem`` rounds before the dump; only honoured
        when the caller checked ``mem_dirty_track`` (see :func:`dump`).
    :param extra_args: further CRIU options (e.g. ``--unprivileged``, ``--ghost-limit``).
    :param preexec: run in CRIU's process before exec (priorities, credentials).
    :param wrapper: argv prefix to run CRIU under (e.g. ``setpriv ... --``).
    :param timeout: the whole dump's time limit in seconds (every round together); CRIU and
        every process of its group are killed when it is reached.
    :param deadline: when that limit ends (``time.monotonic()``), if it started before
        :func:`dump` (the orchestrator counts from the start of the dump); else from there.
    :param owner: (uid, gid) to give each round's directory when CRIU runs as another user.
    :param leave_running: the dumped process is the target, which must run on afterwards
        (:func:`ensure_running`); False for a disposable copy, which its snapshot kills.
    """

    pid: int
    scratch: Path
    pre_dump_rounds: int = 0
    extra_args: tuple[str, ...] = ()
    preexec: Callable[[], None] | None = None
    wrapper: tuple[str, ...] = ()
    timeout: float = BASE_TIMEOUT
    deadline: float | None = None
    verbosity: int = field(default_factory=log_verbosity)
    env: Mapping[str, str] | None = field(default=None, compare=False)
    owner: tuple[int, int] | None = None
    leave_running: bool = True
    ns_pid: int | None = None
    tree: tuple[int, ...] = ()
    originals: tuple[int, ...] = ()
    #: descriptors CRIU inherits (a page server's socket: page_server.criu_options)
    pass_fds: tuple[int, ...] = ()
    #: called once CRIU has started, then about every WATCH_STEP seconds while a round of it
    #: runs (progress: the pages images growing in scratch); must not raise
    on_step: Callable[[], object] | None = field(default=None, compare=False)

    @property
    def prefix(self) -> tuple[str, ...]:
        """What CRIU's argv starts with: the namespace launcher, then :attr:`wrapper`."""
        launcher = () if self.ns_pid is None else in_pid_namespace(self.pid)
        return (*launcher, *self.wrapper)


#: The launcher's programs (util-linux).
LAUNCHER = ("nsenter", "unshare")


def foreign_namespace_options(pid: int, *, inside: bool) -> tuple[str, ...]:
    """CRIU options for a target whose namespaces are not CRIU's (a container's process).

    A live core is never restored, so CRIU need not describe those namespaces: every mount is
    declared external (criu/mount.c otherwise refuses, e.g., a container's cgroup mount "doesn't
    have a proper root mount"), and so is the network namespace, which CRIU would otherwise
    dump while the target is frozen (its links, routes, and iptables-save and nft run inside it:
    measured here, 214 ms of a Podman container's freeze under ``--method criu`` against 131 ms
    without). *inside*: CRIU runs in a mount namespace of its own (:func:`in_pid_namespace`).
    """
    options = []
    if inside or not _same_ns(pid, "mnt"):
        options.append("--external=mnt[]")
        with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            options += [f"--skip-mnt={m}" for m in fuse_mountpoints(f.read())]
    if not _same_ns(pid, "net"):
        # criu/net.c: a network namespace named by its inode is recorded, not dumped
        options.append(f"--external=net[{os.stat(f'/proc/{pid}/ns/net').st_ino}]:livedump")
    return tuple(options)


def fuse_mountpoints(mountinfo: str) -> list[str]:
    """The mount points of FUSE mounts in a /proc/PID/mountinfo text (proc(5): the fifth field,
    octal escapes decoded; the filesystem type follows the `` - `` separator).

    CRIU refuses to dump any FUSE mount it cannot match with a mount of its own namespace
    (criu/filesystems.c: always_fail(), "failed to dump fs ... (fuse)"), such as one made inside
    a container, or one a host made after CRIU's namespace was copied; ``--skip-mnt`` leaves
    it out (criu/proc_parse.c: should_skip_mount()), and CRIU still fails loudly should a file
    the dump needs live there.
    """
    points = []
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if sep and len(fields) >= 5 and tail.split(" ", 1)[0].split(".")[0] in ("fuse", "fuseblk"):
            points.append(_MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")


def _same_ns(pid: int, kind: str) -> bool:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino == os.stat(f"/proc/self/ns/{kind}").st_ino


def launcher_refusal() -> str | None:
    """Why CRIU cannot be run inside another PID namespace from here, or None when it can."""
    if not has_cap(capabilities(), CAP.SYS_ADMIN):
        return "running CRIU inside its PID namespace needs CAP_SYS_ADMIN, which this tool lacks"
    missing = [name for name in LAUNCHER if shutil.which(name) is None]
    if missing:
        return f"running CRIU inside its PID namespace needs {' and '.join(missing)} (util-linux)"
    return None


def in_pid_namespace(pid: int) -> tuple[str, ...]:
    """The argv prefix that runs a command inside *pid*'s PID namespace, with a /proc of it.

    CRIU dumps a process of a PID namespace only from inside it, unless the process is the
    namespace's init (criu/namespaces.c: "Can't dump a pid namespace without the process
    init"): its pstree names processes by the ids CRIU's own namespace gives them, and it
    reads /proc/PID of those ids. ``nsenter --pid`` setns()es into the namespace and forks (a
    process joins a PID namespace only through its children, pid_namespaces(7)); ``unshare
    --mount-proc`` then gives the child a private mount namespace (private propagation, so
    nothing leaks back) with a /proc mounted there, which belongs to the PID namespace of the
    process that mounts it (fs/proc/root.c: proc_fill_super() takes the mounter's
    task_active_pid_ns()). Both need CAP_SYS_ADMIN; their exit status is the command's.
    """
    return ("nsenter", f"--target={pid}", "--pid", "--", "unshare", "--mount-proc", "--")


@dataclass(frozen=True)
class DumpResult:
    """Where CRIU left the images and what it measured."""

    images_dir: Path
    stats: DumpStats
    seconds: float
    rounds: int
    resumed_by_us: bool = False


def dump_argv(
    criu: Criu,
    pid: int,
    images_dir: Path,
    *,
    action: str = "dump",
    track_mem: bool = False,
    prev_images_dir: str | None = None,
    extra_args: Sequence[str] = (),
    verbosity: int = 3,
) -> list[str]:
    """The CRIU command line for one pre-dump or dump round.

    :param action: ``"dump"`` or ``"pre-dump"``.
    :param prev_images_dir: the previous round's directory *relative to images_dir* (CRIU
        resolves it that way and links it as ``parent``).
    """
    if action not in ("dump", "pre-dump"):
        raise ValueError(f"unknown CRIU action {action!r}")
    log_name = DUMP_LOG if action == "dump" else PRE_DUMP_LOG
    argv = [str(criu.path), action, "-t", str(pid), "-D", str(images_dir)]
    argv += ["-o", log_name, f"-v{verbosity}"]
    argv += LIVE_OPTIONS
    if track_mem:
        argv.append("--track-mem")
    if prev_images_dir is not None:
        argv += ["--prev-images-dir", prev_images_dir]
    argv += extra_args
    if "--tcp-established" in argv:
        raise ValueError("--tcp-established stalls the target's clients; it is never used")
    return argv


def plan_rounds(criu: Criu, job: DumpJob) -> list[list[str]]:
    """Every CRIU command of *job*, in order: pre-dump rounds, then the final dump.

    Round *k* writes ``scratch/k``; each round after the first names the one before it as
    ``--prev-images-dir ../k-1`` so that unchanged pages stay in the parent (the converter
    follows ``parent`` links).
    """
    cmds: list[list[str]] = []
    rounds = job.pre_dump_rounds
    for k in range(1, rounds + 2):
        action = "pre-dump" if k <= rounds else "dump"
        cmds.append(
            [
                *job.prefix,
                *dump_argv(
                    criu,
                    job.pid if job.ns_pid is None else job.ns_pid,
                    job.scratch / str(k),
                    action=action,
                    track_mem=rounds > 0,
                    prev_images_dir=f"../{k - 1}" if k > 1 else None,
                    extra_args=job.extra_args,
                    verbosity=job.verbosity,
                ),
            ]
        )
    return cmds


def dump(criu: Criu, job: DumpJob) -> DumpResult:
    """Run the pre-dump rounds (if any) and ``criu dump --leave-running`` of *job*.

    The caller decides ``job.pre_dump_rounds`` after :func:`feature` ``("mem_dirty_track")``;
    pre-dump without dirty tracking would copy all memory each round for nothing.
    Whatever happens, :func:`ensure_running` runs before this returns or raises.

    CRIU is watched together with the process it dumps (its pidfd): when that process ends,
    CRIU gets :data:`TARGET_GONE_GRACE` seconds, then it and its process group are killed; the
    same happens when ``job.timeout`` runs out. No process of CRIU's group outlives this call.

    :raises CriuError: a round failed or ran out of time (argv, return code and the tail of its
        log attached).
    :raises TargetDiedError: the dumped process, or one of ``job.originals``, ended before CRIU
        was done.
    :raises TargetError: the process was gone before CRIU started.
    """
    start = time.monotonic()
    deadline = job.deadline if job.deadline is not None else start + job.timeout
    try:
        watched = Pidfd(job.pid)
    except ProcessLookupError:
        raise TargetError(job.pid, "no such process") from None
    members = [watched]
    for other in job.tree:
        with contextlib.suppress(ProcessLookupError):  # gone already: CRIU will not see it
            members.append(Pidfd(other))
    originals: list[Pidfd] = []
    cmds = plan_rounds(criu, job)
    resumed = was_stopped = False
    try:
        watch = _Watch(
            tuple(members), deadline, job.timeout, job.on_step, _open_originals(job, originals)
        )
        was_stopped = _is_stopped(job.pid)
        for argv in cmds:
            images = Path(argv[argv.index("-D") + 1])
            images.mkdir(mode=0o700, parents=True, exist_ok=False)
            if job.owner is not None:
                os.chown(images, *job.owner)
            _run_round(argv, images, job, watch)
    finally:
        # a disposable clone is its snapshot's to kill; only a live target must run on
        try:
            resumed = ensure_running(job.pid, was_stopped) if job.leave_running else False
        finally:
            for pidfd in (*members, *originals):
                pidfd.close()
    seconds = time.monotonic() - start
    final = Path(cmds[-1][cmds[-1].index("-D") + 1])
    return DumpResult(
        images_dir=final,
        stats=read_stats(final / STATS_DUMP),
        seconds=seconds,
        rounds=len(cmds),
        resumed_by_us=resumed,
    )


def _open_originals(job: DumpJob, into: list[Pidfd]) -> tuple[Pidfd, ...]:
    """Pidfds of *job*'s originals, appended to *into* (the caller closes them).

    :raises TargetDiedError: one is gone already.
    """
    for pid in job.originals:
        try:
            into.append(Pidfd(pid))
        except ProcessLookupError:
            root = job.originals[0]
            during = "the dump" if pid == root else f"the dump of process {root}'s tree"
            raise TargetDiedError(pid, during=during) from None
    return tuple(into)


@dataclass(frozen=True)
class _Watch:
    """What a round of CRIU is watched for: the end of any of *processes* (the root of the
    dumped tree first) or of *originals* (root first; see :attr:`DumpJob.originals`), and the
    *deadline*."""

    processes: tuple[Pidfd, ...]
    deadline: float
    timeout: float
    on_step: Callable[[], object] | None = None
    originals: tuple[Pidfd, ...] = ()

    def dead(self, grace: float = 0.0) -> Pidfd | None:
        """The first watched process that has ended, if any (see :meth:`Pidfd.exited`)."""
        return next((p for p in self.processes if p.exited(grace)), None)

    def original_dead(self) -> Pidfd | None:
        """The first of the originals that has ended, if any."""
        return next((p for p in self.originals if p.exited()), None)

    def died(self, dead: Pidfd) -> TargetDiedError:
        """The error for *dead*'s end, named as the root or as a member of its tree."""
        how = describe_wait_status(dead.wait_status())
        root = (self.originals if dead in self.originals else self.processes)[0].pid
        if dead.pid == root:
            return TargetDiedError(root, how)
        return TargetDiedError(dead.pid, how, during=f"the dump of process {root}'s tree")


def _run_round(argv: list[str], images: Path, job: DumpJob, watch: _Watch) -> None:
    action = argv[len(job.prefix) + 1]
    log_path = images / (DUMP_LOG if action == "dump" else PRE_DUMP_LOG)
    log.debug("running %s", " ".join(argv))
    # CRIU's output goes to a file: a pipe would block us on whatever process of its group
    # still held it, and that group is killed only once CRIU has ended
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                # Its own session and process group: a Ctrl-C at the terminal must not reach
                # CRIU while its parasite is inside the target (we decide when to stop it), and
                # the group is what is killed with it.
                start_new_session=True,
                pass_fds=job.pass_fds,
                preexec_fn=job.preexec,  # noqa: PLW1509 (the CLI is single-threaded here)
                env=None if job.env is None else dict(job.env),
            )
        except OSError as e:
            raise CriuUnusableError(argv[0], _exec_problem(e)) from e
        _supervise(proc, argv, watch)
        output.seek(0)
        out = output.read()[-8192:].decode(errors="replace")
    if (gone := watch.original_dead()) is not None:
        raise watch.died(gone)
    # a CRIU killed by a signal was killed from outside (what it dumped may die of that: a clone
    # dies with its tracer); one that failed by itself may have failed of a death
    if proc.returncode > 0 and (dead := watch.dead(DYING_GRACE)) is not None:
        raise watch.died(dead)
    if proc.returncode != 0:
        raise _failure(argv, proc.returncode, log_path, out, job.scratch.parent)


def _failure(
    argv: list[str], returncode: int, log_path: Path, out: str, scratch: Path
) -> CriuError:
    """The error of a failed CRIU round: the line of its log that explains it, the process
    and uid involved, and the hint of its known cause (snapshot/failures.py)."""
    tail = _log_tail(log_path) or out
    full = "No space left on device" in tail
    if not full and _nearly_full(log_path.parent):
        # CRIU's log shares the full filesystem: its Error line may never have been written
        full = True
        tail += f"\n(its log was cut short: no space left on {scratch})"
    found = failures.diagnose(failures.read_log(log_path) or out.splitlines(), full=full)
    hint = None if found is None else found.hint(scratch)
    if found is None or not found.line:
        return CriuError(argv, returncode, tail, log_path=str(log_path), hint=hint)
    return CriuError(
        argv,
        returncode,
        tail,
        log_path=str(log_path),
        hint=hint,
        cause=found.line,
        pid=found.pid,
        uid=found.uid,
    )


def _supervise(proc: subprocess.Popen[bytes], argv: Sequence[str], watch: _Watch) -> None:
    """Wait for CRIU to end, the dumped process to end, or the deadline; whichever comes
    first, CRIU's whole process group is gone and CRIU reaped when this returns or raises.

    :raises TargetDiedError: the dumped process ended and CRIU did not within the grace.
    :raises CriuError: the deadline passed.
    """
    with Pidfd(proc.pid) as criu_fd:
        try:
            if watch.on_step is not None:
                watch.on_step()
            while True:
                left = watch.deadline - time.monotonic()
                if left <= 0:
                    _kill_group(proc)
                    raise CriuError(
                        argv,
                        -signal.SIGKILL,
                        f"did not finish within {watch.timeout:.0f} s (the --timeout), so it was"
                        " killed",
                        hint="raise --timeout if the target is that slow to dump",
                    )
                if _wait_readable(criu_fd, min(left, WATCH_STEP)):
                    break
                if watch.on_step is not None:
                    watch.on_step()
                if (gone := watch.original_dead()) is not None:
                    died = watch.died(gone)  # read before CRIU's group goes
                    _kill_group(proc)
                    raise died
                if (dead := watch.dead()) is not None:
                    died = watch.died(dead)  # now: once CRIU is gone its zombie may be reaped
                    if _wait_readable(criu_fd, TARGET_GONE_GRACE):
                        # CRIU ended by itself: its exit status tells (a process killed by
                        # someone else just as CRIU finished its dump leaves a complete dump)
                        break
                    _kill_group(proc)
                    raise died if died.how else watch.died(dead)
        except KeyboardInterrupt:
            # Let CRIU finish (it leaves the target running); kill it only if it dawdles.
            with contextlib.suppress(KeyboardInterrupt):
                _wait_readable(criu_fd, INTERRUPT_GRACE)
            _kill_group(proc)
            raise
        except BaseException:
            _kill_group(proc)
            raise
    _kill_group(proc)  # helpers it left behind; its zombie still holds the group's id


def _wait_readable(pidfd: Pidfd, timeout: float) -> bool:
    """Whether *pidfd*'s process exits within *timeout* seconds."""
    return bool(select.select([pidfd.fd], [], [], max(timeout, 0))[0])


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL every process of CRIU's group (CRIU leads it), then reap CRIU. Called before
    CRIU is reaped, so that the group's id cannot have been reused."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


#: Free bytes (to unprivileged users, f_bavail) under which a failed CRIU's scratch filesystem
#: counts as the cause. CRIU splices pages into its images (criu/page-xfer.c), and a splice
#: fills what fits before ENOSPC, so a filesystem that stopped CRIU has next to nothing left.
FULL_MARGIN = 1 << 20


def _nearly_full(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_MARGIN


def _log_tail(path: Path, n: int = 15) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = data.splitlines()
    if lines and not data.endswith("\n"):
        # CRIU could not finish this line (its log shares the full scratch filesystem)
        lines.pop()
    return "\n".join(lines[-n:])


def _proc_state(pid: int) -> str | None:
    """The one-letter state of process *pid*, or None when the process is gone."""
    try:
        return read_stat(f"/proc/{pid}/stat").state
    except (FileNotFoundError, ProcessLookupError):
        return None


def _is_stopped(pid: int) -> bool:
    state = _proc_state(pid)
    if state is None:
        raise TargetError(pid, "no such process")
    return state in ("T", "t")


def _thread_states(pid: int) -> list[str]:
    states: list[str] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return states
    for tid in tids:
        try:
            states.append(read_stat(f"/proc/{pid}/task/{tid}/stat").state)
        except (OSError, IndexError):
            continue
    return states


def ensure_running(pid: int, was_stopped: bool = False) -> bool:
    """Make sure *pid* is not left stopped by the dump; return True if we had to resume it.

    CRIU seizes every thread; if CRIU dies while they are seized, the kernel detaches them
    on its exit (kernel/ptrace.c exit_ptrace()) but a pending group stop can leave them in
    state T. A target that was stopped before the dump is left as it was.
    """
    if was_stopped:
        return False
    states = _thread_states(pid)
    if not any(s in ("T", "t") for s in states):
        return False
    # Give a just-exited CRIU's detach a moment to land before deciding (tracer exit is
    # asynchronous to us); then continue whatever is still stopped.
    for _ in range(50):
        states = _thread_states(pid)
        if not any(s == "t" for s in states):
            break
        time.sleep(0.01)
    if any(s in ("T", "t") for s in states):
        log.warning("process %d was left stopped; sending SIGCONT", pid)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return False
        return True
    return False


# --- stats-dump ---------------------------------------------------------------------------------

_DUMP_STATS_FIELDS = (
    "freezing_time",
    "frozen_time",
    "memdump_time",
    "memwrite_time",
    "pages_scanned",
    "pages_skipped_parent",
    "pages_written",
)


def read_stats(path: Path) -> DumpStats:
    """Read CRIU's ``stats-dump``; a missing or unreadable file gives zeros (with a warning)."""
    from converters.errors import ConversionError
    from converters.images import read_stats as reader

    try:
        raw = reader(path)
    except ConversionError as e:
        log.warning("%s: cannot read CRIU's statistics (%s)", path, e)
        return DumpStats()
    return DumpStats(**{k: int(raw.get(k, 0)) for k in _DUMP_STATS_FIELDS})
