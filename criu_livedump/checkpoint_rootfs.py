"""A checkpointed container's own files: its image, from local container storage, under the
changes the archive carries.

``podman container checkpoint --export`` and CRI-O (the Kubernetes kubelet's checkpoint API)
write, beside the CRIU images under ``checkpoint/``: ``config.dump`` (the container's
configuration, naming its image), ``rootfs-diff.tar`` (the files the container changed),
``deleted.files`` (those it deleted) and, from Podman, ``devshm-checkpoint.tar`` (its
/dev/shm). The image's root filesystem is mounted from local storage with ``podman image
mount`` (CRI-O shares that storage) and unmounted afterwards; the tars are read in place
(:class:`converters.files.TarOverlay`).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from converters.archive import open_images
from converters.options import CheckpointFiles, ConvertOptions

#: config.dump keys naming the image: first those holding its id (Podman, CRI-O), then its name
IMAGE_ID_KEYS = ("rootfsImageID", "rootfsImageRef")
IMAGE_NAME_KEYS = ("rootfsImageName", "rootfsImage")
#: a container image reference as podman accepts one; nothing that could pass for an option
_IMAGE_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")
_CONFIG_MAX = 16 << 20
_PODMAN_TIMEOUT = 120.0


@contextlib.contextmanager
def open_checkpoint(
    path: Path, options: ConvertOptions, *, tmp_dir: Path | None = None
) -> Iterator[tuple[Path, ConvertOptions]]:
    """Yield the images directory of *path* (a directory or a checkpoint archive, see
    :func:`converters.archive.open_images`) and *options* completed with where a checkpoint's
    files are (:attr:`ConvertOptions.checkpoint`): set for every archive, and for a directory
    laid out as one (``checkpoint/`` beside ``config.dump``). The container's image stays
    mounted until the block ends.

    :raises ArchiveError: as :func:`converters.archive.open_images`.
    """
    archive = not path.is_dir()
    with open_images(path, tmp_dir=tmp_dir) as images_dir:
        top = images_dir.parent if images_dir.name == "checkpoint" else images_dir
        if not archive and not (top / "config.dump").is_file():
            yield images_dir, options
            return
        image_ids, image_names = image_refs(top / "config.dump")
        # an image recorded by id is looked for by that id only: a name may now stand for
        # another image
        refs = image_ids or image_names
        with _mounted(refs if options.files_root is None else []) as root:
            shown = image_names[0] if image_names else ""
            if image_ids:
                shown = f"{shown} (id {image_ids[0][:12]})" if shown else image_ids[0]
            ck = CheckpointFiles(
                image=shown,
                image_root=root,
                changes=top / "rootfs-diff.tar",
                deleted=top / "deleted.files",
                devshm=top / "devshm-checkpoint.tar",
            )
            yield images_dir, replace(options, checkpoint=ck)


def image_refs(config: Path) -> tuple[list[str], list[str]]:
    """The image ids and the image names *config* (a ``config.dump``) records, each usable
    as an argument to podman; empty lists for an absent or unreadable file."""
    try:
        with config.open("rb") as f:
            data = json.loads(f.read(_CONFIG_MAX))
    except (OSError, ValueError, RecursionError):
        return [], []
    if not isinstance(data, dict):
        return [], []

    def refs(keys: tuple[str, ...]) -> list[str]:
        out = []
        for key in keys:
            value = data.get(key)
            if isinstance(value, str) and _IMAGE_REF.fullmatch(value) and value not in out:
                out.append(value)
        return out

    return refs(IMAGE_ID_KEYS), refs(IMAGE_NAME_KEYS)


@contextlib.contextmanager
def _mounted(refs: list[str]) -> Iterator[Path | None]:
    """The root filesystem of the first of *refs* that local container storage has, mounted,
    or None. Unmounted on exit."""
    podman = shutil.which("podman")
    for ref in refs if podman else []:
        root = _podman(podman, "image", "mount", ref)
        if root is None or not Path(root).is_dir():
            continue
        try:
            yield Path(root)
        finally:
            _podman(podman, "image", "unmount", ref)
        return
    yield None


def _podman(podman: str | None, *args: str) -> str | None:
    """podman's one line of output, or None when it fails."""
    assert podman is not None
    try:
        proc = subprocess.run(
            [podman, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_PODMAN_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if proc.returncode == 0 and lines else None
