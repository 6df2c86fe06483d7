"""The target process, read from /proc before anything freezes it: its facts
(:mod:`.facts`), its blockers (:mod:`.blockers`), and the ptrace access rules the caller must
pass (:mod:`.access`). Nothing here stops or changes the target.

The public face is re-exported here.
"""

from criu_livedump.target.access import (
    CallerCreds,
    caller_creds,
    check_ptrace_allowed,
    check_requester_may_dump,
    pid_ns_visible,
    requester_creds,
)
from criu_livedump.target.blockers import (
    GHOST_LIMIT,
    Blocker,
    BlockerKind,
    check_blockers,
    traced,
)
from criu_livedump.target.facts import Ids, TargetFacts, inspect

__all__ = [
    "GHOST_LIMIT",
    "Blocker",
    "BlockerKind",
    "CallerCreds",
    "Ids",
    "TargetFacts",
    "caller_creds",
    "check_blockers",
    "check_ptrace_allowed",
    "check_requester_may_dump",
    "inspect",
    "pid_ns_visible",
    "requester_creds",
    "traced",
]
