"""The Linux layer: /proc readers, capabilities, ptrace, the descriptors of mapped files.

Knows nothing of targets, snapshot methods or CRIU; everything above builds on it.
"""

import os

#: The host's page size, for live work (/proc/PID/pagemap indexes, RLIMIT_CORE's one-page
#: minimum). The page size of a set of images is the images' own (converters.images).
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
