"""core_pattern expansion against fs/coredump.c:coredump_parse(), with a fake target."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
from facts import FACTS, facts

from criu_livedump.errors import DestinationError
from criu_livedump.pattern import Destination, DestinationKind, expand
from criu_livedump.request import UNLIMITED
from criu_livedump.target import TargetFacts


def name(pattern: str, f: TargetFacts = FACTS, **kw: object) -> str:
    return expand(pattern, f, signal=6, time=1700000000, **kw).name  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ("%%", "%"),
        ("%p", "7"),  # tgid in the target's PID namespace
        ("%P", "4321"),  # tgid in the initial namespace
        ("%i", "7"),
        ("%I", "4321"),
        ("%u", "1000"),  # real uid
        ("%g", "2000"),  # real gid
        ("%d", "1"),
        ("%s", "6"),
        ("%t", "1700000000"),
        ("%h", "host.example"),
        ("%e", "my!app"),  # comm, '/' escaped
        ("%f", "server"),  # last component of the exe path
        ("%E", "!opt!my app!bin!server"),
        ("%c", "8192"),
        ("%C", "1"),
    ],
)
def test_every_specifier(spec: str, text: str) -> None:
    assert name(f"/cores/x.{spec}.y") == f"/cores/x.{text}.y"


def test_unlimited_core_limit_prints_as_the_kernel_does() -> None:
    assert name("/c/%c", facts(core_soft=UNLIMITED)) == "/c/18446744073709551615"


def test_slashes_in_hostname_are_escaped() -> None:
    assert name("/c/%h", facts(nodename="a/b")) == "/c/a!b"


@pytest.mark.parametrize(
    ("comm", "text"), [(".", "!"), ("..", "!."), ("", "!"), ("...", "..."), ("a/..", "a!..")]
)
def test_escaped_components_cannot_climb_or_vanish(comm: str, text: str) -> None:
    # cn_esc_printf(): "." and ".." lose their first character, empty becomes "!".
    assert name("/c/%e", facts(comm=comm)) == f"/c/{text}"


def test_missing_exe_prints_comm_path_unknown() -> None:
    f = facts(exe=None, comm="worker")
    assert name("/c/%E", f) == "/c/worker (path unknown)"
    assert name("/c/%f", f) == "/c/worker (path unknown)"


def test_deleted_exe_keeps_the_kernels_suffix() -> None:
    assert name("/c/%f", facts(exe="/usr/bin/app (deleted)")) == "/c/app (deleted)"


def test_unknown_specifier_is_dropped_and_trailing_percent_ends() -> None:
    assert name("/c/a%zb") == "/c/ab"
    assert name("/c/core%") == "/c/core"


def test_relative_pattern_resolves_against_the_targets_cwd() -> None:
    d = expand("core", FACTS, signal=11, time=0)
    assert d == Destination(DestinationKind.FILE, "core", "core", path=Path("/home/u/work/core"))
    assert expand("sub/core.%p", FACTS, signal=11, time=0).path == Path("/home/u/work/sub/core.7")


def test_absolute_pattern_resolves_against_the_targets_root() -> None:
    f = facts(root="/srv/jail")
    assert expand("/cores/core", f, signal=11, time=0).path == Path("/srv/jail/cores/core")


def test_other_mount_namespace_goes_through_proc_links() -> None:
    f = facts(same_mnt_ns=False)
    assert expand("/cores/c", f, signal=11, time=0).path == Path("/proc/4321/root/cores/c")
    assert expand("c", f, signal=11, time=0).path == Path("/proc/4321/cwd/c")


def test_core_uses_pid_appends_when_no_pid_in_pattern() -> None:
    assert name("core", core_uses_pid=True) == "core.7"
    assert name("core.%p", core_uses_pid=True) == "core.7"
    # %P is not %p: the kernel still appends
    assert name("core.%P", core_uses_pid=True) == "core.4321.7"
    assert name("core", core_uses_pid=False) == "core"


def test_core_uses_pid_does_not_apply_to_pipes() -> None:
    d = expand("|/bin/h", FACTS, signal=11, time=0, core_uses_pid=True)
    assert d.argv == ("/bin/h",)


def test_pipe_splits_argv_before_expansion() -> None:
    f = facts(comm="a b")
    d = expand("|/usr/lib/handler -p %p  --exe=%E   %e %s", f, signal=6, time=0)
    assert d.kind == DestinationKind.PIPE
    assert d.path is None
    assert d.argv == ("/usr/lib/handler", "-p", "7", "--exe=!opt!my app!bin!server", "a b", "6")


def test_pipe_leading_spaces_skipped_and_tabs_split() -> None:
    d = expand("|  /bin/h\t%P", FACTS, signal=6, time=0)
    assert d.argv == ("/bin/h", "4321")


def test_pipe_argument_made_empty_by_an_unknown_specifier() -> None:
    assert expand("|/bin/h %z x", FACTS, signal=6, time=0).argv == ("/bin/h", "", "x")
    # Before anything is printed, spaces are skipped (coredump_parse() checks cn->used).
    assert expand("|%z /bin/h", FACTS, signal=6, time=0).argv == ("/bin/h",)


def test_pipe_percent_F_is_refused() -> None:
    with pytest.raises(DestinationError) as e:
        expand("|/bin/h %F", FACTS, signal=6, time=0)
    assert "%F" in str(e.value)
    assert "not supported" in str(e.value)


def test_file_percent_F_prints_nothing_like_the_kernel() -> None:
    assert name("/c/core%F.x") == "/c/core.x"


@pytest.mark.parametrize("pattern", ["", "%", "%z", "%F"])
def test_empty_name_is_refused(pattern: str) -> None:
    with pytest.raises(DestinationError, match="expands to an empty file name"):
        expand(pattern, FACTS, signal=6, time=0)


@pytest.mark.parametrize("pattern", ["|", "|   "])
def test_pipe_without_handler_is_refused(pattern: str) -> None:
    with pytest.raises(DestinationError, match="a pipe with no handler"):
        expand(pattern, FACTS, signal=6, time=0)


def test_socket_pattern_is_refused() -> None:
    with pytest.raises(DestinationError, match="coredump socket"):
        expand("@/run/coredump.socket", FACTS, signal=6, time=0)


def test_root_only_dumps_need_an_absolute_path() -> None:
    f = facts(dumpable=2)
    with pytest.raises(DestinationError, match="fully qualified path"):
        expand("core", f, signal=6, time=0)
    assert expand("/var/core", f, signal=6, time=0).path == Path("/var/core")
    assert expand("|/bin/h", f, signal=6, time=0).argv == ("/bin/h",)


# --- against the kernel ----------------------------------------------------------------------

ALL_SPECIFIERS = "%p %P %i %I %u %g %d %s %t %h %e %f %E %c %C %% x%zy"


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to set core_pattern")
def test_pipe_argv_matches_the_kernels(tmp_path: Path) -> None:
    """The kernel's own expansion of every specifier, recorded by a pipe handler, equals ours."""
    from criu_livedump.target import inspect
    from tests.syslock import core_pattern

    record = tmp_path / "argv"
    handler = tmp_path / "handler.sh"
    handler.write_text(
        f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {record}.tmp\n'
        f"cat > /dev/null\nmv {record}.tmp {record}\n"
    )
    handler.chmod(0o755)
    tmp_path.chmod(0o755)

    def setup() -> None:
        os.sched_setaffinity(0, {0})  # %C: the CPU it crashes on is the one inspected
        resource.setrlimit(resource.RLIMIT_CORE, (8192, resource.getrlimit(4)[1]))

    with core_pattern(f"|{handler} {ALL_SPECIFIERS}"):
        proc = subprocess.Popen(
            ["sh", "-c", "echo ready; exec sleep 600"],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=setup,  # noqa: PLW1509 - single-threaded test process
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            comm = Path(f"/proc/{proc.pid}/comm")
            for _ in range(1000):  # "ready" comes just before the exec
                if comm.read_text().strip() == "sleep":
                    break
                time.sleep(0.01)
            facts = inspect(proc.pid)
            assert facts.comm == "sleep"
            os.kill(proc.pid, signal.SIGSEGV)
            proc.wait()
            for _ in range(1000):  # the handler runs asynchronously; bounded wait, no timing
                if record.exists():
                    break
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    kernel_argv = tuple(record.read_text().splitlines())
    assert kernel_argv, "the pipe handler recorded nothing"
    when = int(kernel_argv[8])
    ours = expand(f"|{handler} {ALL_SPECIFIERS}", facts, signal=signal.SIGSEGV, time=when)
    assert ours.argv == (str(handler), *kernel_argv)
