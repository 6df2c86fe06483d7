#!/usr/bin/env bash
# Idempotent provisioning for criu-livedump (run as root):
#   1. Debian packages needed to build CRIU and to run the tests;
#   2. a working CRIU (>= 4.1) built from Debian's upstream source tarball, fetched from the
#      archive that this machine's apt is configured for (the URI is read from the apt sources
#      at run time; no mirror host name lives in this repository);
#   3. .venv/ with the project (editable) and pycriu built from the same CRIU source.
# A second run reuses the cache and takes seconds.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${CRIU_LIVEDUMP_CACHE:-/var/cache/criu-livedump}
prefix=${CRIU_PREFIX:-/usr/local}
criu_bin="$prefix/sbin/criu"
venv="$here/.venv"
python=${PYTHON:-python3}

say() { printf 'setup: %s\n' "$*" >&2; }

# --- 1. Debian packages -------------------------------------------------------------------------
debs=(libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev libnl-3-dev
      libprotobuf-c-dev libprotobuf-dev pkg-config protobuf-c-compiler protobuf-compiler uuid-dev
      gcc make gdb elfutils xz-utils zstd curl ca-certificates iproute2 passwd liburing-dev
      redis-server redis-tools nginx-light postgresql postgresql-contrib podman runc)
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

# --- 2. CRIU --------------------------------------------------------------------------------------
criu_ok() {  # usable: version >= 4.1 and `criu check` passes
  local bin=$1 v
  [ -x "$bin" ] || return 1
  v=$("$bin" --version 2>/dev/null | sed -n 's/^Version: *//p')
  [ -n "$v" ] || return 1
  [ "$(printf '%s\n4.1\n' "$v" | sort -V | head -1)" = 4.1 ] || return 1
  "$bin" check >/dev/null 2>&1
}

# The Debian archive's URI, read from apt's configuration (deb822 .sources, then one-line lists).
debian_archive() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # First URIs: line of a stanza whose Suites do not end in -security.
    uri=$(awk 'BEGIN{RS=""; FS="\n"} {u=""; s=""; for(i=1;i<=NF;i++){ if($i ~ /^URIs:/){u=$i; sub(/^URIs:[ \t]*/,"",u); split(u,a," "); u=a[1]} if($i ~ /^Suites:/){s=$i} } if(u!="" && s !~ /-security/ && u ~ /debian\/?$/){print u; exit}}' "$f")
    [ -n "$uri" ] && { echo "${uri%/}"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk '$1=="deb" && $0 !~ /security/ { for(i=2;i<=NF;i++) if($i ~ /^[a-z]+:\/\// && $i ~ /debian\/?$/){print $i; exit} }' "$f")
    [ -n "$uri" ] && { echo "${uri%/}"; return; }
  done
  return 1
}

src_versions=("4.2.1 29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9"
              "4.1.1 f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe")

fetch_source() {  # prints the unpacked source directory
  mkdir -p "$cache"
  local entry ver sum tarball archive
  for entry in "${src_versions[@]}"; do
    read -r ver sum <<<"$entry"
    tarball="$cache/criu_${ver}.orig.tar.xz"
    if [ -d "$cache/criu-$ver" ] && [ -f "$cache/criu-$ver/.unpacked" ]; then
      echo "$cache/criu-$ver"; return
    fi
    if [ ! -f "$tarball" ]; then
      archive=$(debian_archive) || { say "no Debian archive URI in the apt sources"; return 1; }
      say "fetching criu_${ver}.orig.tar.xz from the configured Debian archive"
      curl -fsSL -o "$tarball.part" "$archive/pool/main/c/criu/criu_${ver}.orig.tar.xz" || { rm -f "$tarball.part"; continue; }
      mv "$tarball.part" "$tarball"
    fi
    if ! echo "$sum  $tarball" | sha256sum -c --status; then
      say "checksum mismatch for $tarball; removing it"; rm -f "$tarball"; continue
    fi
    rm -rf "$cache/criu-$ver"
    tar -C "$cache" -xJf "$tarball"
    touch "$cache/criu-$ver/.unpacked"
    echo "$cache/criu-$ver"; return
  done
  say "could not fetch any CRIU source tarball"; return 1
}

src=$(fetch_source)
if [ ! -x "$src/criu/criu" ]; then
  say "building CRIU in $src (about 30 s)"
  make -C "$src" -j"$(nproc)" criu >"$cache/build.log" 2>&1 || { tail -20 "$cache/build.log" >&2; exit 1; }
fi
if [ ! -f "$src/lib/pycriu/images/pb.py" ]; then
  make -C "$src" lib >>"$cache/build.log" 2>&1 || { tail -20 "$cache/build.log" >&2; exit 1; }
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

# --- 3. venv --------------------------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.setup-stamp"
want="$(sha256sum "$here/pyproject.toml" | cut -d' ' -f1) $src"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel
  "$venv/bin/pip" install -q "protobuf>=4.21,<6"
  "$venv/bin/pip" install -q --no-build-isolation "$src/lib"
  "$venv/bin/pip" install -q -e "$here[dev]"
  echo "$want" >"$stamp"
fi
say "ready: $("$criu_bin" --version | head -1), venv at $venv"
