"""Taking the snapshot CRIU dumps: one protocol (:mod:`.base`), one module per method, and the
table ``auto`` chooses from.

Adding a method is one module implementing :class:`~criu_livedump.snapshot.base.Snapshot` and
one row in :data:`METHODS` (and its name in :class:`criu_livedump.request.Method`).
"""

from __future__ import annotations

from criu_livedump.errors import BlockerError
from criu_livedump.request import Method
from criu_livedump.snapshot.base import CriuTask, Snapshot, Snapshotted, TreeMember
from criu_livedump.snapshot.clone.method import CloneSnapshot
from criu_livedump.snapshot.leave_running import CriuSnapshot
from criu_livedump.snapshot.precopy.method import PrecopySnapshot
from criu_livedump.target import TargetFacts

__all__ = [
    "METHODS",
    "TREE_PREFERENCE",
    "CriuTask",
    "Snapshot",
    "Snapshotted",
    "TreeMember",
    "choose",
    "reason",
]

#: Every snapshot method, in ``auto``'s order of preference: the shortest freeze first
#: (precopy only where :meth:`Snapshot.auto_declines` lets it: from 512 MiB resident).
METHODS: dict[Method, type[Snapshot]] = {
    Method.PRECOPY: PrecopySnapshot,
    Method.CLONE: CloneSnapshot,
    Method.CRIU: CriuSnapshot,
}

#: ``auto``'s order with ``--tree``: CRIU's own tree dump first (one CRIU, one freeze of the
#: tree by CRIU itself); the clones of the whole tree where CRIU refuses it (SysV shared memory,
#: io_uring, mixed uids without CAP_SYS_RESOURCE).
TREE_PREFERENCE: tuple[Method, ...] = (Method.CRIU, Method.CLONE)


def choose(requested: Method, facts: TargetFacts, *, tree: bool = False) -> type[Snapshot]:
    """The method that dumps the target: *requested*, or for ``auto`` the first of
    :data:`METHODS` that refuses nothing. Called before anything is frozen.

    :raises BlockerError: the requested method (for ``auto``: every method) refuses the target;
        the message gives the reasons, the hint a method that would accept it, if any.
    """
    order = TREE_PREFERENCE if tree else tuple(METHODS)
    refusals = {m: METHODS[m].refusals(facts, tree=tree) for m in METHODS}
    accepting = [m for m in order if not refusals[m]]
    # auto's choice first: the methods that accept the target and do not decline it
    accepting.sort(key=lambda m: METHODS[m].auto_declines(facts) is not None)
    if requested == Method.AUTO:
        if accepting:
            return METHODS[accepting[0]]
        reasons = dict.fromkeys(r for m in order for r in refusals[m])
        raise BlockerError(facts.pid, "; ".join(reasons))
    if not refusals[requested]:
        return METHODS[requested]
    raise BlockerError(
        facts.pid,
        f"--method {requested}: " + "; ".join(refusals[requested]),
        hint=f"--method {accepting[0]} can dump it" if accepting else None,
    )


def reason(requested: Method, facts: TargetFacts, chosen: type[Snapshot], *, tree: bool) -> str:
    """Why *chosen* dumps the target, in one phrase (for the report): requested, or ``auto``'s
    reasons for passing over the methods it prefers."""
    if requested != Method.AUTO:
        return "requested"
    passed = []
    for m in TREE_PREFERENCE if tree else tuple(METHODS):
        if METHODS[m] is chosen:
            break
        why = METHODS[m].refusals(facts, tree=tree)
        declined = METHODS[m].auto_declines(facts)
        passed.append(f"not {m}: {'; '.join(why) if why else declined}")
    return "auto: " + ("; ".join(passed) if passed else "first choice")
