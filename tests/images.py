"""Synthetic CRIU image sets, written with pycriu, for unit, bad-input and fuzz tests.

A :class:`Proc` describes one process (threads, VMAs, saved pages, argument area); :func:`build`
writes pstree, core-TID, mm-PID, pagemap-PID + pages-N, files.img and memfd images for a list
of them, in the shapes ``crit decode --pretty`` shows for a real ``criu dump`` (CRIU 4.2).
Images are written through ``pycriu.images.dump`` from their dict form, so a fixture is only
as wrong as pycriu lets it be.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pycriu.images as pyimages
from pycriu.images import pb

PAGE = 4096

# criu/include/image.h VMA_* status bits (the subset fixtures use)
VMA_AREA_REGULAR = 1 << 0
VMA_AREA_STACK = 1 << 1
VMA_AREA_VSYSCALL = 1 << 2
VMA_AREA_VDSO = 1 << 3
VMA_AREA_HEAP = 1 << 5
VMA_FILE_PRIVATE = 1 << 6
VMA_FILE_SHARED = 1 << 7
VMA_ANON_SHARED = 1 << 8
VMA_ANON_PRIVATE = 1 << 9
VMA_AREA_VVAR = 1 << 12
VMA_AREA_MEMFD = 1 << 14
VMA_AREA_GUARD = 1 << 16

# criu/include/pagemap.h
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

PROT_R, PROT_W, PROT_X = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20

#: where the default stack (and argument area) of a synthetic process lives
STACK_START = 0x7FFD_0000_0000
STACK_PAGES = 4


def vma(
    start: int,
    end: int,
    *,
    prot: int = PROT_R | PROT_W,
    flags: int = MAP_PRIVATE | MAP_ANONYMOUS,
    status: int = VMA_AREA_REGULAR | VMA_ANON_PRIVATE,
    pgoff: int = 0,
    shmid: int = 0,
    madv: int = 0,
) -> dict[str, Any]:
    """A ``vma_entry`` in pycriu's dict form."""
    entry: dict[str, Any] = {
        "start": start,
        "end": end,
        "pgoff": pgoff,
        "shmid": shmid,
        "prot": prot,
        "flags": flags,
        "status": status,
        "fd": -1,
    }
    if madv:
        entry["madv"] = madv
    return entry


def file_vma(start: int, end: int, file_id: int, *, pgoff: int = 0, prot: int = PROT_R,
             shared: bool = False) -> dict[str, Any]:  # fmt: skip
    """A file-backed ``vma_entry`` mapping files.img entry *file_id*."""
    return vma(
        start,
        end,
        prot=prot,
        flags=MAP_SHARED if shared else MAP_PRIVATE,
        status=VMA_AREA_REGULAR | (VMA_FILE_SHARED if shared else VMA_FILE_PRIVATE),
        pgoff=pgoff,
        shmid=file_id,
    )


def gpregs(**overrides: int) -> dict[str, Any]:
    """``user_x86_regs_entry``: a thread sitting in user space (not in a syscall)."""
    regs: dict[str, Any] = dict.fromkeys(
        ("r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx", "dx",
         "si", "di", "ds", "es", "fs", "gs", "gs_base"),
        0,
    )  # fmt: skip
    regs.update(
        orig_ax=(1 << 64) - 1,  # -1: not in a syscall
        ip=0x401000,
        cs=0x33,
        flags=0x246,
        sp=STACK_START + PAGE,
        ss=0x2B,
        fs_base=0x7F00_0000_1000,
    )
    regs.update(overrides)
    regs["mode"] = "NATIVE"
    return regs


def fpregs(seed: int = 0) -> dict[str, Any]:
    """``user_x86_fpregs_entry`` with an xsave part, recognisable per *seed*."""
    return {
        "cwd": 0x37F,
        "swd": 0,
        "twd": 0,
        "fop": 0,
        "rip": 0,
        "rdp": 0,
        "mxcsr": 0x1F80,
        "mxcsr_mask": 0x2FFFF,
        "st_space": [0] * 32,
        "xmm_space": [(seed + i) & 0xFFFFFFFF for i in range(64)],
        "padding": [0] * 24,
        "xsave": {"xstate_bv": 7, "ymmh_space": [(seed * 3 + i) & 0xFFFF for i in range(64)]},
    }


@dataclass
class Proc:
    """One synthetic process.

    :param pages: ``(vaddr, bytes)`` saved as present pages, in pagemap order (may be unsorted).
    :param parent_runs: ``(vaddr, nr_pages)`` entries flagged ``in_parent``.
    :param lazy_runs: ``(vaddr, nr_pages)`` entries flagged lazy (bytes not in this image set).
    :param argv: the argument area; stored at the start of the stack's last page.
    """

    pid: int
    threads: list[int] | None = None
    ppid: int = 1
    pgid: int | None = None
    sid: int | None = None
    comm: str = "synthetic"
    argv: bytes = b"synthetic\0--flag\0"
    vmas: list[dict[str, Any]] = field(default_factory=list)
    pages: list[tuple[int, bytes]] = field(default_factory=list)
    parent_runs: list[tuple[int, int]] = field(default_factory=list)
    lazy_runs: list[tuple[int, int]] = field(default_factory=list)
    auxv: list[int] = field(default_factory=lambda: [6, PAGE, 25, STACK_START + 16, 0, 0])
    mtype: str = "X86_64"
    regs: dict[int, dict[str, int]] = field(default_factory=dict)
    uid: int = 1000
    gid: int = 1000
    pages_id: int | None = None
    #: add the default stack VMA holding argv (False: *vmas* are the whole address space)
    with_stack: bool = True
    #: pagemap flags of saved pages (CRIU marks anonymous ones PE_LAZY|PE_PRESENT)
    present_flags: int = PE_PRESENT
    #: which CRIU's pagemap_entry layout to write (a key of :data:`PAGEMAP_LAYOUTS`)
    pagemap_layout: str = "4.2"
    #: MADV_GUARD_INSTALL ranges, written as CRIU >= 4.2 does: VMA_AREA_GUARD entries after
    #: the real VMAs (criu/mem.c:collect_madv_guards())
    guards: list[tuple[int, int]] = field(default_factory=list)

    @property
    def arg_start(self) -> int:
        return STACK_START + (STACK_PAGES - 1) * PAGE

    def all_vmas(self) -> list[dict[str, Any]]:
        out = list(self.vmas)
        if self.with_stack:
            out.append(
                vma(
                    STACK_START,
                    STACK_START + STACK_PAGES * PAGE,
                    status=VMA_AREA_REGULAR | VMA_ANON_PRIVATE | VMA_AREA_STACK,
                    flags=MAP_PRIVATE | MAP_ANONYMOUS | 0x100,  # MAP_GROWSDOWN
                )
            )
        guards = [vma(lo, hi, prot=0, flags=0, status=VMA_AREA_GUARD) for lo, hi in self.guards]
        return sorted(out, key=lambda v: int(v["start"])) + guards

    def all_pages(self) -> list[tuple[int, bytes]]:
        out = list(self.pages)
        if self.with_stack:
            out.append((self.arg_start, self.argv.ljust(PAGE, b"\0")[:PAGE]))
        return out


def write_image(path: Path, magic: str, entries: list[dict[str, Any]]) -> None:
    """Write an image from pycriu's dict form."""
    buf = io.BytesIO()
    pyimages.dump({"magic": magic, "entries": entries}, buf)
    path.write_bytes(buf.getvalue())


def core_entry(p: Proc, tid: int, index: int) -> dict[str, Any]:
    regs = gpregs(**p.regs.get(tid, {}))
    entry: dict[str, Any] = {
        "mtype": p.mtype,
        "thread_info": {
            "clear_tid_addr": 0,
            "gpregs": regs,
            "fpregs": fpregs(index),
        },
        "tc": {
            "task_state": 1,
            "exit_code": 0,
            "personality": 0,
            "flags": 0x400040,
            "blk_sigset": 0,
            "comm": p.comm,
        },
        "thread_core": {
            "futex_rla": 0,
            "futex_rla_len": 24,
            "sched_nice": 0,
            "blk_sigset": 0,
            "creds": {
                **dict.fromkeys(("uid", "euid", "suid", "fsuid"), p.uid),
                **dict.fromkeys(("gid", "egid", "sgid", "fsgid"), p.gid),
                "secbits": 0,
            },
        },
    }
    if p.mtype != "X86_64":
        # another architecture's registers live elsewhere; keep the x86 block out of it
        del entry["thread_info"]
    return entry


def pagemap_entries(p: Proc) -> tuple[list[dict[str, Any]], bytes]:
    """The pagemap entries (present, in_parent, lazy) and the pages file's bytes."""
    entries: list[dict[str, Any]] = []
    data = bytearray()
    for vaddr, content in p.all_pages():
        assert len(content) % PAGE == 0 and content, "pages come in whole pages"
        entries.append(_pme(vaddr, len(content) // PAGE, p.present_flags, p.pagemap_layout))
        data += content
    for vaddr, nr in p.parent_runs:
        entries.append(_pme(vaddr, nr, PE_PARENT, p.pagemap_layout))
    for vaddr, nr in p.lazy_runs:
        entries.append(_pme(vaddr, nr, PE_LAZY, p.pagemap_layout))
    return entries, bytes(data)


def _pme_4_2(vaddr: int, nr: int, flags: int) -> dict[str, Any]:
    # criu/page-xfer.c:write_pagemap_loc() since afb2e6c3f (4.2): the u64 count in field 5,
    # the required field 2 left 0
    return {"vaddr": vaddr, "compat_nr_pages": 0, "flags": flags, "nr_pages": nr}


def _pme_3_5(vaddr: int, nr: int, flags: int) -> dict[str, Any]:
    # 3.5 .. 4.1.x: the u32 count in field 2 (named nr_pages then), flags in field 4
    return {"vaddr": vaddr, "compat_nr_pages": nr, "flags": flags}


def _pme_2(vaddr: int, nr: int, flags: int) -> dict[str, Any]:
    # before 9bc9fcb0c (3.5): no flags, the in_parent boolean; no lazy pages yet
    assert flags in (PE_PRESENT, PE_PARENT), "CRIU 2.x wrote only present or in_parent runs"
    entry: dict[str, Any] = {"vaddr": vaddr, "compat_nr_pages": nr}
    if flags == PE_PARENT:
        entry["in_parent"] = True
    return entry


#: pagemap_entry as each CRIU release wrote it (pycriu 4.2 names field 2 compat_nr_pages)
PAGEMAP_LAYOUTS = {"4.2": _pme_4_2, "3.5-4.1": _pme_3_5, "2.x": _pme_2}


def _pme(vaddr: int, nr: int, flags: int, layout: str = "4.2") -> dict[str, Any]:
    return PAGEMAP_LAYOUTS[layout](vaddr, nr, flags)


def reg_file(file_id: int, name: str, size: int, mode: int = 0o100644) -> dict[str, Any]:
    """A files.img ``REG`` entry."""
    return {
        "type": "REG",
        "id": file_id,
        "reg": {
            "id": file_id,
            "flags": 0,
            "pos": 0,
            "fown": {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0},
            "name": name,
            "size": size,
            "mode": mode,
        },
    }


def memfd_file(file_id: int, inode_id: int) -> dict[str, Any]:
    """A files.img ``MEMFD`` entry pointing at memfd.img inode *inode_id*."""
    return {
        "type": "MEMFD",
        "id": file_id,
        "memfd": {
            "id": file_id,
            "flags": 2,
            "pos": 0,
            "fown": {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0},
            "inode_id": inode_id,
        },
    }


def memfd_inode(inode_id: int, name: str, size: int, shmid: int) -> dict[str, Any]:
    """A memfd.img ``MEMFD_INODE`` entry whose pages are in ``pagemap-shmem-SHMID.img``."""
    return {
        "name": name,
        "uid": 0,
        "gid": 0,
        "size": size,
        "shmid": shmid,
        "seals": 0,
        "inode_id": inode_id,
        "mode": 0o100777,
    }


def memfd_vma(start: int, end: int, file_id: int, *, pgoff: int = 0) -> dict[str, Any]:
    """A shared mapping of a memfd (files.img entry *file_id*)."""
    return vma(
        start,
        end,
        flags=MAP_SHARED,
        status=VMA_AREA_REGULAR | VMA_FILE_SHARED | VMA_AREA_MEMFD,
        pgoff=pgoff,
        shmid=file_id,
    )


def build(
    directory: Path,
    procs: list[Proc],
    *,
    files: list[dict[str, Any]] | None = None,
    memfds: list[dict[str, Any]] | None = None,
    shmem: dict[int, list[tuple[int, bytes]]] | None = None,
    sidecar: dict[str, Any] | None = None,
    shmem_layout: str = "4.2",
) -> Path:
    """Write an image set for *procs* into *directory* (created) and return it.

    :param shmem: per shmid, ``(offset in the object, bytes)`` saved in pagemap-shmem-SHMID.
    :param shmem_layout: the CRIU release whose pagemap_entry layout the shmem pagemaps use.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for shmid, chunks in (shmem or {}).items():
        pages_id = 1000 + shmid
        entries = [_pme(off, len(b) // PAGE, PE_PRESENT, shmem_layout) for off, b in chunks]
        write_image(
            directory / f"pagemap-shmem-{shmid}.img",
            "PAGEMAP",
            [{"pages_id": pages_id}, *entries],
        )
        (directory / f"pages-{pages_id}.img").write_bytes(b"".join(b for _, b in chunks))
    pstree = []
    for p in procs:
        threads = p.threads or [p.pid]
        pstree.append(
            {
                "pid": p.pid,
                "ppid": p.ppid,
                "pgid": p.pgid if p.pgid is not None else p.pid,
                "sid": p.sid if p.sid is not None else p.pid,
                "threads": threads,
            }
        )
        for i, tid in enumerate(threads):
            write_image(directory / f"core-{tid}.img", "CORE", [core_entry(p, tid, i)])
        argv_end = p.arg_start + len(p.argv)
        mm = {
            "mm_start_code": 0x400000,
            "mm_end_code": 0x401000,
            "mm_start_data": 0x600000,
            "mm_end_data": 0x601000,
            "mm_start_stack": STACK_START + PAGE,
            "mm_start_brk": 0x700000,
            "mm_brk": 0x700000,
            "mm_arg_start": p.arg_start,
            "mm_arg_end": argv_end,
            "mm_env_start": argv_end,
            "mm_env_end": argv_end,
            "exe_file_id": 0,
            "mm_saved_auxv": p.auxv,
            "vmas": p.all_vmas(),
        }
        write_image(directory / f"mm-{p.pid}.img", "MM", [mm])
        entries, data = pagemap_entries(p)
        pages_id = p.pages_id if p.pages_id is not None else p.pid
        write_image(
            directory / f"pagemap-{p.pid}.img", "PAGEMAP", [{"pages_id": pages_id}, *entries]
        )
        (directory / f"pages-{pages_id}.img").write_bytes(data)
    write_image(directory / "pstree.img", "PSTREE", pstree)
    if files:
        write_image(directory / "files.img", "FILES", files)
    if memfds:
        write_image(directory / "memfd.img", "MEMFD_INODE", memfds)
    if sidecar is not None:
        (directory / "livedump.json").write_text(json.dumps(sidecar))
    return directory


def pattern(vaddr: int, npages: int = 1, tag: int = 0) -> bytes:
    """Recognisable page contents: every 8 bytes hold their own address xor *tag*."""
    out = bytearray()
    for a in range(vaddr, vaddr + npages * PAGE, 8):
        out += struct.pack("<Q", a ^ tag)
    return bytes(out)


def simple(directory: Path, pid: int = 100, **kwargs: Any) -> Path:
    """A one-process, one-thread image set with an anonymous region of 4 pages, two saved."""
    base = 0x1000_0000
    proc = Proc(
        pid,
        vmas=[vma(base, base + 4 * PAGE)],
        pages=[(base, pattern(base)), (base + 2 * PAGE, pattern(base + 2 * PAGE))],
        **kwargs,
    )
    return build(directory, [proc])


def ghost_image(
    path: Path, content: bytes, *, chunks: list[tuple[int, int]] | None = None, mode: int = 0o100644
) -> None:
    """A ghost-file image of *content* as criu/files-reg.c:dump_ghost_file() writes it: whole,
    or (``chunks`` of ``(offset, length)``) as GhostChunkEntry records with the bytes after
    each, the rest of the file being holes."""
    head = struct.pack(
        "<II", pyimages.magic.by_name["IMG_COMMON"], pyimages.magic.by_name["GHOST_FILE"]
    )
    gfe = pb.ghost_file_entry(uid=0, gid=0, mode=mode)
    if chunks is not None:
        gfe.chunks = True
        gfe.size = len(content)
    body = [_length_prefixed(gfe)]
    if chunks is None:
        body.append(content)
    else:
        for off, length in chunks:
            body.append(_length_prefixed(pb.ghost_chunk_entry(off=off, len=length)))
            body.append(content[off : off + length])
    path.write_bytes(head + b"".join(body))


def _length_prefixed(msg: Any) -> bytes:
    raw = msg.SerializeToString()
    return struct.pack("<I", len(raw)) + raw


def remap_ghost(directory: Path, *pairs: tuple[int, int]) -> None:
    """remap-fpath.img saying each files.img id of ``(orig_id, remap_id)`` is a ghost."""
    entries = [{"orig_id": o, "remap_id": r, "remap_type": "GHOST"} for o, r in pairs]
    write_image(directory / "remap-fpath.img", "REMAP_FPATH", entries)
