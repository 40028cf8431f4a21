#!/usr/bin/env bash
# Build the test guest image: OUTDIR/sftest.qcow2, a small BIOS-bootable disk
# (MBR, one active FAT16 partition, syslinux) holding a Debian cloud kernel and
# a busybox initramfs whose /init prints "SFTEST ..." markers on the serial
# console. See guest/README.md.
#
# Usage: guest/build-image.sh OUTDIR
#
# Every step is skipped when its output exists and is newer than its inputs,
# so a warm run costs almost nothing. The kernel .deb is downloaded once into
# OUTDIR/cache and reused from there (delete it to move to a newer kernel).
#
# Nothing here needs root, loop devices or mounts: the FAT partition is made
# and filled as a plain file with mkfs.vfat, syslinux (the mtools flavour) and
# mcopy, then placed behind a hand-written MBR. Only the first kernel download
# may need root, for `apt-get update` when the package lists are empty.
#
# Environment:
#   SF_GUEST_KERNEL_PKG  kernel package to use (default: newest versioned
#                        linux-image-*-cloud-amd64 that apt knows, or the one
#                        already in OUTDIR/cache)
#
# Host tools (Debian packages): apt, dpkg, busybox-static, syslinux,
# syslinux-common, mtools, dosfstools, qemu-utils (and zstd, should a future
# kernel ship .ko.zst modules).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF=$HERE/build-image.sh
[[ $# -eq 1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
CACHE=$OUT/cache
WORK=$OUT/work
mkdir -p "$CACHE" "$WORK"
# One build at a time per OUTDIR: test sessions may start builds concurrently.
exec 9>"$OUT/.lock"
flock 9

DISK_MB=64                                      # a change here needs a rebuild: rm -r OUTDIR/work
PART_START=2048                                 # first partition at 1 MiB (in 512-byte sectors)
BUSYBOX=/bin/busybox
MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin           # from syslinux-common
# Fixed IDs and timestamps keep the output byte-for-byte reproducible.
DISK_ID=0x5f7e5700
EPOCH=${SOURCE_DATE_EPOCH:-1700000000}

# Kernel modules the guest loads at boot. Their dependencies are found from
# each module's .modinfo and added too. Anything the kernel has built in (=y)
# is skipped: the Debian 6.12 cloud kernel, for example, has virtio,
# virtio_pci and virtio_console built in, where 6.1 has them as modules.
REQUIRED_MODULES=(
  virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
  virtio_console virtio_blk failover net_failover virtio_net
  button evdev                                  # ACPI power button -> acpid
)
# Other disk buses and config-drive filesystems: included when the kernel has
# them, no error when it does not (the 6.1 cloud kernel has no ahci, say).
OPTIONAL_MODULES=(
  nvme_core nvme                                # NVMe disks
  scsi_mod sd_mod sr_mod cdrom virtio_scsi      # SCSI disks and CD-ROMs
  libata libahci ahci ata_piix                  # SATA (q35 / ahci) and i440fx IDE
  isofs fat vfat nls_cp437 nls_ascii nls_utf8   # config drive: ISO9660 or vfat
)

log() { echo "build-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

# fresh OUTPUT INPUT...: true when OUTPUT exists and is newer than every INPUT.
fresh() {
  local out=$1 in
  shift
  [[ -e $out ]] || return 1
  for in in "$@"; do
    [[ $out -nt $in ]] || return 1
  done
}

for tool in apt-get dpkg-deb mkfs.vfat syslinux mcopy mmd qemu-img; do
  command -v "$tool" >/dev/null || die "$tool not found (see the host tools in $0)"
done
# The guest has no libc: its busybox must be the static one.
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is not static: install busybox-static"; fi
[[ -r $MBR_BIN ]] || die "$MBR_BIN not found: install syslinux-common"

# ---------------------------------------------------------------------------
# 1. The kernel package, downloaded once into OUTDIR/cache.

newest_cloud_kernel() {
  # Versioned packages only: not the meta packages (linux-image-cloud-amd64,
  # linux-image-6.12-cloud-amd64), not -dbg or -unsigned.
  apt-cache search --names-only '^linux-image-.*-cloud-amd64$' 2>/dev/null |
    awk '{print $1}' |
    grep -E '^linux-image-[0-9]+\.[0-9]+\.[0-9]+[^ ]*-cloud-amd64$' |
    sort -V | tail -n 1
}

source "$HERE/efi.sh"

cached_deb() {  # cached_deb [PKG]: the newest cached .deb (of PKG, if given)
  local pattern=${1:-linux-image-*-cloud-amd64}
  compgen -G "$CACHE/${pattern}_*.deb" | sort -V | tail -n 1 || true
}

KERNEL_DEB=$(cached_deb "${SF_GUEST_KERNEL_PKG:-}")
if [[ -z $KERNEL_DEB ]]; then
  pkg=${SF_GUEST_KERNEL_PKG:-$(newest_cloud_kernel)}
  if [[ -z $pkg ]]; then
    log "apt knows no cloud kernel yet: running apt-get update"
    apt-get update -qq || die "apt-get update failed (it needs root)"
    pkg=$(newest_cloud_kernel)
    [[ -n $pkg ]] || die "no linux-image-*-cloud-amd64 package found"
  fi
  log "downloading $pkg"
  rm -rf "$CACHE"/download.*                    # left over by an interrupted run
  tmp=$(mktemp -d "$CACHE/download.XXXXXX")
  # The sandbox user option avoids apt's "_apt could not access" warning as root.
  (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg") >&2
  mv "$tmp"/*.deb "$CACHE"/
  rmdir "$tmp"
  KERNEL_DEB=$(cached_deb "$pkg")
fi
[[ -n $KERNEL_DEB ]] || die "kernel package download failed"
log "kernel package: ${KERNEL_DEB##*/}"

# 1b. UEFI boot: Debian's shim and GRUB (guest/efi.sh).
EFI_DIR=$WORK/efi
efi_binaries "$EFI_DIR"

# ---------------------------------------------------------------------------
# 2. Kernel and modules: WORK/kernel/{vmlinuz,config,kver,modules.order,modules/*.ko}.
# The whole package is unpacked to a temporary directory and only what the
# guest needs is kept (uncompressed: the initramfs is compressed as a whole).

KDIR=$WORK/kernel
# (also redone when another cached .deb is chosen, which may be older than .done)
if ! fresh "$KDIR/.done" "$KERNEL_DEB" "$SELF" ||
   [[ $(cat "$KDIR/source" 2>/dev/null) != "${KERNEL_DEB##*/}" ]]; then
  log "unpacking kernel and selecting modules"
  rm -rf "$KDIR" "$KDIR.tmp"
  mkdir -p "$KDIR.tmp/deb" "$KDIR.tmp/modules"
  dpkg-deb -x "$KERNEL_DEB" "$KDIR.tmp/deb"
  kver=$(ls "$KDIR.tmp/deb/lib/modules")
  [[ $(wc -w <<<"$kver") -eq 1 ]] || die "expected one kernel version in ${KERNEL_DEB##*/}, got: $kver"
  mroot=$KDIR.tmp/deb/lib/modules/$kver
  cp "$KDIR.tmp/deb/boot/vmlinuz-$kver" "$KDIR.tmp/vmlinuz"
  cp "$KDIR.tmp/deb/boot/config-$kver" "$KDIR.tmp/config"
  echo "$kver" >"$KDIR.tmp/kver"
  echo "${KERNEL_DEB##*/}" >"$KDIR.tmp/source"

  # Module file names mix '-' and '_' (nvme-core.ko); module names use '_'.
  declare -A modfile=() builtin=()
  while IFS= read -r f; do
    b=${f##*/}; b=${b%%.ko*}; modfile[${b//-/_}]=$f
  done < <(find "$mroot/kernel" -name '*.ko*')
  while IFS= read -r f; do
    b=${f##*/}; b=${b%.ko}; builtin[${b//-/_}]=1
  done <"$mroot/modules.builtin"

  # Decompress one module into the staging directory.
  stage_module() {
    local name=$1 src=${modfile[$1]} dst=$KDIR.tmp/modules/$1.ko
    case $src in
      *.ko) cp "$src" "$dst" ;;
      *.ko.xz) "$BUSYBOX" unxz -c "$src" >"$dst" ;;
      *.ko.gz) "$BUSYBOX" gunzip -c "$src" >"$dst" ;;
      *.ko.zst) zstd -qdc "$src" >"$dst" ;;
      *) die "unknown module format: $src" ;;
    esac
  }
  # Depth-first: a module goes into the load order after its dependencies.
  declare -A placed=()
  order=()
  add_module() {  # add_module NAME required|optional
    local name=${1//-/_} need=$2 dep deps
    [[ -n ${placed[$name]:-} ]] && return 0
    if [[ -n ${builtin[$name]:-} ]]; then
      placed[$name]=builtin
      return 0
    fi
    if [[ -z ${modfile[$name]:-} ]]; then
      [[ $need == optional ]] || die "module $name is neither built in nor a module in $kver"
      log "  $name: not in this kernel, skipped"
      placed[$name]=absent
      return 0
    fi
    placed[$name]=module
    stage_module "$name"
    # .modinfo holds NUL-separated key=value strings, among them depends=a,b
    deps=$(tr '\0' '\n' <"$KDIR.tmp/modules/$name.ko" | sed -n 's/^depends=//p' | head -n 1)
    for dep in ${deps//,/ }; do
      add_module "$dep" required
    done
    order+=("$name")
  }
  for m in "${REQUIRED_MODULES[@]}"; do add_module "$m" required; done
  for m in "${OPTIONAL_MODULES[@]}"; do add_module "$m" optional; done
  printf '%s\n' "${order[@]}" >"$KDIR.tmp/modules.order"
  log "  built in: $(for m in "${!placed[@]}"; do [[ ${placed[$m]} == builtin ]] && echo "$m"; done | sort | xargs)"
  log "  modules:  ${order[*]}"

  rm -rf "$KDIR.tmp/deb"
  touch "$KDIR.tmp/.done"
  mv "$KDIR.tmp" "$KDIR"
fi

# ---------------------------------------------------------------------------
# 3. The initramfs: busybox, the modules, the agent (guest/agent, built here),
# and guest/initramfs/ (the /init script, the acpid action). Published as
# OUTDIR/initrd.img.

# newc_node PATH MODE MAJOR MINOR INODE: one cpio "newc" entry for a device node.
# The kernel needs /dev/console in the initramfs to give /init its stdio before
# devtmpfs is mounted; writing the entry by hand avoids mknod (root) at build time.
newc_node() {
  local name=$1 mode=$2 major=$3 minor=$4 ino=$5
  local namesize=$((${#name} + 1))
  # magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
  # rdevmajor, rdevminor, namesize, check
  printf '070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x' \
    "$ino" "$mode" 0 0 1 "$EPOCH" 0 0 0 "$major" "$minor" "$namesize" 0
  printf '%s\0' "$name"
  # the 110-byte header plus the name is padded to a multiple of 4
  local pad=$(((4 - (110 + namesize) % 4) % 4))
  head -c "$pad" /dev/zero
}
newc_trailer() {
  printf '070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x' \
    0 0 0 0 1 0 0 0 0 0 0 11 0
  printf 'TRAILER!!!\0'
  head -c 3 /dev/zero   # 110 + 11 = 121 -> pad to 124
}

AGENT=$OUT/agent/sf-agent
if ! fresh "$AGENT" "$HERE/agent/sf-agent.c" "$HERE/agent/build.sh"; then
  log "building the agent"
  bash "$HERE/agent/build.sh" "$AGENT"
fi

INITRD=$OUT/initrd.img
# the directories too, so that a file removed from guest/initramfs counts
mapfile -t INITRAMFS_INPUTS < <(find "$HERE/initramfs")
if ! fresh "$INITRD" "$KDIR/.done" "$SELF" "$BUSYBOX" "$AGENT" "${INITRAMFS_INPUTS[@]}"; then
  log "building initramfs"
  stage=$(mktemp -d "$WORK/initramfs.XXXXXX")
  trap 'rm -rf "$stage"' EXIT
  kver=$(cat "$KDIR/kver")
  mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,mnt,var/log,etc} \
    "$stage/lib/modules/$kver"
  cp "$BUSYBOX" "$stage/bin/busybox"
  # Applet links are made here rather than by `busybox --install` at boot
  # (time under TCG); /sbin/modprobe lets the kernel load modules on demand.
  for applet in $("$BUSYBOX" --list-full); do
    [[ $applet == bin/busybox ]] || ln -sf /bin/busybox "$stage/$applet"
  done
  cp -r "$HERE/initramfs/." "$stage/"
  cp "$AGENT" "$stage/sbin/sf-agent"
  cp "$KDIR/modules.order" "$stage/etc/modules.order"
  if [[ -s $KDIR/modules.order ]]; then
    cp "$KDIR"/modules/*.ko "$stage/lib/modules/$kver/"
    # modules.dep & co. for busybox modprobe in the guest
    "$BUSYBOX" depmod -b "$stage" "$kver"
  fi
  echo sftest >"$stage/etc/hostname"
  chmod 755 "$stage/init" "$stage"/bin/sf-* "$stage"/etc/acpi/*/*
  find "$stage" -exec touch -h -d "@$EPOCH" {} +
  {
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
      "$BUSYBOX" cpio -o -H newc -R 0:0 --ignore-devno --renumber-inodes 2>/dev/null)
    # a second archive with the device nodes: the kernel unpacks concatenated archives
    newc_node dev/console $((0020000 | 0600)) 5 1 900001
    newc_node dev/null $((0020000 | 0666)) 1 3 900002
    newc_trailer
  } | gzip -9 -n >"$INITRD.tmp"
  mv "$INITRD.tmp" "$INITRD"
  rm -rf "$stage"
  trap - EXIT
fi
VMLINUZ=$OUT/vmlinuz
if ! fresh "$VMLINUZ" "$KDIR/.done"; then
  cp "$KDIR/vmlinuz" "$VMLINUZ.tmp" && mv "$VMLINUZ.tmp" "$VMLINUZ"
fi

# ---------------------------------------------------------------------------
# 4. The boot partition as a standalone FAT16 image: syslinux, its config, the
# kernel and the initramfs. No mount: syslinux and mcopy work on the file.

PART=$WORK/boot.fat
SYSLINUX_CFG=$HERE/syslinux.cfg
PART_MB=$((DISK_MB - 1))
GRUB_CFG=$HERE/grub.cfg
if ! fresh "$PART" "$VMLINUZ" "$INITRD" "$SYSLINUX_CFG" "$GRUB_CFG" "$EFI_DIR/grubx64.efi" "$SELF"; then
  log "building the FAT boot partition (${PART_MB} MiB)"
  rm -f "$PART.tmp"
  # mkfs.vfat, syslinux and mcopy all date what they write with SOURCE_DATE_EPOCH
  export MTOOLS_SKIP_CHECK=1 SOURCE_DATE_EPOCH=$EPOCH
  # -h: hidden sectors = the partition's start on the disk, which syslinux's
  # boot sector adds to every sector number it reads.
  mkfs.vfat --invariant -C -F 16 -n SFTEST-BOOT -i "${DISK_ID#0x}" -h "$PART_START" \
    "$PART.tmp" $((PART_MB * 1024)) >/dev/null
  syslinux --install "$PART.tmp"
  mcopy -i "$PART.tmp" "$SYSLINUX_CFG" ::/syslinux.cfg
  mcopy -i "$PART.tmp" "$VMLINUZ" ::/vmlinuz
  mcopy -i "$PART.tmp" "$INITRD" ::/initrd.img
  # UEFI firmware boots the removable-media path: shim, which starts GRUB beside it,
  # which reads its configuration from /EFI/debian (its built-in prefix).
  mmd -i "$PART.tmp" ::/EFI ::/EFI/BOOT ::/EFI/debian
  mcopy -i "$PART.tmp" "$EFI_DIR/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
  mcopy -i "$PART.tmp" "$EFI_DIR/grubx64.efi" ::/EFI/BOOT/grubx64.efi
  mcopy -i "$PART.tmp" "$GRUB_CFG" ::/EFI/debian/grub.cfg
  mcopy -i "$PART.tmp" "$GRUB_CFG" ::/EFI/BOOT/grub.cfg
  mv "$PART.tmp" "$PART"
fi

# ---------------------------------------------------------------------------
# 5. The disk: syslinux's MBR boot code, a partition table with one active
# FAT16 (LBA) partition, the partition image at 1 MiB; then converted to qcow2.

bytes() {  # bytes N...: each N (0-255) as one raw byte
  local b
  for b in "$@"; do
    # shellcheck disable=SC2059  # the format is the \ooo escape that makes the byte
    printf "\\$(printf '%03o' "$b")"
  done
}
le32() {  # le32 N: N as 4 little-endian bytes
  bytes $(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255))
}
chs() {  # chs LBA: the 3-byte CHS address, for a 255-head, 63-sector geometry
  local lba=$1 c h s
  c=$((lba / (255 * 63))); h=$(((lba / 63) % 255)); s=$((lba % 63 + 1))
  if ((c > 1023)); then c=1023; h=254; s=63; fi
  bytes "$h" $((s | ((c >> 2) & 0xc0))) $((c & 255))
}

IMAGE=$OUT/sftest.qcow2
if ! fresh "$IMAGE" "$PART" "$MBR_BIN" "$SELF"; then
  log "assembling the disk (${DISK_MB} MiB) and converting it to qcow2"
  raw=$WORK/disk.raw
  rm -f "$raw"
  truncate -s "${DISK_MB}M" "$raw"
  part_sectors=$(($(stat -c %s "$PART") / 512))
  part_end=$((PART_START + part_sectors - 1))
  dd if="$MBR_BIN" of="$raw" bs=440 count=1 conv=notrunc status=none
  {
    le32 $((DISK_ID))                          # 440: disk signature
    bytes 0 0                                  # 444: reserved
    bytes 0x80                                 # 446: entry 1: active (bootable)
    chs "$PART_START"
    bytes 0x0e                                 # type 0x0e: FAT16, LBA addressed
    chs "$part_end"
    le32 "$PART_START"
    le32 "$part_sectors"
    head -c 48 /dev/zero                       # entries 2-4: empty
    bytes 0x55 0xaa                            # 510: boot signature
  } | dd of="$raw" bs=1 seek=440 conv=notrunc status=none
  dd if="$PART" of="$raw" bs=1M seek=1 conv=notrunc,sparse status=none
  qemu-img convert -f raw -O qcow2 "$raw" "$IMAGE.tmp"
  mv "$IMAGE.tmp" "$IMAGE"
  rm -f "$raw"
fi

log "ready: $IMAGE ($(du -k "$IMAGE" | cut -f1) KiB on disk, ${DISK_MB} MiB virtual)"
