"""The Linux layer: /proc readers, ptrace, the descriptors of mapped files.

Knows nothing of targets, snapshot methods or CRIU; everything above builds on it.
"""
