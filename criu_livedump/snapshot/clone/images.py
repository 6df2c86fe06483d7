"""Step 6 of the clone snapshot: make CRIU's images of the clone describe the original process.

CRIU dumped a one-thread fork; the rewritten set is what ``criu dump -t PID`` would have written
for the original, as far as a core needs it, so that the converter (and ``crit``) see an
ordinary image set:

- ``pstree.img``: the original pid, its pgid and sid (the clone ran setsid()), every thread id;
- ``core-TID.img`` per original thread, from the clone's core as template: task-level fields
  (``tc``) for the leader only, per-thread registers and FP state from the freeze, stored as
  CRIU stores them (the arch's ``image_thread_info``), blocked signals, comm;
- ``mm``/``pagemap``/``ids``/``fs``/``core`` renamed from the clone's pid;
- mappings copied out of the clone (SysV shm, io_uring rings) put back as VMAs, their bytes in
  a shmem pagemap and pages image of their own.

Not known per thread from ptrace and copied from the injecting thread or left empty (none of it
is in a core): sigaltstack, clear_tid_addr, GDT TLS entries, credentials, scheduling policy.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Final

from converters.arch import by_criu_mtype
from converters.elf import PAGE_SIZE
from converters.images import (
    MADV_DONTDUMP,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PE_PARENT,
    PE_PRESENT,
    VMA_ANON_PRIVATE,
    VMA_ANON_SHARED,
    VMA_AREA_REGULAR,
    VMA_AREA_SYSVIPC,
    VMA_FILE_SHARED,
    dump_image,
    load_image,
    pagemap_runs,
    prot_from_perms,
)
from criu_livedump.errors import CloneImagesError
from criu_livedump.linux import punch_hole
from criu_livedump.snapshot.clone.fork_lost import ForkLostArea
from criu_livedump.snapshot.clone.freeze import ThreadState
from criu_livedump.snapshot.clone.inject import Clone, SideMapping

O_RDWR: Final = 2
SS_DISABLE: Final = 2


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CloneImagesError(f"{path}: missing from the clone's images")
    return load_image(path)


def _entry(image: dict[str, Any], path: Path) -> dict[str, Any]:
    entries = image.get("entries") or []
    if len(entries) != 1:
        raise CloneImagesError(f"{path}: {len(entries)} entries, expected 1")
    entry: dict[str, Any] = entries[0]
    return entry


def rewrite_images(images_dir: Path, snap: Clone, *, nice: int | None = None) -> dict[int, int]:
    """Rewrite CRIU's images of ``snap.clone_pid`` in *images_dir* to describe ``snap.pid``.

    *nice*, when given, is every thread's ``sched_nice`` (the target's: the clone CRIU dumped
    may have run at the capture's nice instead, as the dump gives it).

    The images name processes and threads by their ids in the target's PID namespace (CRIU
    ran there for a target inside a child namespace), so they are rewritten with those ids.

    :returns: what the images cannot carry, for the sidecar: the key of each SysV segment put
        back, by shmid, for its NT_FILE name.

    :raises CloneImagesError: an image CRIU should have written is missing or malformed.
    :raises converters.errors.ConversionError: an image cannot be decoded or encoded.
    """
    cpid, pid = snap.clone_ns_pid or snap.clone_pid, snap.ns_pid or snap.pid
    _rewrite_pstree(images_dir, snap)

    template_path = images_dir / f"core-{cpid}.img"
    template = _load(template_path)
    leader = snap.pid if any(t.tid == snap.pid for t in snap.threads) else snap.threads[0].tid
    for t in snap.threads:
        core = _thread_core(template, template_path, t, snap, leader=t.tid == leader)
        if nice is not None:
            core["entries"][0]["thread_core"]["sched_nice"] = nice
        dump_image(images_dir / f"core-{t.ns_tid or t.tid}.img", core)
    if cpid not in {t.ns_tid or t.tid for t in snap.threads}:
        template_path.unlink()

    for stem in ("mm", "pagemap", "ids", "fs"):
        src = images_dir / f"{stem}-{cpid}.img"
        if src.exists():
            os.replace(src, images_dir / f"{stem}-{pid}.img")
    if snap.fork_lost:
        _add_fork_lost(images_dir, pid, snap.fork_lost)
    if snap.side_mappings:
        return _add_side_mappings(images_dir, pid, snap.side_mappings)
    return {}


def _rewrite_pstree(images_dir: Path, snap: Clone) -> None:
    path = images_dir / "pstree.img"
    image = _load(path)
    item = _entry(image, path)
    cpid = snap.clone_ns_pid or snap.clone_pid
    if int(item["pid"]) != cpid:
        raise CloneImagesError(f"{path}: describes process {item['pid']}, not clone {cpid}")
    item["pid"] = snap.ns_pid or snap.pid
    item["pgid"] = snap.pgid
    item["sid"] = snap.sid
    item["threads"] = [t.ns_tid or t.tid for t in snap.threads]
    dump_image(path, image)


def _thread_core(
    template: dict[str, Any], path: Path, t: ThreadState, snap: Clone, *, leader: bool
) -> dict[str, Any]:
    src = _entry(template, path)
    core: dict[str, Any] = {"mtype": src["mtype"]}
    arch = by_criu_mtype(str(src["mtype"]), str(path))
    info = arch.image_thread_info(
        src[arch.thread_info_field], t.regs, t.fpstate, t.other, t.tid == snap.injector_tid
    )
    if t.tid != snap.injector_tid:
        info["clear_tid_addr"] = 0
    core[arch.thread_info_field] = info

    tcore = dict(src.get("thread_core") or {})
    tcore["comm"] = t.comm or tcore.get("comm", "")
    tcore["blk_sigset"] = t.sigmask
    if t.tid != snap.injector_tid:
        tcore["sas"] = {"ss_sp": 0, "ss_size": 0, "ss_flags": SS_DISABLE}
        tcore.pop("rseq_entry", None)
        tcore["futex_rla"] = 0
    core["thread_core"] = tcore
    if leader and "tc" in src:
        tc = dict(src["tc"])
        tc["blk_sigset"] = t.sigmask
        tc["comm"] = t.comm or tc.get("comm", "")
        core["tc"] = tc
    return {"magic": template["magic"], "entries": [core]}


# --- side mappings ------------------------------------------------------------------------------


_PAGES_RE: Final = re.compile(r"pages-(\d+)\.img$")


def _next_pages_id(images_dir: Path) -> int:
    ids = [int(m.group(1)) for p in images_dir.iterdir() if (m := _PAGES_RE.match(p.name))]
    return max(ids, default=0) + 1


def _add_side_mappings(images_dir: Path, pid: int, side: tuple[SideMapping, ...]) -> dict[int, int]:
    """Put the copied-out mappings back as VMAs, the way CRIU records such memory.

    SysV segments become what CRIU writes for them in an IPC namespace dump
    (criu/proc_parse.c: ``vma_get_mapfile()``: ANON_SHARED | SYSVIPC, shmid = the inode, which
    /proc shows as the segment id), their bytes in ``pagemap-shmem-SHMID.img``. io_uring rings
    are shared mappings of a file (``anon_inode:[io_uring]``, whose inode has one link, so the
    kernel's vma_dump_size() files them under MAPPED_SHARED); their bytes are kept the same way.
    """
    mm_path = images_dir / f"mm-{pid}.img"
    mm_image = _load(mm_path)
    mm = _entry(mm_image, mm_path)
    files_path = images_dir / "files.img"
    files: dict[str, Any] = (
        load_image(files_path) if files_path.exists() else {"magic": "FILES", "entries": []}
    )
    next_file_id = max((int(e.get("id", 0)) for e in files["entries"]), default=0) + 1
    used_shmids = {int(v.get("shmid", 0)) for v in mm["vmas"]}
    sysv_keys: dict[int, int] = {}

    for m in side:
        shmid = m.area.inode
        vma: dict[str, Any] = {
            "start": m.area.start,
            "end": m.area.end,
            "pgoff": m.area.pgoff,
            "prot": prot_from_perms(m.area.perms),
            "fd": -1,
        }
        if m.kind == "sysv":
            vma["flags"] = MAP_SHARED | MAP_ANONYMOUS
            vma["status"] = VMA_AREA_REGULAR | VMA_ANON_SHARED | VMA_AREA_SYSVIPC
        else:
            shmid = next_file_id
            next_file_id += 1
            files["entries"].append(_file_entry(shmid, m.area.name))
            vma["flags"] = MAP_SHARED
            vma["status"] = VMA_AREA_REGULAR | VMA_FILE_SHARED
        while shmid in used_shmids and m.kind == "sysv":
            shmid += 1 << 32  # keep clear of any shmem object CRIU saved itself
        used_shmids.add(shmid)
        if m.kind == "sysv" and (key := _SYSV_NAME.match(m.area.name)):
            sysv_keys[shmid] = int(key.group(1), 16)
        vma["shmid"] = shmid
        mm["vmas"].append(vma)
        if m.data_file is not None:
            _write_shmem_pages(images_dir, shmid, m)

    mm["vmas"].sort(key=lambda v: int(v["start"]))
    dump_image(mm_path, mm_image)
    if any(m.kind != "sysv" for m in side):
        dump_image(files_path, files)
    return sysv_keys


# --- what the fork did not copy -------------------------------------------------------------------


def _add_fork_lost(images_dir: Path, pid: int, areas: tuple[ForkLostArea, ...]) -> None:
    """Give the images the pages of MADV_DONTFORK / MADV_WIPEONFORK areas that were copied
    from the frozen target (:mod:`criu_livedump.snapshot.clone.fork_lost`).

    A DONTFORK area gets its VMA back (anonymous private, as CRIU records one); a WIPEONFORK
    area is in the images already, empty. The pages go into ``parent/``, a one-level image
    chain as ``criu pre-dump`` makes (criu/page-xfer.c): the main pagemap gains PE_PARENT
    entries, which take no room in its pages file, so CRIU's own pagemap and pages stay as
    they are and no gigabytes are copied to insert a few megabytes.
    """
    mm_path = images_dir / f"mm-{pid}.img"
    mm_image = _load(mm_path)
    vmas: list[dict[str, Any]] = _entry(mm_image, mm_path)["vmas"]
    runs: list[tuple[int, int, int, Path]] = []
    added = False
    for a in areas:
        inside = [v for v in vmas if int(v["start"]) < a.end and a.start < int(v["end"])]
        if a.kind == "dontfork":
            if inside:
                continue  # the clone has it after all: not DONTFORK at the fork
            vmas.append(
                {
                    "start": a.start,
                    "end": a.end,
                    "pgoff": a.pgoff,
                    "shmid": 0,
                    "prot": prot_from_perms(a.perms),
                    "flags": MAP_PRIVATE | MAP_ANONYMOUS,
                    "status": VMA_AREA_REGULAR | VMA_ANON_PRIVATE,
                    "fd": -1,
                    **({"madv": 1 << MADV_DONTDUMP} if a.dontdump else {}),
                }
            )
            added = True
        elif len(inside) != 1 or not int(inside[0]["start"]) <= a.start < a.end <= int(
            inside[0]["end"]
        ):
            continue
        runs.extend((lo, length, offset, a.data_file) for lo, length, offset in a.runs)
    if added:
        vmas.sort(key=lambda v: int(v["start"]))
        dump_image(mm_path, mm_image)
    if not runs:
        return
    runs.sort()
    pagemap_path = images_dir / f"pagemap-{pid}.img"
    pagemap = load_image(pagemap_path)
    head, entries = pagemap["entries"][0], pagemap["entries"][1:]
    taken = [(v, v + n * PAGE_SIZE) for v, n, _ in pagemap_runs(pagemap_path)]
    runs = [r for r in runs if not any(lo < r[0] + r[1] and r[0] < hi for lo, hi in taken)]
    parent = images_dir / "parent"
    parent.mkdir(mode=0o700)
    with (parent / "pages-1.img").open("wb") as dst:
        for lo, length, offset, src_path in runs:
            # each run freed from its side file once copied: the scratch holds them once
            _append(dst, src_path, offset, length, f"the pages at {lo:#x}", release=True)
    dump_image(
        parent / f"pagemap-{pid}.img",
        {"magic": "PAGEMAP", "entries": [{"pages_id": 1}, *_pagemap_entries(runs, PE_PRESENT)]},
    )
    entries += _pagemap_entries(runs, PE_PARENT)
    entries.sort(key=lambda e: int(e["vaddr"]))
    pagemap["entries"] = [head, *entries]
    dump_image(pagemap_path, pagemap)


def _append(
    dst: BinaryIO, src_path: Path, offset: int, length: int, what: str, *, release: bool = False
) -> None:
    """Append *length* bytes of side file *src_path* from *offset* to *dst* (and, to
    *release* them, punch them out of *src_path* after)."""
    with src_path.open("r+b" if release else "rb") as src:
        done = 0
        while done < length:
            n = os.copy_file_range(src.fileno(), dst.fileno(), length - done, offset + done)
            if n == 0:
                raise CloneImagesError(f"{src_path}: short copy of {what}")
            done += n
        if release:
            punch_hole(src.fileno(), offset, length)


def _pagemap_entries(runs: list[tuple[int, int, int, Path]], flags: int) -> list[dict[str, Any]]:
    return [
        {"vaddr": lo, "compat_nr_pages": 0, "nr_pages": n // PAGE_SIZE, "flags": flags}
        for lo, n, _, _ in runs
    ]


#: /proc/PID/maps name of a SysV segment: the key in hex (ipc/shm.c newseg() "SYSV%08x")
_SYSV_NAME = re.compile(r"/SYSV([0-9a-f]{8})")


def _file_entry(file_id: int, name: str) -> dict[str, Any]:
    return {
        "type": "REG",
        "id": file_id,
        "reg": {
            "id": file_id,
            "flags": O_RDWR,
            "pos": 0,
            "fown": {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0},
            "name": name,
        },
    }


def _write_shmem_pages(images_dir: Path, shmid: int, m: SideMapping) -> None:
    assert m.data_file is not None
    pages_id = _next_pages_id(images_dir)
    length = m.area.end - m.area.start
    with (images_dir / f"pages-{pages_id}.img").open("wb") as dst:
        _append(dst, m.data_file, m.data_offset, length, f"{m.area.name} at {m.area.start:#x}")
    # A shmem pagemap is addressed by offset in the object (criu/shmem.c: dump_one_shmem()).
    dump_image(
        images_dir / f"pagemap-shmem-{shmid}.img",
        {
            "magic": "PAGEMAP",
            "entries": [
                {"pages_id": pages_id},
                {
                    "vaddr": m.area.pgoff,
                    "compat_nr_pages": 0,
                    "nr_pages": length // PAGE_SIZE,
                    "flags": PE_PRESENT,
                },
            ],
        },
    )
