"""Where a conversion may read mapped files by name: this host's ``/``, a files root the user
gave, a checkpointed container's own root filesystem, or nowhere.

The names in the images are paths as the dumped process saw them, in its own mount namespace,
and chosen by it. They lead to the right files on this host only when the images were dumped
here, by this boot, in this host's mount namespace. The rule, from what the images and the
sidecar record:

- a checkpoint archive (Podman, CRI-O, Kubernetes, or any tar of images) comes from elsewhere:
  its files come from its container's image found in local container storage, with the
  archive's ``rootfs-diff.tar`` laid over it, or from ``--files-root``;
- the sidecar's boot id (written by ``dump``) differs from this host's: another machine, or
  this one before a reboot;
- CRIU recorded a mount id with a file (``reg_file_entry.mnt_id``): it does so only when the
  dumped tree had a mount namespace other than CRIU's (criu/files-reg.c:dump_one_reg_file()),
  and mount ids are reused, so the id itself is not looked up on this host;
- otherwise (``dump``'s images of a host process, or ``criu dump`` run here) the names are
  this host's paths.

A live ``dump`` also hands over descriptors of the mapped files themselves (ConvertOptions.
mapped_fds), which are read whatever the rule says. Every file found, by either way, must still
be the one the images record (:func:`converters.files.identity_mismatch`).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from converters.errors import ArchiveError, ImageFormatError
from converters.files import FileRoot, TarOverlay
from converters.images import ImageSet
from converters.options import ConvertOptions
from converters.sidecar import Sidecar

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def files_for(
    images: ImageSet, options: ConvertOptions, sidecar: Sidecar
) -> tuple[FileRoot, str | None]:
    """The :class:`FileRoot` to read mapped files from by name, and, when it has no root,
    why not (for :func:`summary`).

    :raises ImageFormatError: the archive's rootfs-diff.tar or deleted.files is unreadable.
    """
    ck = options.checkpoint
    overlays: tuple[TarOverlay, ...] = ()
    if ck is not None:
        try:
            loaded = (
                TarOverlay.load(ck.changes, ck.deleted),
                None if ck.devshm is None else TarOverlay.load(ck.devshm, mount="/dev/shm"),
            )
        except (OSError, tarfile.TarError, ArchiveError, ValueError, UnicodeDecodeError) as e:
            raise ImageFormatError(
                str(ck.changes.parent), f"unreadable container files ({e})"
            ) from e
        # /dev/shm first: the tar holds that whole mount, which no other layer may answer for
        overlays = tuple(o for o in reversed(loaded) if o is not None)
    if options.files_root is not None:
        return FileRoot(options.files_root, overlays), None
    if ck is not None and ck.image_root is not None:
        return FileRoot(ck.image_root, overlays), None
    why = foreign(images, options, sidecar)
    return FileRoot(None if why else Path("/"), overlays), why


def foreign(images: ImageSet, options: ConvertOptions, sidecar: Sidecar) -> str | None:
    """Why the images' file names are not this host's paths, or None when they are."""
    ck = options.checkpoint
    if ck is not None:
        if ck.image:
            return (
                f"the images come from a checkpoint archive whose container image {ck.image}"
                " is not in local container storage"
            )
        return "the images come from a checkpoint archive"
    if sidecar.boot_id is not None and sidecar.boot_id != _boot_id():
        return "the images were dumped on another machine, or before this host's last boot"
    mnt_id = images.foreign_mount()
    if mnt_id is not None:
        return f"the images' file names are paths of another mount namespace (mount {mnt_id})"
    return None


def summary(count: int, why: str | None) -> str:
    """The one line saying that *count* mapped files were not read by name, and what to pass."""
    files = "file" if count == 1 else "files"
    return (
        f"{count} mapped {files} not read: {why or 'no files root'}; their bytes are holes"
        " (pass --files-root DIR, the dumped process's root filesystem, to read them)"
    )


def _boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return None
