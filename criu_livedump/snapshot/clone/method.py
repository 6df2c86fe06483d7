"""The ``clone`` method: the target is frozen only while a copy-on-write clone of it is made
(:mod:`~criu_livedump.snapshot.clone.inject`); CRIU dumps the clone, whose images are then
rewritten to describe the target (:mod:`~criu_livedump.snapshot.clone.images`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from converters.sidecar import DontFork, Sidecar
from criu_livedump.linux import ptrace
from criu_livedump.linux.mapped_files import open_mapped_files
from criu_livedump.linux.procfs import SmapsEntry
from criu_livedump.request import Method
from criu_livedump.snapshot import criu
from criu_livedump.snapshot.base import CriuTask, Snapshot, Snapshotted
from criu_livedump.snapshot.clone import images, inject
from criu_livedump.snapshot.criu import Criu, DumpResult
from criu_livedump.target import BlockerKind, TargetFacts

log = logging.getLogger(__name__)

__all__ = ["HANDLES", "CloneSnapshot", "clone_facts"]

#: Blockers the clone method deals with itself, so CRIU never sees them.
HANDLES = frozenset(
    {
        # copied out of the clone and unmapped there (inject.py, step 5)
        BlockerKind.IO_URING,
        BlockerKind.SYSV_SHM,
        # the clone calls setsid() before CRIU sees it (inject.py, step 5)
        BlockerKind.FOREIGN_SESSION,
    }
)


class CloneSnapshot(Snapshot):
    """Freeze the target for the time a fork takes; CRIU dumps the fork, alone."""

    method = Method.CLONE
    _prepared: inject.Prepared | None = None
    _clone: inject.Clone | None = None

    @classmethod
    def refusals(cls, facts: TargetFacts, *, tree: bool) -> tuple[str, ...]:
        """The target's own blockers the clone does not deal with (a tracer), and what the
        injection needs: seccomp suspended for a target under seccomp, CRIU run inside the
        target's PID namespace for a target in a child one (the clone is never its init)."""
        reasons = [
            b.detail
            for b in facts.blockers
            if b.pid == facts.pid and b.refuse and b.kind not in HANDLES
        ]
        if facts.seccomp and (why := ptrace.seccomp_suspension_refusal()) is not None:
            reasons.append(why)
        if facts.state in ("T", "t"):
            # a job-control stop would end in the injected syscall; CRIU leaves it as it was
            reasons.append("it is stopped (state T)")
        if facts.in_child_pid_ns and (why := criu.launcher_refusal()) is not None:
            reasons.append(f"its clone is a process of its PID namespace; {why}")
        if tree:
            reasons.append("--tree needs the whole process tree, which only CRIU collects")
        return tuple(reasons)

    def prepare(self) -> None:
        side = self.work / "side"
        side.mkdir(mode=0o700)
        self._prepared = inject.prepare(self.facts.pid, side)

    def freeze(self) -> None:
        assert self._prepared is not None, "prepare() first"
        # steps 1-5 of inject.py: the target's freeze is the clone's making
        self._clone = inject.freeze(self._prepared)

    def handoff(self, binary: Criu) -> CriuTask:
        clone = self._running_clone()
        # the stopped clone's mappings are the snapshot's; CRIU kills it when done
        self.mapped_fds = open_mapped_files(clone.clone_pid)
        clone.release_for_criu()
        options: dict[str, None] = {}
        for b in self.facts.blockers:
            if b.pid == self.facts.pid:
                options.update(dict.fromkeys(b.criu_options))
        inside = self.facts.in_child_pid_ns
        options.update(
            dict.fromkeys(criu.foreign_namespace_options(clone.clone_pid, inside=inside))
        )
        return CriuTask(
            pid=clone.clone_pid,
            leave_running=False,
            options=tuple(options),
            ns_pid=clone.clone_ns_pid if inside else None,
        )

    def complete(self, result: DumpResult) -> Snapshotted:
        clone = self._running_clone()
        sysv_keys = images.rewrite_images(result.images_dir, clone)
        copied = frozenset((a.start, a.end) for a in clone.fork_lost)
        sidecar = clone_facts(clone.smaps, copied=copied, sysv_keys=sysv_keys)
        clone.kill()
        steps = clone.freeze_steps
        log.info(
            "process %d: frozen %.1f ms: stop %.1f, save %.1f, fork %.1f, resume %.1f ms (%s)",
            clone.pid, steps.total * 1e3, steps.stop * 1e3, steps.save * 1e3, steps.fork * 1e3,
            steps.resume * 1e3, "tracer under SCHED_FIFO" if steps.realtime else "no SCHED_FIFO",
        )  # fmt: skip
        return Snapshotted(
            frozen_us=round(steps.total * 1_000_000),
            sidecar=sidecar,
            freeze_steps_us=steps.microseconds(),
            freeze_start_ns=round(steps.started * 1e9),
        )

    def close(self) -> None:
        if self._clone is not None:
            self._clone.kill()
        if self._prepared is not None:
            self._prepared.close()
        super().close()

    def _running_clone(self) -> inject.Clone:
        assert self._clone is not None, "freeze() first"
        return self._clone


def clone_facts(
    smaps: Iterable[SmapsEntry],
    *,
    copied: frozenset[tuple[int, int]] = frozenset(),
    sysv_keys: Mapping[int, int] | None = None,
) -> Sidecar:
    """What a clone shows differently from its target, from the target's *smaps* (read once,
    before the freeze: :attr:`criu_livedump.snapshot.clone.inject.Clone.smaps`), and the keys
    of the SysV segments put back by shmid (*sysv_keys*, for their NT_FILE names).

    - ``no_saved_pages``: ``[start, end]`` of every private file mapping without anonymous
      pages. CRIU's compel briefly writes a syscall instruction into the first executable VMA
      of the task it infects (and restores it), which leaves a copy-on-write page there; in
      the clone that page is CRIU's doing, not the target's, and the converter ignores it.
    - ``dontfork``: ``[start, end, perms, has_bytes]`` of MADV_DONTFORK areas (``dc``,
      VM_DONTCOPY), absent from a clone; ``wipeonfork``: ``[start, end]`` of MADV_WIPEONFORK
      areas (``wf``), empty in it (kernel/fork.c: dup_mmap()). The clone method copies the
      anonymous ones' pages from the frozen target (fork_lost.py), and the converter ignores
      an entry the images cover; others are listed without bytes, and named when *has_bytes*
      (an untouched area has none to miss). Areas in *copied* (``(start, end)``) are left out.
    """
    no_saved: list[tuple[int, int]] = []
    dontfork: list[DontFork] = []
    wipeonfork: list[tuple[int, int]] = []
    for e in smaps:
        if e.perms.endswith("p") and e.inode != 0 and e.anon_kb == 0:
            no_saved.append((e.start, e.end))
        if (e.start, e.end) in copied:
            continue
        if "dc" in e.vmflags:
            dontfork.append(DontFork(e.start, e.end, e.perms, e.anon_kb > 0 or e.inode != 0))
        elif "wf" in e.vmflags:
            wipeonfork.append((e.start, e.end))
    return Sidecar(
        sysv_keys=dict(sysv_keys or {}),
        no_saved_pages=tuple(no_saved),
        dontfork=tuple(dontfork),
        wipeonfork=tuple(wipeonfork),
    )
