#!/usr/bin/env bash
# `make demo`: live-dump a running multi-threaded program, show that it still runs, and read
# its core with gdb. Every line of output comes from the real commands; nothing is canned.
set -euo pipefail
cd "$(dirname "$0")/.."

tool=.venv/bin/criu-livedump
step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

step "criu-livedump check"
"$tool" check

step "build and start the sample program (tests/programs/demo.c)"
bin=$(.venv/bin/python tests/programs/build.py demo)
work=$(mktemp -d /tmp/criu-livedump-demo.XXXXXX)
# Like a shell with `ulimit -c unlimited`: the target's own RLIMIT_CORE decides the core's size.
(ulimit -c "$(ulimit -H -c)"; exec "$bin") >"$work/stdout" &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM
for _ in $(seq 100); do
  grep -q '^ready' "$work/stdout" 2>/dev/null && break
  sleep 0.05
done
grep -q '^ready' "$work/stdout" || { echo "demo: the sample program did not start" >&2; exit 1; }
ps -o pid,stat,nlwp,etime,cmd -p "$pid"

core="$work/demo.core"
step "criu-livedump dump $pid -o $core"
if ! "$tool" dump "$pid" -o "$core"; then
  echo "demo: the live dump failed (message above); stopping here" >&2
  exit 1
fi

step "the program is still running"
kill -0 "$pid"
ps -o pid,stat,nlwp,etime,cmd -p "$pid"
ls -l "$core"

step "gdb: info threads, thread apply all bt (read from the core)"
gdb -batch -nx -q -ex 'info threads' -ex 'thread apply all bt' -ex 'print ticks' \
  "$bin" "$core"

step "done: the core is kept in $work; the sample program is stopped now"
