"""Who may have whom dumped by `serve` (target/access.py): ptrace_may_access() with
PTRACE_MODE_ATTACH_FSCREDS on the requester's kernel-reported credentials, the target visible in
the requester's PID namespace, and never the requester itself."""

from __future__ import annotations

import dataclasses
import os
import subprocess

import procs
import pytest
from facts import FACTS

from criu_livedump.errors import PermissionDeniedError, TargetError
from criu_livedump.linux.caps import CAP
from criu_livedump.linux.namespaces import ns_ino
from criu_livedump.target import (
    CallerCreds,
    Ids,
    check_requester_may_dump,
    pid_ns_visible,
    requester_creds,
)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root")


def _requester(uid: int, gid: int, caps: int = 0, pid: int = 1 << 22) -> CallerCreds:
    """A requester in our user namespace, its PID namespace unknown (every pid visible)."""
    return CallerCreds(
        pid=pid,
        uids=Ids(uid, uid, uid, uid),
        gids=Ids(gid, gid, gid, gid),
        cap_prm=caps,
        cap_eff=caps,
        user_ns=FACTS.user_ns,
    )


OWNED = dataclasses.replace(FACTS, uids=Ids(1000, 1000, 1000, 1000), gids=Ids(100, 100, 100, 100))


def test_owner_may_dump_its_own_process() -> None:
    check_requester_may_dump(OWNED, _requester(1000, 100))


def test_another_uid_or_gid_is_refused_without_cap_sys_ptrace() -> None:
    with pytest.raises(PermissionDeniedError, match="needs CAP_SYS_PTRACE"):
        check_requester_may_dump(OWNED, _requester(1001, 100))
    with pytest.raises(PermissionDeniedError, match="needs CAP_SYS_PTRACE"):
        check_requester_may_dump(OWNED, _requester(1000, 101))
    check_requester_may_dump(OWNED, _requester(1001, 101, caps=1 << CAP.SYS_PTRACE))


def test_mixed_target_ids_are_refused_to_their_real_owner() -> None:
    """A setuid process (uid 1000, euid 0) is not its real owner's to dump."""
    setuid = dataclasses.replace(OWNED, uids=Ids(1000, 0, 0, 0))
    with pytest.raises(PermissionDeniedError, match="runs as uid 1000/0/0"):
        check_requester_may_dump(setuid, _requester(1000, 100))


def test_non_dumpable_target_needs_cap_sys_ptrace_even_for_its_owner() -> None:
    """__ptrace_may_access(): get_dumpable(mm) != SUID_DUMP_USER needs ptrace_has_cap();
    the service has no --force of its own."""
    for flag in (0, 2):
        hidden = dataclasses.replace(OWNED, dumpable=flag)
        with pytest.raises(PermissionDeniedError, match="not dumpable"):
            check_requester_may_dump(hidden, _requester(1000, 100))
        check_requester_may_dump(hidden, _requester(1000, 100, caps=1 << CAP.SYS_PTRACE))


def test_target_with_capabilities_the_requester_lacks() -> None:
    capable = dataclasses.replace(OWNED, cap_prm=1 << CAP.SYS_ADMIN)
    with pytest.raises(PermissionDeniedError, match="has capabilities the caller lacks"):
        check_requester_may_dump(capable, _requester(1000, 100))


def test_requester_never_dumps_itself() -> None:
    me = dataclasses.replace(OWNED, pid=4242)
    with pytest.raises(PermissionDeniedError, match="is the process making the request"):
        check_requester_may_dump(me, _requester(1000, 100, pid=4242))


def test_requester_creds_are_the_kernel_reported_ids() -> None:
    """Capabilities count only while the process still has the reported ids."""
    own = requester_creds(os.getpid(), os.getuid(), os.getgid())
    assert own.pid == os.getpid()
    assert own.uids == Ids(*(os.getuid(),) * 4)
    assert own.pid_ns == ns_ino("self", "pid")
    stranger = requester_creds(os.getpid(), os.getuid() + 12345, os.getgid())
    assert stranger.uids.real == os.getuid() + 12345
    assert (stranger.cap_eff, stranger.cap_prm) == (0, 0)
    with pytest.raises(TargetError, match="requesting process is gone"):
        requester_creds(0, 0, 0)


@needs_root
def test_pid_namespaces_see_down_not_up() -> None:
    """A process of a child PID namespace is visible from ours; ours is not from the child's,
    and a requester there gets ESRCH's TargetError for it."""
    child = procs.popen(["unshare", "--pid", "--fork", "sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        inner = procs.wait_for(lambda: list(procs.children(child.pid)), 10, "unshare's child")[0]
        procs.wait_for(
            lambda: ns_ino(inner, "pid") != ns_ino("self", "pid"), 10, "the new PID namespace"
        )
        host = requester_creds(os.getpid(), 0, 0)
        assert pid_ns_visible(inner, host)
        assert pid_ns_visible(os.getpid(), host)
        inside = dataclasses.replace(host, pid_ns=ns_ino(inner, "pid"))
        assert pid_ns_visible(inner, inside)
        assert not pid_ns_visible(os.getpid(), inside)
        seen = dataclasses.replace(OWNED, pid=os.getpid())
        with pytest.raises(TargetError, match="no such process"):
            check_requester_may_dump(seen, dataclasses.replace(inside, uids=OWNED.uids))
    finally:
        procs.kill_group(child)
