"""Differential-test harness: the kernel's own core of a process is the reference.

Split like the product, one idea per module:

- :mod:`harness.launcher`: start test programs in their own process group, always reaped.
- :mod:`harness.procstate`: what is observed of a live target (maps, threads, rseq via ptrace).
- :mod:`harness.criu`: ``criu dump --leave-running`` as the product runs it.
- :mod:`harness.kernel`: the kernel's core (core_pattern under tests/syslock.py's lock, SIGABRT).
- :mod:`harness.corefile`: the core reader (PT_LOADs, notes, threads by TID); per-architecture
  layouts in :mod:`harness.machine` rows (:mod:`harness.x86_64`).
- :mod:`harness.compare`: the comparator (threads by TID, registers, bytes, notes).
- :mod:`harness.gdb`: gdb's backtraces, LWPs and warnings.
- :mod:`harness.cases`: kernel-comparison cases as data, and how one is run.
- :mod:`harness.instant`: whether a core is one instant of tests/programs/seqwriter.c's writers.

How to add a case, a dumper, a launcher, a destination or an architecture: README.md here.
"""
