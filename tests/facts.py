"""Target facts built by hand, for tests that decide on facts without a live process."""

from __future__ import annotations

import dataclasses

from criu_livedump.request import UNLIMITED
from criu_livedump.target import Ids, TargetFacts

FACTS = TargetFacts(
    pid=4321,
    ns_pid=7,
    nstgid=(4321, 7),
    ppid=1,
    comm="my/app",
    exe="/opt/my app/bin/server",
    cmdline=("server", "--port", "80"),
    uids=Ids(1000, 1001, 1002, 1003),
    gids=Ids(2000, 2001, 2002, 2003),
    cap_inh=0,
    cap_prm=0,
    cap_eff=0,
    cap_bnd=0,
    cap_amb=0,
    dumpable=1,
    dumpable_source="pidfd",
    core_soft=8192,
    core_hard=UNLIMITED,
    coredump_filter=0x33,
    cwd="/home/u/work",
    root="/",
    same_mnt_ns=True,
    rss=0,
    threads=(4321, 4322),
    state="S",
    tracer_pid=0,
    seccomp=0,
    nodename="host.example",
    cpu=1,
    user_ns=1,
)


def facts(**changes: object) -> TargetFacts:
    """:data:`FACTS` with *changes*."""
    return dataclasses.replace(FACTS, **changes)  # type: ignore[arg-type]
