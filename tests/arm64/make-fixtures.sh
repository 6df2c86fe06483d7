#!/usr/bin/env bash
# Makes the aarch64 golden fixtures (tests/arm64/*.tar.xz) in the emulated arm64 guest:
# scripts/arm64-guest.sh boots it, tests/arm64/guest-fixtures.sh runs inside (CRIU's images and
# the guest kernel's own core of each test program), and the results are packed here, one
# tar.xz per case plus root.tar.xz (the mapped files: programs, libc, ld.so, the data file).
# tests/test_arm64_fixtures.py converts them in `make test`. Run as root; about 10 minutes.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
share=${CRIU_LIVEDUMP_CACHE:-/var/cache/criu-livedump}/arm64/share
rm -rf "$share"
mkdir -p "$share/src"
cp "$here/tests/arm64/guest-fixtures.sh" "$share/run.sh"
cp "$here/tests/programs/threads.c" "$here/tests/programs/mappings.c" "$share/src/"
"$here/scripts/arm64-guest.sh" run "$share" "${ARM64_GUEST_TIMEOUT:-2400}" || {
  tail -30 "$share/out.log" >&2; exit 1; }
cat "$share/out.log"
dest=$here/tests/arm64
for d in "$share"/out/*/; do
  name=$(basename "$d")
  [ "$name" = root ] && continue
  cp "$share"/out/{kernel,criu-version,pagesize} "$d"
  tar -C "$share/out" --owner=0 --group=0 --sort=name -cJf "$dest/$name.tar.xz" "$name"
done
tar -C "$share/out" --owner=0 --group=0 --sort=name -cJf "$dest/root.tar.xz" root
du -ch "$dest"/*.tar.xz
