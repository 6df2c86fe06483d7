#!/usr/bin/env bash
# An emulated arm64 Debian guest, all from Debian's packages, for the aarch64 work (issue 20):
#
#   scripts/arm64-guest.sh build          the root filesystem image (cached; ~15 min the first
#                                         time under qemu-user, seconds after)
#   scripts/arm64-guest.sh provision      CRIU 4.2.1, pycriu and the project's venv in the root
#                                         filesystem: scripts/setup.sh run in it (chroot under
#                                         qemu-user; ~30 min the first time, cached after)
#   scripts/arm64-guest.sh run DIR [SECS] boot the guest, run DIR/run.sh inside it (DIR is
#                                         shared at /mnt/host over 9p, cwd there), power off;
#                                         its output goes to DIR/out.log, its status to DIR/rc
#
# The guest: qemu-system-aarch64 -M virt -cpu cortex-a72 (ARMv8.0: no SVE, SME, PAC or MTE,
# the state CRIU's images do not hold), Debian bookworm's linux-image-arm64 (6.1) booted from
# its own /boot, criu 3.17.1 (Debian 12's), gcc and gdb. The rootfs is made by mmdebstrap
# --arch arm64 through qemu-user-static's binfmt handler, from the archive this machine's apt
# is configured for (no host name lives here). Every boot is bounded by a timeout.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
say_as=arm64-guest
# shellcheck source=build-criu.sh
. "$here/scripts/build-criu.sh"   # debian_archive (it sets $cache: ours is set after it)
cache=${CRIU_LIVEDUMP_CACHE:-/var/cache/criu-livedump}/arm64
suite=bookworm
cpu=${ARM64_GUEST_CPU:-cortex-a72}
say() { printf 'arm64-guest: %s\n' "$*" >&2; }

guest_pkgs=linux-image-arm64,initramfs-tools,busybox,kmod,e2fsprogs,procps,criu,gdb,gcc,libc6-dev,binutils,python3,iproute2

host_tools() {
  local p missing=()
  for p in qemu-system-arm qemu-user-static binfmt-support mmdebstrap e2fsprogs cpio \
           gcc-aarch64-linux-gnu make pkg-config protobuf-compiler protobuf-c-compiler \
           libprotobuf-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64
  fi
}

# PID 1 of the guest: mounts, the 9p share, DIR/run.sh, power off.
guest_init() {
  cat <<'EOF'
#!/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs shm /dev/shm
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
hostname arm64-guest
ip link set lo up
mkdir -p /mnt/host
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 host /mnt/host; then
  cd /mnt/host && sh ./run.sh >out.log 2>&1
  echo $? >rc
  cd /
  umount /mnt/host
fi
sync
echo o >/proc/sysrq-trigger
sleep 60
EOF
}

# make_initrd ROOT OUT: a small initramfs from the rootfs's own files (busybox, libc, the
# modules that mount a virtio ext4 root), switching to ROOT's guest-init. Faster and smaller than
# initramfs-tools' under qemu-user, and the same on every run.
make_initrd() {
  local root=$1 out=$2 kver dir m order=""
  kver=$(ls "$root/lib/modules")
  local moddir=$root/lib/modules/$kver
  want() {
    local line d
    [[ " $order " == *" $1 "* ]] && return
    line=$(grep "^$1:" "$moddir/modules.dep") || { say "no module $1"; exit 1; }
    for d in ${line#*:}; do want "$d"; done
    order+="$1 "
  }
  for m in virtio/virtio_mmio virtio/virtio_pci block/virtio_blk; do want "kernel/drivers/$m.ko"; done
  want kernel/crypto/crc32c_generic.ko
  want kernel/fs/ext4/ext4.ko
  dir=$(mktemp -d)
  mkdir -p "$dir"/{bin,proc,dev,sys,newroot,modules,lib/aarch64-linux-gnu}
  cp "$root/usr/bin/busybox" "$dir/bin/"
  for m in $(readelf -d "$root/usr/bin/busybox" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'); do
    cp -L "$root/usr/lib/aarch64-linux-gnu/$m" "$dir/lib/aarch64-linux-gnu/"
  done
  cp -L "$root/usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1" "$dir/lib/"
  : >"$dir/modules/order"
  for m in $order; do
    cp "$moddir/$m" "$dir/modules/"
    basename "$m" >>"$dir/modules/order"
  done
  cat >"$dir/init" <<'EOF2'
#!/bin/busybox sh
b=/bin/busybox
$b mount -t proc proc /proc
$b mount -t devtmpfs dev /dev
for m in $($b cat /modules/order); do $b insmod "/modules/$m"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do $b sleep 0.1; i=$((i + 1)); done
$b mount -t ext4 -o rw /dev/vda /newroot || { echo "initrd: no root"; $b poweroff -f; }
$b umount /proc
exec $b switch_root /newroot /usr/local/sbin/guest-init
EOF2
  chmod 0755 "$dir/init"
  (cd "$dir" && find . | cpio -o -H newc --quiet) | gzip -1 >"$out"
  rm -rf "$dir"
}

build() {
  local root=$cache/root image=$cache/root.img
  [ -f "$cache/.built" ] && { say "cached: $image"; return; }
  host_tools
  mkdir -p "$cache"
  rm -rf "$root" "$image"
  local archive
  archive=$(debian_archive) || { say "no Debian archive URI in the apt sources"; exit 1; }
  say "mmdebstrap --arch arm64 $suite (qemu-user; minutes)"
  # initramfs-tools' default MODULES=most takes long minutes under qemu-user: list the few
  # modules that mount the root (virtio disk, ext4) before the kernel package configures
  local hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d" &&
    echo MODULES=list >"$1/etc/initramfs-tools/conf.d/livedump" &&
    printf "virtio_pci\nvirtio_mmio\nvirtio_blk\next4\n" \
      >"$1/usr/share/initramfs-tools/modules.d/livedump"'
  mmdebstrap --mode=root --arch=arm64 --variant=minbase --include="$guest_pkgs" \
    --essential-hook="$hook" \
    "$suite" "$root" "$archive" >"$cache/mmdebstrap.log" 2>&1 \
    || { tail -20 "$cache/mmdebstrap.log" >&2; exit 1; }
  guest_init >"$root/usr/local/sbin/guest-init"
  chmod 0755 "$root/usr/local/sbin/guest-init"
  cp -L "$root"/boot/vmlinuz-* "$cache/vmlinuz"
  make_initrd "$root" "$cache/initrd.img"
  mkfs.ext4 -q -F -L arm64root -d "$root" "$image" 4G
  rm -rf "$root"
  touch "$cache/.built"
  say "built $image"
}

# The root filesystem's mount for provision; every exit path unmounts it.
mnt=""
unmount_root() {
  [ -n "$mnt" ] || return 0
  local m
  for m in dev/pts dev proc sys ""; do
    mountpoint -q "$mnt/$m" && umount "$mnt/$m"
  done
  rmdir "$mnt"
  mnt=""
}

# provision: scripts/setup.sh in the guest's root filesystem, in a chroot (qemu-user through
# binfmt), with its guest profile: the Debian build packages (from the archive mmdebstrap took),
# CRIU 4.2.1 built from the cached tarball into /usr/local/sbin/criu, pycriu and the venv of the
# project copied to /opt/criu-livedump (pip from the index this host's pip is configured for:
# its index-url setting, if any, and its CA bundle, passed in for the run). Cached by a stamp of
# the files that decide the result.
guest_project=/opt/criu-livedump
provision() {
  build
  local stamp=$cache/.provisioned want
  want=$(cat "$here/scripts/setup.sh" "$here/scripts/build-criu.sh" "$here/pyproject.toml" \
    | sha256sum | cut -c1-16)
  [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && { say "provisioned (cached)"; return; }
  host_tools
  rm -f "$stamp"
  mnt=$(mktemp -d "$cache/.mnt-XXXXXX")
  trap unmount_root EXIT
  mount -o loop "$cache/root.img" "$mnt"
  mount -t proc proc "$mnt/proc"
  mount --bind /dev "$mnt/dev"
  mount --bind /dev/pts "$mnt/dev/pts"
  mount -t sysfs sys "$mnt/sys"
  cp -L /etc/resolv.conf "$mnt/etc/resolv.conf"
  cp -L /etc/ssl/certs/ca-certificates.crt "$mnt/etc/livedump-host-ca.crt"
  mkdir -p "$mnt/var/cache/criu-livedump"
  cp "$(dirname "$cache")"/criu_4.2.1.orig.tar.xz "$mnt/var/cache/criu-livedump/" 2>/dev/null || true
  copy_project "$mnt$guest_project"
  local start=$SECONDS
  : >"$cache/provision.log"
  say "the build packages in the arm64 root filesystem (setup.sh debs, chroot under qemu-user)"
  in_root debs
  # CRIU cross-built on this host against those packages (minutes, where gcc under qemu-user
  # takes most of an hour), into the cache setup.sh finds it in
  say "CRIU 4.2.1 cross-built for aarch64 (scripts/build-criu.sh with CRIU_CROSS_SYSROOT)"
  CRIU_LIVEDUMP_CACHE=$mnt/var/cache/criu-livedump CRIU_CROSS_SYSROOT=$mnt \
    nice -n 10 bash "$here/scripts/build-criu.sh" 4.2.1 >>"$cache/provision.log" 2>&1 \
    || fail_provision "the cross build of CRIU"
  say "scripts/setup.sh in the arm64 root filesystem (CRIU installed, pycriu, the venv)"
  in_root
  rm -f "$mnt/etc/livedump-host-ca.crt"
  unmount_root
  echo "$want" >"$stamp"
  say "provisioned in $((SECONDS - start)) s"
}

# in_root [ARG]: scripts/setup.sh [ARG] in the mounted root filesystem, in the guest profile;
# pip uses this host's index-url setting (if any) and CA bundle
in_root() {
  local index
  index=$(pip3 config get global.index-url 2>/dev/null || true)
  chroot "$mnt" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 CRIU_LIVEDUMP_SETUP=guest CRIU_LIVEDUMP_TEST_RELEASES= \
    PIP_CERT=/etc/livedump-host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ${index:+PIP_INDEX_URL=$index} \
    nice -n 10 bash "$guest_project/scripts/setup.sh" "$@" >>"$cache/provision.log" 2>&1 \
    || fail_provision "scripts/setup.sh $*"
}

fail_provision() {
  tail -20 "$cache/provision.log" >&2
  say "$1 failed (see $cache/provision.log)"
  exit 1
}

# copy_project DEST: the project's files (not its venv, caches, built helper or test binaries)
copy_project() {
  mkdir -p "$1"
  tar -C "$here" --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude='*.so.1' \
    --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache --exclude=tests/programs/bin \
    --exclude='*.egg-info' -cf - . | tar -C "$1" -xf -
}

run() {
  local dir secs=${2:-1800}
  dir=$(cd "$1" && pwd)
  [ -f "$dir/run.sh" ] || { say "no $dir/run.sh"; exit 1; }
  build
  rm -f "$dir/rc" "$dir/out.log"
  say "booting (timeout ${secs}s, cpu $cpu)"
  timeout --kill-after=10 "$secs" qemu-system-aarch64 -M virt -cpu "$cpu" -smp 2 -m 2048 \
    -nographic -no-reboot -monitor none -serial "file:$dir/console.log" \
    -kernel "$cache/vmlinuz" -initrd "$cache/initrd.img" \
    -append "console=ttyAMA0 quiet panic=-1" \
    -drive "file=$cache/root.img,if=virtio,format=raw,snapshot=on" \
    -virtfs "local,path=$dir,mount_tag=host,security_model=none,id=host" \
    || say "qemu ended with status $?"
  [ -f "$dir/rc" ] || { say "the guest did not finish (see $dir/console.log)"; exit 1; }
  return "$(cat "$dir/rc")"
}

case ${1:-} in
  build) build ;;
  provision) provision ;;
  copy-project) copy_project "$2" ;;
  run) shift; run "$@" ;;
  *) say "usage: $0 build | provision | run DIR [SECONDS]"; exit 2 ;;
esac
