"""Where the kernel would put this target's core: core_pattern expanded as fs/coredump.c does.

:func:`expand` is pure: it takes the pattern, a :class:`~criu_livedump.target.TargetFacts`, the
signal and the time, and returns a :class:`Destination` (a file path or a pipe handler's argv),
so every specifier is unit-testable without processes. :func:`destination` reads the system's
core_pattern and core_uses_pid and expands them for a live target.
"""

from __future__ import annotations

import enum
import time as time_mod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from converters.options import UNLIMITED
from criu_livedump.errors import DestinationError
from criu_livedump.target import TargetFacts

__all__ = [
    "CORE_PATTERN",
    "CORE_USES_PID",
    "Destination",
    "DestinationKind",
    "destination",
    "expand",
    "read_core_pattern",
]

CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")
CORE_USES_PID = Path("/proc/sys/kernel/core_uses_pid")
#: The RLIM_INFINITY that %c prints (an unsigned long of all ones on 64-bit).
_RLIM_INFINITY_TEXT = str((1 << 64) - 1)
#: C isspace(): what coredump_parse() splits a pipe pattern on.
_SPACES = " \t\n\v\f\r"


class DestinationKind(enum.StrEnum):
    """A core goes to a file or to the stdin of a pipe handler."""

    FILE = "file"
    PIPE = "pipe"


@dataclass(frozen=True)
class Destination:
    """The expanded core_pattern.

    :param kind: file or pipe.
    :param pattern: the core_pattern it came from.
    :param name: the expanded name as the kernel would use it (relative names relative to the
        target's cwd); for a pipe, the argv joined with spaces.
    :param path: for a file, the path to open from this process: relative names joined to the
        target's cwd, absolute ones to the target's root (reached through /proc/PID/root when
        the target has another root or mount namespace).
    :param argv: for a pipe, the handler's argv; the kernel runs it as root with cwd ``/`` and
        the core on stdin.
    """

    kind: DestinationKind
    pattern: str
    name: str
    path: Path | None = None
    argv: tuple[str, ...] | None = None


def _escape(text: str) -> str:
    """fs/coredump.c:cn_esc_printf(): one pattern component that cannot climb or vanish.

    A component of exactly ``.`` or ``..`` gets its first character replaced, an empty one
    becomes ``!``, and every ``/`` becomes ``!``.
    """
    if text in (".", ".."):
        text = "!" + text[1:]
    elif not text:
        text = "!"
    return text.replace("/", "!")


def _exe_text(facts: TargetFacts, name_only: bool) -> str:
    """fs/coredump.c:cn_print_exe_file(): the exe path (or its last component), escaped."""
    if facts.exe is None:
        return _escape(f"{facts.comm} (path unknown)")
    path = facts.exe
    if name_only:
        path = path.rsplit("/", 1)[-1]
    return _escape(path)


#: The %-specifiers that print a fact (fs/coredump.c:coredump_parse()), each as
#: ``(facts, signal, time) -> text``. %i/%I name the dumping thread; a live dump is taken on
#: behalf of the thread-group leader.
_SPECIFIERS: dict[str, Callable[[TargetFacts, int, int], str]] = {
    "%": lambda f, s, t: "%",
    "p": lambda f, s, t: str(f.ns_pid),  # task_tgid_vnr()
    "P": lambda f, s, t: str(f.pid),  # task_tgid_nr()
    "i": lambda f, s, t: str(f.ns_pid),
    "I": lambda f, s, t: str(f.pid),
    "u": lambda f, s, t: str(f.uids.real),  # from_kuid(&init_user_ns, cred->uid)
    "g": lambda f, s, t: str(f.gids.real),
    "d": lambda f, s, t: str(f.dumpable),
    "s": lambda f, s, t: str(s),
    "t": lambda f, s, t: str(t),
    "h": lambda f, s, t: _escape(f.nodename),
    "e": lambda f, s, t: _escape(f.comm),
    "f": lambda f, s, t: _exe_text(f, name_only=True),
    "E": lambda f, s, t: _exe_text(f, name_only=False),
    "c": lambda f, s, t: _RLIM_INFINITY_TEXT if f.core_soft == UNLIMITED else str(f.core_soft),
    "C": lambda f, s, t: str(f.cpu),
}


def _specifier(
    spec: str, facts: TargetFacts, signal: int, time: int, *, pipe: bool, pattern: str
) -> str:
    """The text one %-specifier expands to, as coredump_parse() prints it ("" when dropped)."""
    if spec == "F":
        if pipe:
            raise DestinationError(
                f"core_pattern {pattern!r}: %F (a pidfd for the pipe handler) is not supported"
                " by live dumps, which cannot hand the handler a pidfd of a process that keeps"
                " running"
            )
        return ""  # the kernel installs a pidfd only for pipes, and prints nothing otherwise
    printer = _SPECIFIERS.get(spec)
    return "" if printer is None else printer(facts, signal, time)  # unknown ones are dropped


def expand(
    pattern: str,
    facts: TargetFacts,
    *,
    signal: int,
    time: int,
    core_uses_pid: bool = False,
) -> Destination:
    """Expand *pattern* for the target exactly as fs/coredump.c:coredump_parse() would.

    Specifiers: %% %p %P %i %I %u %g %d %s %t %h %e %f %E %c %C (and %F, refused for pipes,
    empty for files, as the kernel prints it only for pipes). Unknown specifiers vanish; a lone
    ``%`` at the end ends the pattern. A ``|`` pattern is split into argv on whitespace
    *before* expansion, so a comm with spaces stays one argument. A file pattern without %p
    gets ``.PID`` appended when *core_uses_pid* is set.

    :param signal: the si_signo for %s.
    :param time: seconds since the epoch for %t.
    :raises DestinationError: an empty pattern or name, a socket (``@``) pattern, %F in a pipe,
        or a relative name for a target whose cores are root-only (suid_dumpable=2).
    """
    if pattern.startswith("@"):
        raise DestinationError(
            f"core_pattern {pattern!r} sends cores to a coredump socket, which live dumps do not"
            " support",
            hint="pass -o PATH or -o -",
        )
    pipe = pattern.startswith("|")
    name, pid_in_pattern = _corename(pattern, facts, signal, time)
    if pipe:
        argv = tuple(name.split("\0"))
        if not argv[0]:
            raise DestinationError(f"core_pattern {pattern!r}: a pipe with no handler")
        return Destination(DestinationKind.PIPE, pattern, " ".join(argv), argv=argv)
    if core_uses_pid and not pid_in_pattern:
        name += f".{facts.ns_pid}"
    if not name:
        raise DestinationError(f"core_pattern {pattern!r} expands to an empty file name")
    if facts.dumpable == 2 and not name.startswith("/"):
        # coredump_file(): root-only cores go only to fully qualified paths.
        raise DestinationError(
            f"core_pattern {pattern!r}: process {facts.pid} may only dump core to a fully"
            " qualified path (suid_dumpable=2)",
            hint="pass -o PATH",
        )
    return Destination(DestinationKind.FILE, pattern, name, path=_host_path(name, facts))


def _corename(pattern: str, facts: TargetFacts, signal: int, time: int) -> tuple[str, bool]:
    """The corename buffer as coredump_parse() fills it (for pipes, NULs separate arguments),
    and whether %p was in the pattern."""
    pipe = pattern.startswith("|")
    text = pattern[1:] if pipe else pattern
    out: list[str] = []
    used = 0
    was_space = False
    pid_in_pattern = False
    i = 0
    while i < len(text):
        c = text[i]
        if pipe:
            # Split on spaces before expanding, so %e/%E with spaces stay one argument; spaces
            # before anything was printed are skipped.
            if c in _SPACES:
                if used:
                    was_space = True
                i += 1
                continue
            if was_space:
                was_space = False
                out.append("\0")
                used += 1
        if c != "%":
            out.append(c)
            used += 1
            i += 1
            continue
        if i + 1 >= len(text):
            break  # a single % at the end: dropped, and the pattern ends
        spec = text[i + 1]
        pid_in_pattern = pid_in_pattern or spec == "p"
        piece = _specifier(spec, facts, signal, time, pipe=pipe, pattern=pattern)
        out.append(piece)
        used += len(piece)
        i += 2
    return "".join(out), pid_in_pattern


def _host_path(name: str, facts: TargetFacts) -> Path:
    """Where *name*, opened by the target, is for this process.

    The kernel opens the core with the dumping task's root and cwd. When the target shares the
    caller's mount namespace, the readlinks of /proc/PID/cwd and /proc/PID/root are paths here;
    otherwise the /proc magic links themselves lead there.
    """
    rel = PurePosixPath(name)
    if rel.is_absolute():
        base = facts.root if facts.same_mnt_ns else f"/proc/{facts.pid}/root"
        return Path(base) / rel.relative_to("/")
    base = facts.cwd if facts.same_mnt_ns else f"/proc/{facts.pid}/cwd"
    return Path(base) / rel


def read_core_pattern() -> tuple[str, bool]:
    """The system's core_pattern and core_uses_pid (/proc/sys/kernel)."""
    pattern = CORE_PATTERN.read_text().rstrip("\n")
    uses_pid = CORE_USES_PID.read_text().strip() not in ("", "0")
    return pattern, uses_pid


def destination(facts: TargetFacts, *, signal: int, time: int | None = None) -> Destination:
    """Expand the system's core_pattern for a live target.

    :param time: seconds since the epoch for %t; now when None.
    :raises DestinationError: as :func:`expand`.
    """
    pattern, uses_pid = read_core_pattern()
    now = int(time_mod.time()) if time is None else time
    return expand(pattern, facts, signal=signal, time=now, core_uses_pid=uses_pid)
