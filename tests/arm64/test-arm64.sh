#!/usr/bin/env bash
# `make test-arm64`: in the emulated arm64 guest (scripts/arm64-guest.sh; built and provisioned
# the first time, ~45 min under qemu-user, cached after), tests/arm64/guest-tests.sh runs the
# clone's arm64 primitives probe and the live-dump kernel comparisons marked arm64, both
# methods, on the guest's real arm64 kernel with CRIU 4.2.1; the cores of every case come back
# to $CRIU_LIVEDUMP_CACHE/arm64/probe/out. Run as root; see README "arm64" for its run time.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
share=${CRIU_LIVEDUMP_CACHE:-/var/cache/criu-livedump}/arm64/probe
"$here/scripts/arm64-guest.sh" provision
rm -rf "$share"
mkdir -p "$share"
"$here/scripts/arm64-guest.sh" copy-project "$share/project"
cp "$here/tests/arm64/guest-probe.py" "$share/"
cp "$here/tests/arm64/guest-tests.sh" "$share/run.sh"
# e.g. ARM64_PYTEST_ARGS="-k mappings-livedump" for a subset; ARM64_GUEST_CPU=max for SVE/PAC
printf '%s\n' "${ARM64_PYTEST_ARGS:-}" >"$share/pytest-args"
start=$SECONDS
status=0
"$here/scripts/arm64-guest.sh" run "$share" "${ARM64_GUEST_TIMEOUT:-3600}" || status=$?
cat "$share/out.log" 2>/dev/null || true
echo "test-arm64: the guest ran $((SECONDS - start)) s; cores in $share/out"
grep -q '^probe: ok' "$share/out.log" 2>/dev/null || { echo "test-arm64: FAILED (probe)" >&2; exit 1; }
[ "$status" = 0 ] || { echo "test-arm64: FAILED" >&2; exit "$status"; }
echo "test-arm64: passed"
