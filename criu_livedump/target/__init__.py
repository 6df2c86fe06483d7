"""The target process, read from /proc before anything freezes it: facts, blockers, access.

The public face is re-exported here; :mod:`criu_livedump.target.facts` holds it.
"""

from criu_livedump.target.facts import (
    GHOST_LIMIT,
    Blocker,
    BlockerKind,
    CallerCreds,
    Ids,
    TargetFacts,
    caller_creds,
    check_blockers,
    check_ptrace_allowed,
    inspect,
    traced,
)

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
    "inspect",
    "traced",
]
