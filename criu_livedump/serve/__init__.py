"""``criu-livedump serve``: live dumps for every local user, allowed by the kernel's own rules.

Two doors, one request path: a FUSE filesystem in the livedump patch's shape
(:mod:`.fusefs`: ``echo core_limit=unlimited > /run/livedump/PID/livedump``) and a unix socket
(:mod:`.sock`, one JSON request per connection, used by the stdlib-only :mod:`.client`). Both
hand the requester's kernel-reported credentials and the SPEC words to
:class:`.service.Service`, which decides (target/access.py), bounds (one dump per target, a rate
per uid, a cap on concurrent dumps), runs the dump in a worker process (:mod:`.worker`, the
library's ``live_dump``) and logs every request.
"""
