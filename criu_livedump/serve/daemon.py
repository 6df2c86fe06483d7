"""``serve``'s process: both doors until SIGTERM."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from criu_livedump.errors import EnvironmentUnfitError
from criu_livedump.serve.service import Service

__all__ = ["run"]


def run(service: Service, mountpoint: Path | None, socket_path: Path | None) -> None:
    """Serve both doors (either may be None) until SIGTERM or SIGINT.

    :raises EnvironmentUnfitError: the socket cannot be bound or FUSE cannot be used.
    """
    from criu_livedump.serve.sock import listening_socket, serve_socket

    stop = threading.Event()
    listener, owned = None, False
    if socket_path is not None:
        try:
            listener, owned = listening_socket(socket_path)
        except OSError as e:
            raise EnvironmentUnfitError(f"{socket_path}: cannot listen: {e.strerror}") from e
    thread = None
    if listener is not None:
        thread = threading.Thread(target=serve_socket, args=(service, listener, stop), daemon=True)
        thread.start()
    service.start()
    try:
        if mountpoint is not None:
            _mount(service, mountpoint)
        else:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            stop.wait()
    finally:
        stop.set()
        service.close()
        if thread is not None:
            thread.join(timeout=5)
        if listener is not None:
            listener.close()
        if owned and socket_path is not None:
            socket_path.unlink(missing_ok=True)


def _mount(service: Service, mountpoint: Path) -> None:
    try:
        from criu_livedump.serve.fusefs import mount
    except (ImportError, OSError) as e:
        raise EnvironmentUnfitError(
            f"FUSE is not usable here ({e})",
            hint="install fuse3 and the project's `serve` extra (make setup does), or use"
            " --no-mount",
        ) from e
    try:
        mount(service, mountpoint)
    except (RuntimeError, OSError) as e:
        raise EnvironmentUnfitError(
            f"{mountpoint}: cannot mount the livedump filesystem: {e}"
        ) from e
