"""The ``criu`` method: CRIU dumps the target itself with ``--leave-running``.

The target's whole tree is frozen while CRIU copies it (CRIU's own ``frozen_time``); optional
``criu pre-dump`` rounds copy most pages first so that the final freeze is shorter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from criu_livedump.linux import ptrace
from criu_livedump.linux.mapped_files import open_mapped_files
from criu_livedump.request import DumpRequest, Method
from criu_livedump.snapshot import criu
from criu_livedump.snapshot.base import CriuTask, Snapshot, Snapshotted
from criu_livedump.snapshot.credentials import mixed_tree_refusal
from criu_livedump.target import TargetFacts

log = logging.getLogger(__name__)

__all__ = ["AUTO_PRE_DUMP_RSS", "CriuSnapshot", "pre_dump_rounds"]

#: Automatic pre-dump: one round for targets at least this large, when dirty tracking exists.
AUTO_PRE_DUMP_RSS = 256 << 20


class CriuSnapshot(Snapshot):
    """CRIU freezes and dumps the target's tree, then lets it run on."""

    method = Method.CRIU

    @classmethod
    def refusals(cls, facts: TargetFacts, *, tree: bool) -> tuple[str, ...]:
        """Every blocker of the tree that no CRIU option works around, and what CRIU needs
        here: seccomp suspended for its parasite (compel/src/lib/infect.c), and, for a process
        of a child PID namespace that is not its init, to run inside that namespace."""
        reasons = [b.sentence(facts.pid) for b in facts.refusals]
        if facts.seccomp and (why := ptrace.seccomp_suspension_refusal()) is not None:
            reasons.append(why)
        if _inside(facts) and (why := criu.launcher_refusal()) is not None:
            reasons.append(f"it is process {facts.ns_pid} of its PID namespace; {why}")
        if tree and (why := mixed_tree_refusal(facts)) is not None:
            reasons.append(why)
        return tuple(reasons)

    def handoff(self, binary: criu.Criu) -> CriuTask:
        rounds = pre_dump_rounds(self.request, binary, self.facts.rss)
        inside = _inside(self.facts)
        options = criu.foreign_namespace_options(self.facts.pid, inside=inside)
        return CriuTask(
            pid=self.facts.pid,
            leave_running=True,
            options=(*self.facts.criu_options, *options),
            pre_dump_rounds=rounds,
            ns_pid=self.facts.ns_pid if inside else None,
            tree=tuple(p for p in self.facts.tree if p != self.facts.pid),
        )

    def complete(
        self, result: criu.DumpResult, more: Sequence[criu.DumpResult] = ()
    ) -> Snapshotted:
        # the target's mappings after the dump, for the converter to read mapped files through
        self.mapped_fds = open_mapped_files(self.facts.pid)
        return Snapshotted(
            frozen_us=result.stats.frozen_time, freezing_us=result.stats.freezing_time
        )


def _inside(facts: TargetFacts) -> bool:
    """CRIU dumps the init of a PID namespace with its namespace from outside; any other process
    of a child namespace only from inside it (criu/namespaces.c: "Can't dump a pid namespace
    without the process init")."""
    return facts.in_child_pid_ns and not facts.pid_ns_init


def pre_dump_rounds(request: DumpRequest, binary: criu.Criu, rss: int) -> int:
    """The pre-dump rounds to run: as requested, one for a large target when not said, none
    without memory dirty tracking (a round would then copy everything for nothing)."""
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
