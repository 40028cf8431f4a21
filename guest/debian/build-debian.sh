#!/usr/bin/env bash
# Builds OUTDIR/debian-sftest.qcow2 (default OUTDIR: build/guest): a Debian 12
# cloud guest made only of Debian packages and PyPI wheels, no loop devices or
# mounts (the recipe measured in shared/reference/real-guest.md):
#
#   - a rootfs by mmdebstrap (minbase, as root into a directory): systemd,
#     cloud-init reading our config drive (ConfigDrive datasource), openssh,
#     ifupdown with isc-dhcp-client, the Debian cloud kernel;
#   - the real shakenfist-agent 0.7.0 in a venv (wheels fetched on the host:
#     pip inside the chroot cannot verify certificates), a systemd unit running
#     `sf-agent daemon run` on the sf-agent virtio-serial port (protocol v1);
#   - a 2 GiB raw disk, MBR: an EFI system partition (FAT, partition 2) at 1 MiB
#     with Debian's signed shim and GRUB (guest/efi.sh), then the root
#     (partition 1, ext4 by `mkfs.ext4 -d`, last so that it can grow with the
#     disk); GRUB's i386-pc core image with an embedded config in the MBR gap.
#     So it boots under BIOS, UEFI and secure boot. Converted to qcow2.
#
# Content-addressed: the image's key is the hash of this script and its files
# (guest/debian/files); a warm run with the same key does nothing. About 80 s
# cold (mmdebstrap is most of it), a few MiB of wheels cached in OUTDIR/cache.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(realpath -m "${1:-build/guest}")
CACHE=$OUT/cache
AGENT_VERSION=0.7.0
DISK_MB=2048
PART_START=2048         # sectors: the first partition at 1 MiB, GRUB's core image in the gap before it
ESP_MB=32
IMAGE=$OUT/debian-sftest.qcow2
KEY=$( (cat "$0" "$HERE/../efi.sh"; find "$HERE/files" -type f | LC_ALL=C sort | xargs cat) | sha256sum | cut -c1-16)

log() { echo "debian-sftest: $*" >&2; }
die() { log "error: $*"; exit 1; }
source "$HERE/../efi.sh"

if [[ -f $IMAGE && $(cat "$IMAGE.key" 2>/dev/null) == "$KEY" ]]; then
  exit 0
fi
[[ $(id -u) -eq 0 ]] || { log "needs root (mmdebstrap --mode=root, file ownership in the image)"; exit 1; }

WHEELS=$CACHE/debian-wheels-$AGENT_VERSION
if [[ ! -f $WHEELS/.done ]]; then
  log "fetching shakenfist-agent $AGENT_VERSION and its wheels"
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  # The guest's python3 is 3.11, as the host's: the wheels fit it.
  python3 -m pip wheel -q --disable-pip-version-check -w "$WHEELS" "shakenfist-agent==$AGENT_VERSION"
  touch "$WHEELS/.done"
fi

WORK=$OUT/work/debian
rm -rf "$WORK" && mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
ROOTFS=$WORK/rootfs

PACKAGES=systemd,systemd-sysv,udev,dbus,cloud-init,linux-image-cloud-amd64,initramfs-tools,e2fsprogs
PACKAGES+=,ifupdown,isc-dhcp-client,iproute2,iputils-ping,openssh-server,netbase,python3-venv,procps
# cloud-init renders network_data.json for ifupdown: routes as `route add` (net-tools), DNS as
# dns-nameservers (applied by resolvconf)
PACKAGES+=,net-tools,resolvconf
log "mmdebstrap bookworm into $ROOTFS"
mmdebstrap --variant=minbase --mode=root --quiet --include="$PACKAGES" \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d"' \
  --setup-hook="cp '$HERE/files/initramfs-fstype' \"\$1/etc/initramfs-tools/conf.d/sftest\"" \
  --customize-hook="cp -r '$HERE/files/root/.' \"\$1/\"" \
  --customize-hook="mkdir -p \"\$1/tmp/wheels\" && cp '$WHEELS'/*.whl \"\$1/tmp/wheels/\"" \
  --customize-hook='chroot "$1" python3 -m venv /opt/sf-agent' \
  --customize-hook="chroot \"\$1\" /opt/sf-agent/bin/pip install -q --no-index --find-links /tmp/wheels shakenfist-agent==$AGENT_VERSION" \
  --customize-hook='rm -rf "$1/tmp/wheels"' \
  --customize-hook='chroot "$1" systemctl enable sf-agent.service' \
  --customize-hook='echo debian-sftest >"$1/etc/hostname"' \
  --customize-hook='rm -f "$1"/etc/ssh/ssh_host_* && : >"$1/etc/machine-id"' \
  --customize-hook='chroot "$1" update-initramfs -u -k all' \
  bookworm "$ROOTFS"

# The kernel and initramfs by their symlinks in / (Debian makes them there).
[[ -e $ROOTFS/vmlinuz && -e $ROOTFS/initrd.img ]] || { log "no /vmlinuz or /initrd.img in the rootfs"; exit 1; }

log "making the disk (${DISK_MB} MiB)"
raw=$WORK/disk.raw
truncate -s "${DISK_MB}M" "$raw"
root_start=$((PART_START + ESP_MB * 2048))
# Partition 1 is the root (as grub-embedded.cfg and the kernel command line say), placed
# after partition 2, the EFI system partition.
printf 'start=%d, type=83, bootable\nstart=%d, size=%d, type=ef\n' "$root_start" "$PART_START" \
  $((ESP_MB * 2048)) | sfdisk -q "$raw"
part_kib=$(((DISK_MB * 1024) - root_start / 2))
mkfs.ext4 -q -F -L debian-root -d "$ROOTFS" -E "offset=$((root_start * 512))" "$raw" "${part_kib}k"

efi_binaries "$CACHE/efi"
esp=$WORK/esp.img
mkfs.vfat -C -n ESP "$esp" $((ESP_MB * 1024)) >/dev/null
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/debian
mcopy -i "$esp" "$CACHE/efi/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" "$CACHE/efi/grubx64.efi" ::/EFI/BOOT/grubx64.efi
mcopy -i "$esp" "$HERE/files/grub-efi.cfg" ::/EFI/debian/grub.cfg
mcopy -i "$esp" "$HERE/files/grub-efi.cfg" ::/EFI/BOOT/grub.cfg
dd if="$esp" of="$raw" bs=512 seek="$PART_START" conv=notrunc status=none

GRUB=/usr/lib/grub/i386-pc
grub-mkimage -O i386-pc -o "$WORK/core.img" -c "$HERE/files/grub-embedded.cfg" -p '(hd0,msdos1)/boot/grub' \
  biosdisk part_msdos ext2 linux serial terminal boot echo
core_sectors=$((($(stat -c %s "$WORK/core.img") + 511) / 512))
((core_sectors < PART_START)) || { log "GRUB's core image does not fit before the partition"; exit 1; }
dd if="$GRUB/boot.img" of="$raw" bs=440 count=1 conv=notrunc status=none
dd if="$WORK/core.img" of="$raw" bs=512 seek=1 conv=notrunc status=none

qemu-img convert -q -O qcow2 "$raw" "$IMAGE.tmp"
mv "$IMAGE.tmp" "$IMAGE"
echo "$KEY" >"$IMAGE.key"
log "built $IMAGE ($(du -h "$IMAGE" | cut -f1))"
