#!/usr/bin/env bash
# Idempotent provisioning for criu-livedump (run as root):
#   1. Debian packages needed to build CRIU and to run the tests;
#   2. a working CRIU (>= 4.1) built from Debian's upstream source tarball, fetched from the
#      archive that this machine's apt is configured for (the URI is read from the apt sources
#      at run time; no mirror host name lives in this repository);
#   3. .venv/ with the project (editable) and pycriu built from the same CRIU source;
#   4. the clone snapshot's ptrace batch helper, criu_livedump/linux/libptrace_batch.so.1.
# A second run reuses the cache and takes seconds. The same on x86_64 and aarch64 hosts.
# `setup.sh debs` does step 1 only.
#
# CRIU_LIVEDUMP_SETUP=guest: what the emulated arm64 guest needs to run the kernel comparisons
# (scripts/arm64-guest.sh provision runs this script there, in a chroot under qemu-user): no
# server packages (redis, nginx, postgresql, podman; their tests skip) and the venv's test
# extra only (no linters, no matplotlib).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${CRIU_LIVEDUMP_CACHE:-/var/cache/criu-livedump}
prefix=${CRIU_PREFIX:-/usr/local}
criu_bin="$prefix/sbin/criu"
venv="$here/.venv"
# The venv's interpreter: $PYTHON, else the distribution's /usr/bin/python3 when it is new enough,
# else the first python3 on PATH. Debian's is built with PGO and LTO; a python3 built from source
# without --enable-optimizations (pyenv's default, first on PATH on the machines this was measured
# on) ran the tool's Python a quarter slower: 200 dataclasses 92 -> 71 ms, a loop 201 -> 140 ms,
# a live dump of a 16 MiB process 0.395 -> 0.356 s end to end.
python=${PYTHON:-}
if [ -z "$python" ]; then
  python=python3
  if /usr/bin/python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python=/usr/bin/python3
  fi
fi

say() { printf 'setup: %s\n' "$*" >&2; }

# --- 1. Debian packages -------------------------------------------------------------------------
profile=${CRIU_LIVEDUMP_SETUP:-full}
debs=(libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev libnl-3-dev
      libprotobuf-c-dev libprotobuf-dev pkg-config protobuf-c-compiler protobuf-compiler uuid-dev
      gcc make gdb elfutils xz-utils zstd curl ca-certificates iproute2 passwd liburing-dev
      python3-venv)
extras=test
if [ "$profile" != guest ]; then
  debs+=(gdb-multiarch redis-server redis-tools nginx-light postgresql postgresql-contrib podman
         runc fuse3)
  extras=dev,serve
fi
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  [ "$(id -u)" = 0 ] || { say "need root to install: ${missing[*]}"; exit 1; }
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The server packages start their services on install; the tests start their own instances.
  for s in nginx redis-server postgresql; do
    systemctl disable --now "$s" >/dev/null 2>&1 || service "$s" stop >/dev/null 2>&1 || true
  done
fi

# `setup.sh debs`: step 1 only (scripts/arm64-guest.sh provision: the guest's libraries, which
# CRIU is then cross-built against)
[ "${1:-}" = debs ] && exit 0

# --- 2. CRIU --------------------------------------------------------------------------------------
criu_ok() {  # usable: version >= 4.1 and `criu check` passes
  local bin=$1 v
  [ -x "$bin" ] || return 1
  v=$("$bin" --version 2>/dev/null | sed -n 's/^Version: *//p')
  [ -n "$v" ] || return 1
  [ "$(printf '%s\n4.1\n' "$v" | sort -V | head -1)" = 4.1 ] || return 1
  "$bin" check >/dev/null 2>&1
}

# debian_archive, fetch_source, build_release: the pinned CRIU releases (scripts/build-criu.sh)
say_as=setup
# shellcheck source=build-criu.sh
. "$here/scripts/build-criu.sh"

src=$(fetch_source 4.2.1 || fetch_source 4.1.1)
build_release "${src##*/criu-}" >/dev/null
if [ ! -f "$src/lib/pycriu/images/pb.py" ]; then
  make -C "$src" lib >>"$src/build.log" 2>&1 || { tail -20 "$src/build.log" >&2; exit 1; }
fi
system_criu=$(command -v criu || true)
if [ -n "$system_criu" ] && [ "$system_criu" != "$criu_bin" ] && criu_ok "$system_criu"; then
  say "using $system_criu"
  criu_bin=$system_criu
elif ! cmp -s "$src/criu/criu" "$criu_bin" 2>/dev/null; then
  install -D -m 0755 "$src/criu/criu" "$criu_bin"
  say "installed $criu_bin"
fi
ln -sfn "$src" "$cache/src"
# The other releases the tests dump with (tests/test_kernel_compare.py), built beside the
# installed one, never over it: 4.1.1, the last release before 4.2 changed pagemap entries,
# about 30 s of building here. CRIU_LIVEDUMP_TEST_RELEASES="" skips them (those tests skip).
for v in ${CRIU_LIVEDUMP_TEST_RELEASES-4.1.1}; do
  build_release "$v" >/dev/null || say "CRIU $v not built; the tests that dump with it will skip"
done

# --- 3. venv --------------------------------------------------------------------------------------
home=$("$python" -c 'import os, sys; print(os.path.dirname(os.path.abspath(sys._base_executable)))')
if [ -x "$venv/bin/python" ] && ! grep -qxF "home = $home" "$venv/pyvenv.cfg" 2>/dev/null; then
  say "recreating $venv on $python (it was made by another interpreter)"
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.setup-stamp"
want="$(sha256sum "$here/pyproject.toml" | cut -d' ' -f1) $src $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel
  "$venv/bin/pip" install -q "protobuf>=4.21,<6"
  "$venv/bin/pip" install -q --no-build-isolation "$src/lib"
  "$venv/bin/pip" install -q -e "$here[$extras]"
  echo "$want" >"$stamp"
fi

# --- 4. the ptrace batch helper (criu_livedump/linux/ptrace.py loads it) ------------------------
helper_src="$here/criu_livedump/linux/ptrace_batch.c"
helper="$here/criu_livedump/linux/libptrace_batch.so.1"
if [ ! -f "$helper" ] || [ "$helper_src" -nt "$helper" ]; then
  # built beside and renamed into place: a concurrent dump never loads half a library
  gcc -O2 -shared -fPIC -Wall -Wextra -Werror -o "$helper.$$" "$helper_src"
  mv -f "$helper.$$" "$helper"
  say "built $helper"
fi
# --- 5. the project's bytecode ---------------------------------------------------------------------
# An editable install compiles nothing, and with PYTHONDONTWRITEBYTECODE set every run of the tool
# compiles its ~100 modules again (0.14 s quiet, several times that beside a busy target: a dump's
# start-up). pip compiles an installed package; this does the same for the source tree (only the
# stale .pyc files are rewritten; py_compile writes beside and renames).
"$venv/bin/python" -m compileall -q "$here/criu_livedump" "$here/converters" >/dev/null
say "ready: $("$criu_bin" --version | head -1), venv at $venv"
say "supported: live dumps with CRIU 4.1 and 4.2 (tested: 4.1.1, 4.2.1); images written by CRIU 3.11 to 4.2 convert"
