"""The snapshot protocol: one way of getting CRIU's images of a running target.

:func:`criu_livedump.dump.live_dump` drives every method through the same steps, in order:

1. :meth:`Snapshot.refusals` (a class method, on the target's facts): why the method cannot
   dump this target, checked before anything is frozen; :func:`criu_livedump.snapshot.choose`
   reads every method's refusals to pick one (``auto``) or to name one that would work.
2. :meth:`Snapshot.prepare`: what can be done while the target still runs.
3. :meth:`Snapshot.freeze`: the freeze the method does itself, if any (CRIU freezes a target
   it dumps on its own).
4. :meth:`Snapshot.handoff`: the process CRIU dumps, and how (:class:`CriuTask`); CRIU runs.
5. :meth:`Snapshot.complete`: the images made to describe the target, and what the report and
   the converter need to know (:class:`Snapshotted`).
6. :meth:`Snapshot.close`: cleanup, whatever happened (the ``with`` block's exit).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from converters.sidecar import Sidecar
from criu_livedump.linux.mapped_files import close_mapped_files
from criu_livedump.request import DumpRequest, Method
from criu_livedump.snapshot.criu import Criu, DumpResult
from criu_livedump.target import TargetFacts

__all__ = ["CriuTask", "Snapshot", "Snapshotted", "StreamFacts", "TreeMember"]


@dataclass(frozen=True)
class StreamFacts:
    """What a streamed capture (criu_livedump/stream.py) must know of the dumped process before
    CRIU sends its first page, from a method whose dumped process does not change meanwhile.

    :param ignored: ``(start, end)`` of the VMAs whose saved pages the converter ignores
        (the sidecar's ``no_saved_pages``): their pages are dropped, never written.
    :param threads: how many threads the core lists (one note set each).
    :param names: the names of every mapping the core may list in NT_FILE, those the method
        puts back included.
    :param extra_vmas: how many VMAs the method may add to the dumped process's own.
    :param vmflags: the VmFlags of the dumped process's VMAs by start, as read before the
        freeze (/proc/PID/smaps walks every page table: 0.6 s for 1 GiB here, not to be read
        twice): MADV_DONTDUMP areas are dropped, hugetlb ones refused.
    """

    ignored: tuple[tuple[int, int], ...]
    threads: int
    names: tuple[str, ...]
    extra_vmas: int
    vmflags: Mapping[int, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class CriuTask:
    """What CRIU is asked to dump.

    :param pid: the root of the tree CRIU collects.
    :param leave_running: *pid* is the target, which must run on after CRIU; False for a
        disposable copy, which CRIU leaves running too and the snapshot kills.
    :param options: CRIU options the target's blockers ask for (``--external ...``).
    :param pre_dump_rounds: ``criu pre-dump`` rounds before the dump.
    :param ns_pid: *pid*'s id in its own PID namespace when CRIU is to run inside that namespace
        (:func:`criu_livedump.snapshot.criu.in_pid_namespace`), else None.
    :param tree: the other processes CRIU collects with *pid* (its descendants), watched with it.
    :param originals: the processes the dumped copies stand for (``--tree`` through clones: the
        whole tree, its root first), which CRIU does not see: the death of any of them while
        CRIU runs fails the dump at once (the tree's cores would be partial).
    :param member: for a further task of a tree (:meth:`Snapshot.tree_handoffs`): the tree's
        process it stands for, read as CRIU is to see it (CRIU runs with its credentials),
        and *images* the directory of the work directory its images go to.
    """

    pid: int
    leave_running: bool
    options: tuple[str, ...] = ()
    pre_dump_rounds: int = 0
    ns_pid: int | None = None
    tree: tuple[int, ...] = ()
    originals: tuple[int, ...] = ()
    member: TargetFacts | None = None
    images: str = ""
    #: set when CRIU's pages may stream straight into the core (:class:`StreamFacts`)
    stream: StreamFacts | None = None


@dataclass(frozen=True)
class TreeMember:
    """A process of the tree whose images CRIU wrote apart (:meth:`Snapshot.tree_handoffs`):
    where they are, the facts only the method knows, and its mapped files' descriptors (held
    by the snapshot, closed by its :meth:`Snapshot.close`)."""

    images_dir: Path
    sidecar: Sidecar
    mapped_fds: Mapping[int, int]


@dataclass(frozen=True)
class Snapshotted:
    """What a finished snapshot tells the report and the converter.

    :param frozen_us: how long the target was frozen, in microseconds.
    :param freezing_us: how long freezing it took, where the method measures that apart.
    :param sidecar: facts for ``livedump.json`` that only this method knows.
    :param freeze_steps_us: the freeze split into its steps (``stop``, ``save``, ``fork``,
        ``resume`` for the clone), in microseconds, where the method times them.
    :param freeze_start_ns: when the freeze began (CLOCK_MONOTONIC), where the method knows.
    :param members: with ``--tree``, the processes whose images are apart, by pid (the others'
        are in the target's images).
    :param method: the method that ran instead of the chosen one (a fallback), and
        *method_reason* why.
    :param precopy: method precopy's rounds (bytes found written, bytes copied, time) and its
        copy inside the freeze, as ``--json`` gives them.
    """

    frozen_us: int
    freezing_us: int = 0
    sidecar: Sidecar = field(default_factory=Sidecar)
    freeze_steps_us: Mapping[str, int] = field(default_factory=dict)
    freeze_start_ns: int = 0
    members: Mapping[int, TreeMember] = field(default_factory=dict)
    #: the method that ran, when it fell back from the one chosen (precopy -> clone), and why
    method: str = ""
    method_reason: str = ""
    #: method precopy's rounds and its copy inside the freeze, for ``--json``
    precopy: Mapping[str, Any] = field(default_factory=dict)


class Snapshot(ABC):
    """One snapshot method (see the module docstring for the order of the steps).

    :param facts: the target, as :func:`criu_livedump.target.inspect` read it (with its tree).
    :param request: the dump's request.
    :param work: the dump's private scratch directory (CRIU's rounds go below it).
    """

    #: the ``--method`` value that selects it
    method: ClassVar[Method]
    #: why CRIU's pages cannot stream into the core under this method ("" when they can,
    #: and :attr:`CriuTask.stream` then says what the stream needs)
    stream_refusal: ClassVar[str] = (
        "CRIU dumps the target itself, and a stream that fails would end CRIU with the"
        " target frozen or killed"
    )

    def __init__(self, facts: TargetFacts, request: DumpRequest, work: Path) -> None:
        self.facts = facts
        self.request = request
        self.work = work
        #: ``{vma start: fd}`` of the files the dumped process maps, for the converter; closed
        #: by :meth:`close`
        self.mapped_fds: dict[int, int] = {}

    @classmethod
    @abstractmethod
    def refusals(cls, facts: TargetFacts, *, tree: bool) -> tuple[str, ...]:
        """Why this method cannot dump the target, one sentence each; empty when it can.

        :param tree: the request wants a core of every process of the target's tree.
        """

    @classmethod
    def auto_declines(cls, facts: TargetFacts) -> str | None:
        """Why ``auto`` should take a later method of the table for this target although this
        one can dump it (a measured comparison), or None."""
        del facts
        return None

    def prepare(self) -> None:  # noqa: B027 - optional step
        """Work done before the freeze, while the target runs (none by default)."""

    def freeze(self) -> None:  # noqa: B027 - optional step
        """The method's own freeze of the target (none by default: CRIU freezes it)."""

    def own_freeze_us(self) -> int | None:
        """Once :meth:`freeze` has returned: how long the method's own freeze lasted, in
        microseconds, if the target already runs again (progress shows it before CRIU runs);
        None when the target is still to be frozen by CRIU (the default)."""
        return None

    @abstractmethod
    def handoff(self, binary: Criu) -> CriuTask:
        """The process CRIU is to dump, ready for it."""

    @classmethod
    def criu_sees(cls, facts: TargetFacts) -> TargetFacts:
        """The target as the CRIU that dumps it sees it (whose credentials it takes): by
        default the target with its tree."""
        return facts

    def tree_handoffs(self, binary: Criu) -> tuple[CriuTask, ...]:
        """With ``--tree``, the further CRIU dumps the method needs, one per process of the
        tree whose images are apart (none by default: CRIU collects the tree)."""
        del binary
        return ()

    @abstractmethod
    def complete(self, result: DumpResult, more: Sequence[DumpResult] = ()) -> Snapshotted:
        """After CRIU: make the images describe the target; what the report needs. *more*:
        the results of :meth:`tree_handoffs`' dumps, in their order."""

    def close(self) -> None:
        """Release whatever the snapshot holds; idempotent, never raises."""
        close_mapped_files(self.mapped_fds)
        self.mapped_fds = {}

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
