"""criu-livedump: core dumps of running processes via CRIU, the target left running."""

__version__ = "0.1.0"
