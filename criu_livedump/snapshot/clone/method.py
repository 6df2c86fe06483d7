"""The ``clone`` method: the target is frozen only while a copy-on-write clone of it is made
(:mod:`~criu_livedump.snapshot.clone.inject`); CRIU dumps the clone, whose images are then
rewritten to describe the target (:mod:`~criu_livedump.snapshot.clone.images`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from converters.sidecar import DontFork, Sidecar
from criu_livedump import target
from criu_livedump.linux import ptrace
from criu_livedump.linux.mapped_files import close_mapped_files, open_mapped_files
from criu_livedump.linux.procfs import SmapsEntry, read_maps, read_stat
from criu_livedump.request import DumpRequest, Method
from criu_livedump.snapshot import criu
from criu_livedump.snapshot.base import CriuTask, Snapshot, Snapshotted, StreamFacts, TreeMember
from criu_livedump.snapshot.clone import images, inject
from criu_livedump.snapshot.clone.freeze import FreezeSteps
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
    """Freeze the target for the time a fork takes; CRIU dumps the fork, alone. With
    ``--tree``, every process of the tree is frozen at once and each gets its clone
    (:func:`~criu_livedump.snapshot.clone.inject.freeze_tree`), each dumped by its own CRIU."""

    method = Method.CLONE
    stream_refusal = ""

    def __init__(self, facts: TargetFacts, request: DumpRequest, work: Path) -> None:
        super().__init__(facts, request, work)
        #: the target first, then (``--tree``) the other processes of its tree
        self._prepared: list[inject.Prepared] = []
        self._clones: list[inject.Clone] = []
        self._steps = FreezeSteps()
        self._member_facts: dict[int, TargetFacts] = {}
        #: each process's mapped files, opened in its clone, by pid
        self._mapped: dict[int, dict[int, int]] = {}

    @classmethod
    def refusals(cls, facts: TargetFacts, *, tree: bool) -> tuple[str, ...]:
        """The target's own blockers the clone does not deal with (a tracer), and what the
        injection needs: seccomp suspended for a target under seccomp, CRIU run inside the
        target's PID namespace for a target in a child one (the clone is never its init).
        With *tree*, the blockers of every process of the tree count (each gets a clone)."""
        members = set(facts.tree) if tree else {facts.pid}
        reasons = [
            b.sentence(facts.pid)
            for b in facts.blockers
            if b.pid in members and b.refuse and b.kind not in HANDLES
        ]
        if facts.seccomp and (why := ptrace.seccomp_suspension_refusal()) is not None:
            reasons.append(why)
        if facts.state in ("T", "t"):
            # a job-control stop would end in the injected syscall; CRIU leaves it as it was
            reasons.append("it is stopped (state T)")
        if facts.in_child_pid_ns and (why := criu.launcher_refusal()) is not None:
            reasons.append(f"its clone is a process of its PID namespace; {why}")
        return tuple(reasons)

    @classmethod
    def criu_sees(cls, facts: TargetFacts) -> TargetFacts:
        # CRIU dumps the clone alone, which has no children
        return replace(facts, tree=(facts.pid,))

    def prepare(self) -> None:
        members = self.facts.tree if self.request.tree else (self.facts.pid,)
        for pid in members:
            side = self.work / f"side-{pid}"
            side.mkdir(mode=0o700)
            if pid != self.facts.pid:
                # read before the freeze: how CRIU is to run for it
                self._member_facts[pid] = self.criu_sees(target.inspect(pid))
            self._prepared.append(inject.prepare(pid, side))

    def freeze(self) -> None:
        assert self._prepared, "prepare() first"
        # steps 1-5 of inject.py, for every process of the tree at one instant
        self._clones, self._steps = inject.freeze_tree(self._prepared)

    def own_freeze_us(self) -> int | None:
        return round(self._steps.total * 1_000_000) if self._clones else None

    def handoff(self, binary: Criu) -> CriuTask:
        return self._task(self._running_clones()[0], self.facts)

    def tree_handoffs(self, binary: Criu) -> tuple[CriuTask, ...]:
        tasks = []
        for clone in self._running_clones()[1:]:
            facts = self._member_facts[clone.pid]
            task = self._task(clone, facts)
            tasks.append(replace(task, member=facts, images=f"tree-{clone.pid}"))
        return tuple(tasks)

    def _task(self, clone: inject.Clone, facts: TargetFacts) -> CriuTask:
        """CRIU's dump of *clone* (of *facts*' process), its mapped files opened first."""
        # the stopped clone's mappings are the snapshot's; it is killed once its images are
        self._mapped[clone.pid] = open_mapped_files(clone.clone_pid)
        clone.release_for_criu()
        options: dict[str, None] = {}
        for b in self.facts.blockers:
            if b.pid == clone.pid:
                options.update(dict.fromkeys(b.criu_options))
        inside = facts.in_child_pid_ns
        options.update(
            dict.fromkeys(criu.foreign_namespace_options(clone.clone_pid, inside=inside))
        )
        tree = self.facts.tree if self.request.tree else ()
        return CriuTask(
            pid=clone.clone_pid,
            leave_running=False,
            options=tuple(options),
            ns_pid=clone.clone_ns_pid if inside else None,
            # a single clone's snapshot is complete at the freeze whatever its target does
            # next; a tree's cores are written from the live processes' facts, so all must live
            originals=(self.facts.pid, *(p for p in tree if p != self.facts.pid)) if tree else (),
            stream=_stream_facts(clone),
        )

    def complete(self, result: DumpResult, more: Sequence[DumpResult] = ()) -> Snapshotted:
        clones = self._running_clones()
        members: dict[int, TreeMember] = {}
        sidecar = self._images(clones[0], result)
        for clone, res in zip(clones[1:], more, strict=True):
            members[clone.pid] = TreeMember(
                res.images_dir, self._images(clone, res), self._mapped[clone.pid]
            )
        self.mapped_fds = self._mapped.pop(clones[0].pid)
        steps = self._steps
        log.info(
            "%s %d: frozen %.1f ms: stop %.1f, save %.1f, fork %.1f, resume %.1f ms (%s)",
            "tree of process" if len(clones) > 1 else "process", clones[0].pid,
            steps.total * 1e3, steps.stop * 1e3, steps.save * 1e3, steps.fork * 1e3,
            steps.resume * 1e3, "tracer under SCHED_FIFO" if steps.realtime else "no SCHED_FIFO",
        )  # fmt: skip
        return Snapshotted(
            frozen_us=round(steps.total * 1_000_000),
            sidecar=sidecar,
            freeze_steps_us=steps.microseconds(),
            freeze_start_ns=round(steps.started * 1e9),
            members=members,
        )

    def _images(self, clone: inject.Clone, result: DumpResult) -> Sidecar:
        """*clone*'s images rewritten to describe its process; the sidecar's facts of it. The
        clone is killed then, and reaped by :meth:`close`, once the core is written."""
        sysv_keys = images.rewrite_images(result.images_dir, clone, nice=_nice(clone.pid))
        clone.send_kill()
        copied = frozenset((a.start, a.end) for a in clone.fork_lost)
        return clone_facts(clone.smaps, copied=copied, sysv_keys=sysv_keys)

    def close(self) -> None:
        for clone in self._clones:
            clone.kill()
        for prepared in self._prepared:
            prepared.close()
        for fds in self._mapped.values():
            close_mapped_files(fds)
        self._mapped = {}
        super().close()

    def _running_clones(self) -> list[inject.Clone]:
        assert self._clones, "freeze() first"
        return self._clones


def _stream_facts(clone: inject.Clone) -> StreamFacts:
    """What a stream of *clone*'s pages needs: the pages the converter ignores (as
    :func:`clone_facts` lists them), the target's threads, and the names NT_FILE may list
    (the clone's mappings and those put back)."""
    ignored = clone_facts(clone.smaps).no_saved_pages
    names = [m.area.name for m in clone.side_mappings]
    with contextlib.suppress(OSError):
        names += [m.name for m in read_maps(clone.clone_pid)]
    extra = len(clone.side_mappings) + len(clone.fork_lost)
    vmflags = {e.start: e.vmflags for e in clone.smaps}
    return StreamFacts(tuple(ignored), len(clone.threads), tuple(names), extra, vmflags)


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


def _nice(pid: int) -> int | None:
    """The nice of process *pid* (its main thread's, as the kernel's core gives it), or None
    when it cannot be read (the dump then fails on the process's death anyway)."""
    try:
        return read_stat(f"/proc/{pid}/stat").nice
    except (OSError, ValueError):
        return None
