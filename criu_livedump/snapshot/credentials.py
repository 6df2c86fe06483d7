"""How CRIU is started for a target: as the caller, or as the target's uid with ambient
capabilities when the caller lacks CAP_SYS_RESOURCE."""

from __future__ import annotations

import os
from dataclasses import dataclass

from criu_livedump.errors import PermissionDeniedError
from criu_livedump.linux.caps import CAP, cap_names, capabilities, has_cap
from criu_livedump.linux.procfs import read_status
from criu_livedump.target import TargetFacts

__all__ = ["CriuCredentials", "criu_credentials", "mixed_tree_refusal"]


@dataclass(frozen=True)
class CriuCredentials:
    """How CRIU is started: as the caller, or as the target's uid with ambient capabilities."""

    description: str
    wrapper: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    uid: int | None = None
    gid: int | None = None


def criu_credentials(facts: TargetFacts) -> CriuCredentials:
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


def mixed_tree_refusal(facts: TargetFacts) -> str | None:
    """Why one CRIU cannot dump *facts*' whole tree: it holds processes of several uids and
    CRIU, lacking CAP_SYS_RESOURCE, can read the rlimits of one uid's only (criu/cr-dump.c
    dump_task_rlimits(), kernel/sys.c check_prlimit_permission()); else None."""
    if has_cap(capabilities(), CAP.SYS_RESOURCE):
        return None
    uids = _tree_uids(facts)
    if len(uids) < 2:
        return None
    return (
        f"its tree holds processes of uids {', '.join(map(str, sorted(uids)))}, and CRIU,"
        " lacking CAP_SYS_RESOURCE, cannot read the limits of another uid's processes"
    )


def _tree_uids(facts: TargetFacts) -> set[int]:
    uids: set[int] = set()
    for member in facts.tree or (facts.pid,):
        try:
            uids.update(int(x) for x in read_status(f"/proc/{member}/status")["Uid"].split()[:3])
        except (OSError, KeyError):
            continue
    return uids
