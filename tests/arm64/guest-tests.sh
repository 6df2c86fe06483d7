#!/bin/sh
# Runs inside the arm64 guest (scripts/arm64-guest.sh run), in the shared directory that
# tests/arm64/test-arm64.sh prepared: the clone's arm64 primitives (guest-probe.py), then the
# live-dump kernel comparisons marked arm64 (tests/test_kernel_compare.py, both methods) with
# the project's venv that `scripts/arm64-guest.sh provision` made in /opt/criu-livedump. Both
# cores of every case come back in out/CASE/ (ours, kernel), the pytest report in out/.
set -u
share=$PWD
ip link set lo up  # CRIU's kerndat probes TCP repair on loopback
out=$share/out
rm -rf "$out"
mkdir -p "$out"
uname -r >"$out/kernel"
python3 guest-probe.py project || exit 1
# this run's sources over the provisioned copy (its venv and arm64 helper stay)
cp -pR project/. /opt/criu-livedump/ || exit 1
cd /opt/criu-livedump || exit 1
# offline: everything is in place, so this only checks it (and rebuilds the helper if its
# source changed)
CRIU_LIVEDUMP_SETUP=guest CRIU_LIVEDUMP_TEST_RELEASES= bash scripts/setup.sh || exit 1
criu --version >"$out/criu-version"
status=0
# pytest-args: more words for pytest, from ARM64_PYTEST_ARGS (tests/arm64/test-arm64.sh)
.venv/bin/python -m pytest tests/test_kernel_compare.py -m arm64 -p no:cacheprovider \
  --basetemp=/var/tmp/kc -q -rA --junitxml="$out/junit.xml" $(cat "$share/pytest-args") \
  || status=$?
for d in /var/tmp/kc/*; do
  [ -L "$d" ] || [ ! -d "$d/ours" ] && continue  # NAMEcurrent: pytest's link to NAME0
  case=$(basename "$d")
  mkdir -p "$out/$case"
  cp "$d"/ours/core.* "$d"/kernel/* "$out/$case/" 2>/dev/null
done
echo "pytest status $status"
exit $status
