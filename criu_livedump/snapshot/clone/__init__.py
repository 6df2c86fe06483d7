"""The clone method: a copy-on-write clone injected into the target, dumped by CRIU."""
