#!/bin/sh
# Runs inside the arm64 guest (scripts/arm64-guest.sh run), in the shared directory that
# tests/arm64/make-fixtures.sh prepared: builds the test programs, and for each case starts the
# program, `criu dump --leave-running`s it, then takes the guest kernel's own core (SIGABRT) of
# the same, still blocked, process, and gdb's backtraces of that core. Results go to out/CASE/.
set -u
share=$PWD
ip link set lo up  # CRIU's kerndat probes TCP repair on loopback
out=$share/out
rm -rf "$out"
mkdir -p "$out" /opt/livedump /tmp/cores
uname -r >"$out/kernel"
# Debian 12's CRIU 3.17.1 (provision puts 4.2.1 first on PATH, as /usr/local/sbin/criu)
criu=/usr/sbin/criu
"$criu" --version >"$out/criu-version" 2>&1
getconf PAGESIZE >"$out/pagesize"
for p in threads mappings; do
  gcc -O1 -g -pthread -Wall -o "/opt/livedump/$p" "$share/src/$p.c" || exit 1
done
# a 32-page data file with a pattern (mappings' DATAFILE)
python3 -c 'import sys; sys.stdout.buffer.write(bytes((i * 7 + (i >> 12)) & 0xFF for i in range(32 * 4096)))' \
  >/opt/livedump/data
echo '/tmp/cores/core.%p' >/proc/sys/kernel/core_pattern
ulimit -c unlimited

run_case() {  # NAME PROGRAM ARGS...
  name=$1; prog=$2; shift 2
  d=$out/$name
  mkdir -p "$d/images"
  setsid "/opt/livedump/$prog" "$@" >"$d/stdout" 2>&1 </dev/null &
  pid=$!
  i=0
  while ! grep -q ready "$d/stdout" 2>/dev/null; do
    i=$((i + 1)); [ $i -gt 600 ] && { echo "$name: not ready"; kill -KILL $pid; return 1; }
    sleep 0.2
  done
  echo "$pid" >"$d/pid"
  echo "$prog" >"$d/program"
  # A first seize, discarded: the first ptrace interruption changes a blocked thread once (an
  # interrupted sigtimedwait fails with EINTR, which glibc's sigwait() stores in errno before it
  # waits again), as the kernel-comparison harness's rseq query does before CRIU on x86_64.
  mkdir -p /tmp/warmup
  timeout 600 "$criu" dump -t "$pid" -D /tmp/warmup --leave-running -o dump.log || echo "$name: warm-up failed"
  rm -rf /tmp/warmup
  if ! timeout 600 "$criu" dump -t "$pid" -D "$d/images" --leave-running -v4 -o dump.log; then
    echo "$name: criu dump failed"; tail -40 "$d/images/dump.log"
  fi
  # the sidecar a live dump writes beside the images: the parent CRIU records as 0
  printf '{"version": 2, "ppid": %s}\n' "$(cut -d' ' -f4 "/proc/$pid/stat")" >"$d/images/livedump.json"
  kill -ABRT "$pid"
  wait "$pid"
  mv "/tmp/cores/core.$pid" "$d/core.kernel" || return 1
  gdb -batch -nx -ex 'set pagination off' -ex 'thread apply all bt' "/opt/livedump/$prog" \
    "$d/core.kernel" >"$d/bt.guest" 2>&1
  echo "$name: done (pid $pid)"
}

run_case threads threads 6
run_case mappings mappings /opt/livedump/data 64
# the files the cores map, for the converter's --files-root and gdb's sysroot
mkdir -p "$out/root"
for f in /opt/livedump/threads /opt/livedump/mappings /opt/livedump/data \
         /lib/aarch64-linux-gnu/libc.so.6 /lib/ld-linux-aarch64.so.1; do
  cp --parents "$(readlink -f "$f")" "$out/root/"
done
ln -s usr/lib "$out/root/lib"
echo finished
