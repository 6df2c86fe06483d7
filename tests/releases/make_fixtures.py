"""Write the release fixtures tests/releases/criu-*/ (run by hand, as root; never in CI):

    .venv/bin/python tests/releases/make_fixtures.py [NAME...]

Each fixture is one state of ``tiny`` (tiny.c, committed built as ``tiny``) dumped twice: by
CRIU with ``--leave-running`` (the product's options, tests/harness/criu.py), then by the
kernel (SIGABRT, tests/harness/kernel.py) with the process unchanged in between. It holds the
images as CRIU wrote them (``images/``, binary: a JSON round trip through pycriu 4.2 would
rewrite them in 4.2's layout), the kernel's core (``kcore.xz``) and ``case.json`` (how it was
made). tests/test_releases.py converts the images and compares the core with the kernel's.

- ``criu-4.1.1``: written by CRIU 4.1.1 (scripts/build-criu.sh 4.1.1).
- ``criu-3.17.1-reencoded``: CRIU 3.17.1 cannot dump on this kernel (kerndat: "vdso:
  Unexpected rt vDSO area bounds"), so a real dump by the installed CRIU is re-encoded entry by
  entry into 3.17.1's layout: each entry parsed with 3.17.1's own generated classes (Debian
  bookworm's criu 3.17.1-2+deb12u2 package, scripts/build-criu.sh 3.17.1) and written back
  with only the fields 3.17.1 knows; pagemap entries carry their page count in field 2, as
  every release before 4.2 wrote it.
"""

from __future__ import annotations

import json
import lzma
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
sys.path[:0] = [str(TESTS), str(TESTS.parent)]

from harness.criu import criu_dump, criu_release  # noqa: E402
from harness.kernel import kernel_core  # noqa: E402
from harness.launcher import start_target  # noqa: E402

from converters.images import dump_image, load_image, pagemap_runs  # noqa: E402

#: where the fixture's process runs from: its name is in the images and the kernel's NT_FILE
PROGRAM_PATH = Path("/var/tmp/criu-livedump-releases/tiny")
CFLAGS = ["-nostdlib", "-static", "-O1", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
          "-Wl,--build-id=none", "-s"]  # fmt: skip
#: images the converter never reads, left out of the fixtures
SKIP = ("dump.log", "stats-dump")


def build_program() -> Path:
    binary = HERE / "tiny"
    if not binary.exists():
        subprocess.run(["gcc", *CFLAGS, "-o", str(binary), str(HERE / "tiny.c")], check=True)
    PROGRAM_PATH.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(binary, PROGRAM_PATH)
    PROGRAM_PATH.chmod(0o755)
    return PROGRAM_PATH


def dump_and_kernel_core(criu: Path | None, work: Path) -> tuple[Path, Path, int]:
    """Images and the kernel's core of one state of the program."""
    target = start_target(build_program(), rseq=False)
    try:
        images = criu_dump(target.pid, work / "images", criu=criu)
        kcore = kernel_core(target, work / "kernel")
    finally:
        target.close()
    return images, kcore, target.pid


def reencode_for_3_17(images: Path) -> None:
    """Rewrite *images* in place as CRIU 3.17.1 would have written them."""
    for path in images.glob("pagemap-*.img"):
        image = load_image(path)
        head = image["entries"][0]
        image["entries"] = [head] + [
            # 3.5 .. 4.1.x: the u32 count in field 2 (named compat_nr_pages by 4.2's proto)
            {"vaddr": v, "compat_nr_pages": n, "flags": f}
            for v, n, f in pagemap_runs(path)
        ]
        dump_image(path, image)
    old = criu_release("3.17.1").parent.parent / "lib"
    if not (old / "pycriu").is_dir():
        raise SystemExit(f"{old}/pycriu missing: run scripts/build-criu.sh 3.17.1 first")
    subprocess.run([sys.executable, str(HERE / "reencode.py"), str(old), str(images)], check=True)


def make(name: str) -> None:
    out = HERE / name
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        if name == "criu-4.1.1":
            criu: Path | None = criu_release("4.1.1")
            how = "dumped by CRIU 4.1.1 (scripts/build-criu.sh 4.1.1)"
        elif name == "criu-3.17.1-reencoded":
            criu = None
            how = (
                "dumped by the installed CRIU, re-encoded entry by entry with CRIU 3.17.1's "
                "pycriu (tests/releases/reencode.py): 3.17.1 cannot dump on Linux 6.x"
            )
        else:
            raise SystemExit(f"unknown fixture {name}")
        images, kcore, pid = dump_and_kernel_core(criu, work)
        if name == "criu-3.17.1-reencoded":
            reencode_for_3_17(images)
        shutil.rmtree(out, ignore_errors=True)
        (out / "images").mkdir(parents=True)
        for path in sorted(images.iterdir()):
            if path.name not in SKIP:
                shutil.copyfile(path, out / "images" / path.name)
        (out / "kcore.xz").write_bytes(lzma.compress(kcore.read_bytes()))
        version = subprocess.run(
            [str(criu or "/usr/local/sbin/criu"), "--version"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split("\n")[0]
        case = {
            "how": how,
            "criu": version,
            "kernel": platform.release(),
            "pid": pid,
            "program": str(PROGRAM_PATH),
        }
        (out / "case.json").write_text(json.dumps(case, indent=1) + "\n")
    print(f"{out}: {sum(p.stat().st_size for p in out.rglob('*') if p.is_file())} bytes")


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("needs root (CRIU dump, core_pattern)")
    for fixture in sys.argv[1:] or ["criu-4.1.1", "criu-3.17.1-reencoded"]:
        make(fixture)
