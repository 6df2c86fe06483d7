"""The snapshot methods' table: each method's refusals, ``auto``'s choice, and a refusal's hint
naming a method that accepts the target, or none (facts built by hand: nothing runs)."""

from __future__ import annotations

import dataclasses

import pytest
from facts import facts

from criu_livedump.errors import BlockerError
from criu_livedump.linux import ptrace
from criu_livedump.request import Method
from criu_livedump.snapshot import METHODS, choose, reason
from criu_livedump.snapshot.clone.method import CloneSnapshot
from criu_livedump.snapshot.leave_running import CriuSnapshot
from criu_livedump.snapshot.precopy.method import AUTO_MIN_RSS, PrecopySnapshot
from criu_livedump.target import Blocker, BlockerKind, TargetFacts, traced

PID = 4321

PLAIN = facts(pid=PID, ns_pid=PID, nstgid=(PID,), threads=(PID,), tree=(PID,))
IO_URING = Blocker(BlockerKind.IO_URING, PID, "fd 3 is an io_uring instance")


def plain(**changes: object) -> TargetFacts:
    return dataclasses.replace(PLAIN, **changes)  # type: ignore[arg-type]


def refusal(requested: Method, f: TargetFacts, *, tree: bool = False) -> BlockerError:
    with pytest.raises(BlockerError) as info:
        choose(requested, f, tree=tree)
    return info.value


def test_every_method_is_in_the_table_and_selectable() -> None:
    assert set(METHODS) == set(Method) - {Method.AUTO}
    assert all(cls.method == m for m, cls in METHODS.items())


def test_auto_takes_the_first_method_that_refuses_nothing() -> None:
    assert choose(Method.AUTO, PLAIN) is CloneSnapshot
    assert choose(Method.AUTO, plain(state="T")) is CriuSnapshot
    assert choose(Method.AUTO, PLAIN, tree=True) is CriuSnapshot
    # with --tree, CRIU's tree dump first, the clones where CRIU refuses the tree
    assert choose(Method.AUTO, plain(blockers=(IO_URING,)), tree=True) is CloneSnapshot
    # io_uring: CRIU refuses it, the clone copies it out
    assert choose(Method.AUTO, plain(blockers=(IO_URING,))) is CloneSnapshot


def test_auto_takes_precopy_from_its_resident_size_and_says_why() -> None:
    big, small = plain(rss=AUTO_MIN_RSS), plain(rss=AUTO_MIN_RSS - 4096)
    assert choose(Method.AUTO, big) is PrecopySnapshot
    assert reason(Method.AUTO, big, PrecopySnapshot, tree=False) == "auto: first choice"
    assert choose(Method.AUTO, small) is CloneSnapshot
    assert reason(Method.AUTO, small, CloneSnapshot, tree=False) == (
        f"auto: not precopy: resident {(AUTO_MIN_RSS - 4096) / 2**20:.0f} MiB, under the"
        f" {AUTO_MIN_RSS >> 20} MiB from which precopy freezes shorter than clone"
    )
    assert reason(Method.PRECOPY, small, PrecopySnapshot, tree=False) == "requested"
    # precopy takes no tree; a stopped target is no clone's, precopy's neither
    assert choose(Method.AUTO, big, tree=True) is CriuSnapshot
    assert choose(Method.AUTO, plain(rss=AUTO_MIN_RSS, state="T")) is CriuSnapshot
    assert refusal(Method.PRECOPY, big, tree=True).hint == "--method criu can dump it"


def test_refused_method_names_the_one_that_accepts() -> None:
    e = refusal(Method.CLONE, plain(state="T"))
    assert e.message == f"process {PID}: cannot be dumped: --method clone: it is stopped (state T)"
    assert e.hint == "--method criu can dump it"
    e = refusal(Method.CRIU, plain(blockers=(IO_URING,)))
    assert (
        e.message == f"process {PID}: cannot be dumped: --method criu: fd 3 is an io_uring instance"
    )
    assert e.hint == "--method clone can dump it"


def test_traced_target_is_one_refusal_with_no_hint() -> None:
    """Both methods seize the target, so neither can dump a traced one: no method to suggest,
    and one wording whichever method finds it."""
    blocker = traced(PID, 99)
    f = plain(tracer_pid=99, blockers=(blocker,))
    assert CloneSnapshot.refusals(f, tree=False) == CriuSnapshot.refusals(f, tree=False)
    for requested in Method:
        e = refusal(requested, f)
        assert e.hint is None
        assert e.message.endswith(f"cannot be dumped: {blocker.detail}") or e.message.endswith(
            f"--method {requested}: {blocker.detail}"
        )
    assert refusal(Method.AUTO, f).message == f"process {PID}: cannot be dumped: {blocker.detail}"


def test_seccomp_without_suspension_is_one_refusal_of_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both methods need seccomp suspended (the clone for its injected syscalls, CRIU for its
    parasite): without it, one wording from either, and no method to suggest."""
    why = "it runs under seccomp, which needs CAP_SYS_ADMIN, and this tool lacks it"
    monkeypatch.setattr(ptrace, "seccomp_suspension_refusal", lambda: why)
    f = plain(seccomp=2)
    assert CloneSnapshot.refusals(f, tree=False) == CriuSnapshot.refusals(f, tree=False) == (why,)
    assert refusal(Method.CLONE, f).hint is None
    assert refusal(Method.AUTO, f).message == f"process {PID}: cannot be dumped: {why}"
    monkeypatch.setattr(ptrace, "seccomp_suspension_refusal", lambda: None)
    assert choose(Method.AUTO, f) is CloneSnapshot
