"""Mutations of an in-memory image set (:class:`seeds.Seed`), deterministic per random source.

Three levels: bytes (flip, insert, delete, truncate, append, empty, delete the file, swap
magics); entries (an image is ``magic {u32 size; message}*``: duplicate, drop, swap, lie about
a size); fields (a schema-less walk of the protobuf wire format that replaces any varint, in
any nested message, with an edge value, or any string with a hostile one). Targeted mutations
write the absurd inputs issue 7 names: a VMA of 2^63 bytes, a pagemap entry of 2^40 pages,
10^6 threads in pstree, overlapping pagemap entries, parent loops, missing files.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable

import pycriu.images as pyimages
from pycriu.images import pb
from seeds import PAGE, Seed

U64 = (1 << 64) - 1
_U32 = struct.Struct("<I")
MAGICS = pyimages.magic.by_name
_COMMON = {MAGICS["IMG_COMMON"], MAGICS["IMG_SERVICE"]}
_SOME_MAGICS = [MAGICS[n] for n in ("PSTREE", "CORE", "MM", "PAGEMAP", "FILES", "MEMFD_INODE",
                                    "INVENTORY", "STATS", "IMG_COMMON", "IMG_SERVICE")]  # fmt: skip

#: values that break arithmetic: edges of every width, page boundaries, the top of memory
EDGES = [0, 1, PAGE - 1, PAGE, PAGE + 1, 0x7FFFFFFF, 1 << 31, 0xFFFFFFFF, 1 << 32, 1 << 40,
         (1 << 47) - PAGE, 1 << 47, 1 << 52, (1 << 63) - PAGE, 1 << 63, U64 - PAGE + 1, U64,
         1_000_000]  # fmt: skip
HOSTILE_NAMES = [b"/etc/shadow", b"/dev/sda", b"/dev/zero", b"/dev/urandom", b"/proc/kcore",
                 b"/proc/self/mem", b"/sys/kernel/notes", b"../../../etc/passwd", b"",
                 b"relative", b"/lib/../../../../etc/shadow", b"/" + b"a" * 5000, b"/\xff\xfe",
                 b"/tmp", b"/", b"/lib/libx.so\0trailing"]  # fmt: skip

Case = Seed
#: a "link" target that write_case() makes a FIFO instead of a symlink
FIFO = "\0fifo"
Mutation = Callable[[random.Random, Case], str]


def _image_names(case: Case) -> list[str]:
    return sorted(n for n in case.files if n.endswith(".img"))


def _pick_image(rng: random.Random, case: Case, prefix: str = "") -> str | None:
    names = [n for n in _image_names(case) if n.split("/")[-1].startswith(prefix)]
    return rng.choice(names) if names else None


# --- the image container --------------------------------------------------------------------------


def split(data: bytes) -> tuple[bytes, list[bytes]] | None:
    """``(magic header, [entry payload...])``, or None when *data* is not a well-formed image."""
    if len(data) < 4:
        return None
    pos = 8 if _U32.unpack_from(data, 0)[0] in _COMMON else 4
    if len(data) < pos:
        return None
    head, entries = data[:pos], []
    while pos < len(data):
        if pos + 4 > len(data):
            return None
        (size,) = _U32.unpack_from(data, pos)
        if pos + 4 + size > len(data):
            return None
        entries.append(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return head, entries


def join(head: bytes, entries: list[bytes]) -> bytes:
    return head + b"".join(_U32.pack(len(e)) + e for e in entries)


# --- the protobuf wire format, schema-less -----------------------------------------------------

Field = list[object]  # [field number, wire type, int | bytes | list[Field]]


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad varint")
        b = data[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7


def _enc_varint(v: int) -> bytes:
    v &= U64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def parse_wire(data: bytes) -> list[Field] | None:
    """Fields of a message, or None when *data* does not parse as one."""
    fields: list[Field] = []
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            num, wt = key >> 3, key & 7
            if num == 0:
                return None
            if wt == 0:
                v, pos = _varint(data, pos)
                fields.append([num, 0, v])
            elif wt == 2:
                n, pos = _varint(data, pos)
                if pos + n > len(data):
                    return None
                fields.append([num, 2, data[pos : pos + n]])
                pos += n
            elif wt in (1, 5):
                n = 8 if wt == 1 else 4
                if pos + n > len(data):
                    return None
                fields.append([num, wt, data[pos : pos + n]])
                pos += n
            else:
                return None
    except ValueError:
        return None
    return fields


def encode_wire(fields: list[Field]) -> bytes:
    out = bytearray()
    for num, wt, val in fields:
        assert isinstance(num, int) and isinstance(wt, int)
        out += _enc_varint(num << 3 | wt)
        if wt == 0:
            assert isinstance(val, int)
            out += _enc_varint(val)
        elif wt == 2:
            raw = encode_wire(val) if isinstance(val, list) else val
            assert isinstance(raw, bytes)
            out += _enc_varint(len(raw)) + raw
        else:
            assert isinstance(val, bytes)
            out += val
    return bytes(out)


def _slots(fields: list[Field], wt: int, depth: int = 0) -> list[Field]:
    """Every field of wire type *wt*, nested messages included (parsed in place)."""
    found: list[Field] = []
    for f in fields:
        if f[1] == wt:
            found.append(f)
        if f[1] == 2 and depth < 4:
            sub = f[2] if isinstance(f[2], list) else None
            if sub is None and isinstance(f[2], bytes) and f[2]:
                sub = parse_wire(f[2])
                if sub is not None:
                    f[2] = sub
            if sub is not None:
                found += _slots(sub, wt, depth + 1)
    return found


def _edit_entry(rng: random.Random, case: Case, edit: Callable[[list[Field]], str]) -> str:
    name = _pick_image(rng, case)
    if name is None:
        return "no image"
    parts = split(case.files[name])
    if parts is None or not parts[1]:
        return f"{name}: not splittable"
    head, entries = parts
    i = rng.randrange(len(entries))
    fields = parse_wire(entries[i])
    if fields is None:
        return f"{name}: entry {i} not protobuf"
    what = edit(fields)
    entries[i] = encode_wire(fields)
    case.files[name] = join(head, entries)
    return f"{name}: entry {i} {what}"


# --- byte level ---------------------------------------------------------------------------------


def m_flip(rng: random.Random, case: Case) -> str:
    name = rng.choice(_image_names(case))
    data = bytearray(case.files[name])
    if not data:
        return f"{name}: empty"
    n = rng.randint(1, 8)
    for _ in range(n):
        # flips cluster in the headers, where they hurt most
        pos = rng.randrange(min(len(data), 64)) if rng.random() < 0.5 else rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randint(1, 255)
    case.files[name] = bytes(data)
    return f"{name}: {n} flips"


def m_insert(rng: random.Random, case: Case) -> str:
    name = rng.choice(_image_names(case))
    data = case.files[name]
    pos = rng.randint(0, len(data))
    blob = rng.randbytes(rng.randint(1, 16))
    case.files[name] = data[:pos] + blob + data[pos:]
    return f"{name}: insert {len(blob)} at {pos}"


def m_delete_bytes(rng: random.Random, case: Case) -> str:
    name = rng.choice(_image_names(case))
    data = case.files[name]
    pos = rng.randint(0, len(data))
    n = rng.randint(1, 16)
    case.files[name] = data[:pos] + data[pos + n :]
    return f"{name}: delete {n} at {pos}"


def m_truncate(rng: random.Random, case: Case) -> str:
    name = rng.choice(sorted(case.files))
    data = case.files[name]
    keep = rng.randint(0, max(len(data) - 1, 0))
    case.files[name] = data[:keep]
    return f"{name}: truncate to {keep}"


def m_append(rng: random.Random, case: Case) -> str:
    name = rng.choice(_image_names(case))
    blob = rng.randbytes(rng.randint(1, 64))
    case.files[name] += blob
    return f"{name}: append {len(blob)}"


def m_missing(rng: random.Random, case: Case) -> str:
    name = rng.choice(sorted(case.files) + sorted(case.links))
    case.files.pop(name, None)
    case.links.pop(name, None)
    return f"{name}: deleted"


def m_magic(rng: random.Random, case: Case) -> str:
    names = _image_names(case)
    a = rng.choice(names)
    data = case.files[a]
    if rng.random() < 0.5 and len(names) > 1:  # swap the magics of two images
        b = rng.choice([n for n in names if n != a])
        pa, pb_ = split(data), split(case.files[b])
        if pa and pb_:
            case.files[a] = join(pb_[0], pa[1])
            case.files[b] = join(pa[0], pb_[1])
            return f"{a} <-> {b}: magics swapped"
    magic = rng.choice([*_SOME_MAGICS, rng.getrandbits(32)])
    at = rng.choice([0, 4])
    case.files[a] = data[:at] + _U32.pack(magic) + data[at + 4 :]
    return f"{a}: magic {magic:#x} at {at}"


# --- entry level --------------------------------------------------------------------------------


def m_entries(rng: random.Random, case: Case) -> str:
    name = _pick_image(rng, case)
    if name is None:
        return "no image"
    parts = split(case.files[name])
    if parts is None:
        return f"{name}: not splittable"
    head, entries = parts
    op = rng.choice(["dup", "dup", "drop", "swap", "lie", "many"])
    if op == "lie" or not entries:
        data = bytearray(case.files[name])
        if len(data) >= len(head) + 4:
            size = rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 64 << 20, rng.getrandbits(16)])
            data[len(head) : len(head) + 4] = _U32.pack(size)
            case.files[name] = bytes(data)
        return f"{name}: first entry size lies"
    i = rng.randrange(len(entries))
    if op == "dup":
        entries.insert(rng.randint(0, len(entries)), entries[i])
    elif op == "drop":
        del entries[i]
    elif op == "swap":
        j = rng.randrange(len(entries))
        entries[i], entries[j] = entries[j], entries[i]
    else:
        entries += [entries[i]] * rng.choice([100, 5000])
    case.files[name] = join(head, entries)
    return f"{name}: {op} entry {i}"


# --- field level --------------------------------------------------------------------------------


def m_varint(rng: random.Random, case: Case) -> str:
    def edit(fields: list[Field]) -> str:
        slots = _slots(fields, 0)
        if not slots:
            return "no varint"
        f = rng.choice(slots)
        old = f[2]
        f[2] = rng.choice(EDGES) if rng.random() < 0.8 else rng.getrandbits(64)
        return f"field {f[0]} {old} -> {f[2]}"

    return _edit_entry(rng, case, edit)


def m_string(rng: random.Random, case: Case) -> str:
    def edit(fields: list[Field]) -> str:
        slots = [f for f in _slots(fields, 2) if isinstance(f[2], bytes)]
        if not slots:
            return "no string"
        f = rng.choice(slots)
        f[2] = rng.choice([*HOSTILE_NAMES, rng.randbytes(rng.randint(0, 40))])
        return f"field {f[0]} -> {f[2]!r:.40}"

    return _edit_entry(rng, case, edit)


def m_drop_field(rng: random.Random, case: Case) -> str:
    def edit(fields: list[Field]) -> str:
        if not fields:
            return "empty"
        f = fields.pop(rng.randrange(len(fields)))
        return f"field {f[0]} dropped"

    return _edit_entry(rng, case, edit)


# --- targeted: the absurd inputs issue 7 names ----------------------------------------------------


def _load(case: Case, name: str, msgs: list[type]) -> tuple[bytes, list[object]] | None:
    parts = split(case.files[name])
    if parts is None:
        return None
    head, raw = parts
    out: list[object] = []
    for i, r in enumerate(raw):
        msg = msgs[min(i, len(msgs) - 1)]()
        try:
            msg.ParseFromString(r)
        except Exception:
            return None
        out.append(msg)
    return head, out


def _store(case: Case, name: str, head: bytes, msgs: list[object]) -> None:
    case.files[name] = join(head, [m.SerializePartialToString() for m in msgs])  # type: ignore[attr-defined]


def m_vma(rng: random.Random, case: Case) -> str:
    name = _pick_image(rng, case, "mm-")
    loaded = name and _load(case, name, [pb.mm_entry])
    if not loaded or not loaded[1]:
        return "no mm"
    head, (mm, *rest) = loaded
    vmas = mm.vmas  # type: ignore[attr-defined]
    if not vmas:
        return f"{name}: no vmas"
    v = vmas[rng.randrange(len(vmas))]
    op = rng.choice(["huge", "huge", "top", "swap", "dup", "flags", "pgoff", "madv"])
    if op == "huge":  # a VMA of 2^63 bytes
        v.end = (v.start + (1 << 63)) & U64 & ~(PAGE - 1) or U64 & ~(PAGE - 1)
    elif op == "top":
        v.start, v.end = rng.choice([(0, U64 & ~(PAGE - 1)), (U64 - 2 * PAGE + 1, U64 - PAGE + 1)])
    elif op == "swap":
        v.start, v.end = v.end, v.start
    elif op == "dup":
        vmas.add().CopyFrom(v)
    elif op == "flags":
        v.prot, v.flags, v.status = (rng.getrandbits(32) for _ in range(3))
    elif op == "pgoff":
        v.pgoff = rng.choice(EDGES) & ~(PAGE - 1)
    else:
        v.madv = rng.choice([1 << 16, U64, rng.getrandbits(64)])
    _store(case, name, head, [mm, *rest])
    return f"{name}: vma {op}"


def m_pagemap(rng: random.Random, case: Case) -> str:
    name = _pick_image(rng, case, "pagemap-")
    loaded = name and _load(case, name, [pb.pagemap_head, pb.pagemap_entry])
    if not loaded or len(loaded[1]) < 1:
        return "no pagemap"
    head, msgs = loaded
    body = msgs[1:]
    op = rng.choice(["huge", "huge", "overlap", "overlap", "flags", "pages_id", "many", "unsorted"])
    if op == "pages_id":
        msgs[0].pages_id = rng.choice([0, 1, 0xFFFFFFFF, rng.getrandbits(32)])  # type: ignore[attr-defined]
    elif op == "many":  # many one-page entries: the index must stay linear
        start = rng.choice(EDGES[:12]) & ~(PAGE - 1)
        for i in range(rng.choice([1000, 20_000])):
            e = pb.pagemap_entry(vaddr=(start + 2 * i * PAGE) & U64, nr_pages=1, flags=2)
            msgs.append(e)
    elif body:
        e = body[rng.randrange(len(body))]
        if op == "huge":  # a pagemap entry of 2^40 pages
            e.nr_pages = rng.choice([1 << 40, 1 << 52, 0xFFFFFFFF, 1 << 31])  # type: ignore[attr-defined]
        elif op == "overlap":
            twin = type(e)()
            twin.CopyFrom(e)  # type: ignore[arg-type]
            twin.vaddr = (e.vaddr + rng.choice([0, PAGE, -PAGE, PAGE // 2])) & U64  # type: ignore[attr-defined]
            msgs.append(twin)
        elif op == "flags":
            e.flags = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 0xFFFFFFFF])  # type: ignore[attr-defined]
        else:
            msgs[1:] = list(reversed(body))
    _store(case, name, head, msgs)
    return f"{name}: {op}"


def m_threads(rng: random.Random, case: Case) -> str:
    """10^6 threads (or pids colliding, or absurd ids) in a crafted pstree entry."""
    name = next((n for n in _image_names(case) if n.endswith("/pstree.img")), None)
    loaded = name and _load(case, name, [pb.pstree_entry])
    if not loaded or not loaded[1]:
        return "no pstree"
    head, msgs = loaded
    e = msgs[rng.randrange(len(msgs))]
    op = rng.choice(["million", "million", "dup", "ids", "empty"])
    if op == "million":
        del e.threads[:]  # type: ignore[attr-defined]
        first = min(e.pid, 0xFFFFFFFF - 1_000_000)  # type: ignore[attr-defined]
        e.threads.extend(range(first, first + 1_000_000))  # type: ignore[attr-defined]
    elif op == "dup":
        e.threads.extend(list(e.threads) or [e.pid])  # type: ignore[attr-defined]
    elif op == "ids":
        setattr(e, rng.choice(["pid", "ppid", "pgid", "sid"]), rng.choice(EDGES[:10]) & 0xFFFFFFFF)
    else:
        msgs.clear()
    _store(case, name, head, msgs)
    return f"{name}: {op}"


def m_parent(rng: random.Random, case: Case) -> str:
    """A parent chain that loops, dangles or points at a file; pagemap entries that need it."""
    target = rng.choice([".", "..", "../img", "./", "/", "missing", "../prev/parent", "/dev/null",
                         "pstree.img"])  # fmt: skip
    case.links["img/parent"] = target
    if rng.random() < 0.3 and "prev/pstree.img" in case.files:
        case.links["prev/parent"] = rng.choice(["../img", ".", "../prev"])
    name = _pick_image(rng, case, "pagemap-")
    loaded = name and _load(case, name, [pb.pagemap_head, pb.pagemap_entry])
    if loaded:
        head, msgs = loaded
        for e in msgs[1:]:
            if rng.random() < 0.5:
                e.flags = 1  # type: ignore[attr-defined]  # PE_PARENT
        _store(case, name, head, msgs)  # type: ignore[arg-type]
    return f"img/parent -> {target}"


def m_sidecar(rng: random.Random, case: Case) -> str:
    key = rng.choice(["coredump_filter", "core_limit", "signal", "xsave_layout", "ppid", "times",
                      "sysv_keys", "no_saved_pages", "boot_id"])  # fmt: skip
    value = rng.choice([None, True, -1, 0, 1, 0x1FF, 1 << 70, -(1 << 70), "x", [], {}, [[1, 2]],
                        {"1": 2}, {"components": [[1, 2, 3]]}, {"100": [1 << 62, -1]}])  # fmt: skip
    if rng.random() < 0.1:
        case.files["img/livedump.json"] = rng.choice(
            [b"\xff\xfe", b"[" * 100_000, b"{", b"null", rng.randbytes(20)]
        )
        return "livedump.json: garbage"
    case.files["img/livedump.json"] = json.dumps({key: value}).encode()
    return f"livedump.json: {key}={value!r:.30}"


#: what a mapped file under the files root may be replaced with: symlinks out of the root
#: (absolute, relative, to devices and procfs), a FIFO (opening one would block forever)
SPECIAL_FILES = ["/etc/shadow", "../../../../../../etc/passwd", "/dev/zero", "/dev/sda",
                 "/proc/self/mem", "/proc/kcore", ".", "libx.so", FIFO]  # fmt: skip


def m_mapped_file(rng: random.Random, case: Case) -> str:
    """The mapped file on disk changes: shorter, empty, longer, gone, a symlink out of the
    files root or to a device, or a FIFO."""
    names = [n for n in case.files if n.startswith("root/")]
    if not names:
        return m_string(rng, case)
    name = rng.choice(names)
    op = rng.choice(["short", "empty", "long", "gone", "special", "special"])
    if op == "special":
        del case.files[name]
        case.links[name] = rng.choice(SPECIAL_FILES)
        return f"{name} -> {case.links[name]!r}"
    if op == "gone":
        del case.files[name]
    elif op == "long":
        case.files[name] += bytes(3 * PAGE)
    else:
        case.files[name] = case.files[name][: rng.randint(0, 5000)] if op == "short" else b""
    return f"{name}: {op}"


#: (mutation, weight)
MUTATIONS: list[tuple[Mutation, int]] = [
    (m_flip, 10),
    (m_insert, 3),
    (m_delete_bytes, 3),
    (m_truncate, 4),
    (m_append, 2),
    (m_missing, 3),
    (m_magic, 3),
    (m_entries, 5),
    (m_varint, 14),
    (m_string, 4),
    (m_drop_field, 4),
    (m_vma, 8),
    (m_pagemap, 8),
    (m_threads, 1),
    (m_parent, 3),
    (m_sidecar, 3),
    (m_mapped_file, 2),
]
_FUNCS = [m for m, _ in MUTATIONS]
_WEIGHTS = [w for _, w in MUTATIONS]


def mutate(rng: random.Random, seed: Seed) -> tuple[Case, list[str]]:
    """A fresh case: *seed* with one to three mutations applied."""
    case = Seed(seed.name, dict(seed.files), dict(seed.links), seed.files_root)
    done = []
    for m in rng.choices(_FUNCS, _WEIGHTS, k=rng.choice([1, 1, 1, 2, 2, 3])):
        done.append(f"{m.__name__}: {m(rng, case)}")
    return case, done
