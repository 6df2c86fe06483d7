#!/usr/bin/env bash
# `make test-arm64`: boots the emulated arm64 guest (scripts/arm64-guest.sh; builds it the first
# time) and runs tests/arm64/guest-probe.py inside: the clone snapshot's arm64 primitives
# (PTRACE_GETREGSET NT_PRSTATUS, the restart rewind, a syscall injected at `svc #0` with x8)
# through the project's own modules, on the guest's real arm64 kernel. About 20 s once built.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
share=${CRIU_LIVEDUMP_CACHE:-/var/cache/criu-livedump}/arm64/probe
rm -rf "$share"
mkdir -p "$share/project"
cp -r "$here/converters" "$here/criu_livedump" "$share/project/"
find "$share/project" -name __pycache__ -prune -exec rm -rf {} +
cp "$here/tests/arm64/guest-probe.py" "$share/"
printf 'python3 guest-probe.py project\n' >"$share/run.sh"
status=0
"$here/scripts/arm64-guest.sh" run "$share" "${ARM64_GUEST_TIMEOUT:-600}" || status=$?
cat "$share/out.log" 2>/dev/null || true
grep -q '^probe: ok' "$share/out.log" 2>/dev/null || { echo "test-arm64: FAILED" >&2; exit 1; }
[ "$status" = 0 ] || exit "$status"
echo "test-arm64: passed"
