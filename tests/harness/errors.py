"""The harness's one exception root: it could not set up or observe what a test asked for."""

from __future__ import annotations


class HarnessError(Exception):
    """The harness could not set up or observe what a test asked for."""
