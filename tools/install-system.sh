#!/usr/bin/env bash
# Install the Debian packages the plane and its tests need. Idempotent: it asks
# apt only for what dpkg says is missing, so a warm machine pays nothing.
set -euo pipefail

PACKAGES=(
  etcd-server etcd-client                       # the store (etcd 3.4 on bookworm)
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
  qemu-system-x86 qemu-utils                    # real guests under QEMU
  busybox-static genisoimage                    # test guest image and config drives
  syslinux extlinux syslinux-common mtools dosfstools   # a real BIOS-bootable test disk
  python3-venv python3-dev gcc                  # the venv and libvirt-python's build
  nodejs npm                                    # buf comes from npm
  iproute2 curl jq iputils-ping
  dnsmasq-base dnsmasq-utils                    # DHCP and DNS of a network node (dhcp_release)
  nftables conntrack                            # NAT and floating addresses on a network node
  mmdebstrap grub-pc-bin e2fsprogs fdisk        # the Debian cloud test image (guest/debian/)
  chromium chromium-driver                      # the web console's browser test (Selenium)
  ovmf swtpm swtpm-tools                        # UEFI and secure boot firmware, vTPMs for guests
)

# sfnode runs libvirt's QEMU driver in-process (qemu:///embed). As root it
# resolves the compiled-in default QEMU user, libvirt-qemu, before it reads its
# qemu.conf (which says root) and fails when that user does not exist. The
# package that would create it, libvirt-daemon-system, also brings systemd
# units and a global qemu.conf that sfnode does not want: create the user only.
# (Not root: the embed driver runs unprivileged and needs no such user.)
if ! getent passwd libvirt-qemu >/dev/null; then
  if [[ $(id -u) -eq 0 ]]; then
    echo "creating system user libvirt-qemu"
    if getent group libvirt-qemu >/dev/null; then group=(--gid libvirt-qemu); else group=(--user-group); fi
    useradd --system "${group[@]}" --no-create-home --home-dir /var/lib/libvirt \
      --shell /usr/sbin/nologin --comment "Libvirt Qemu" libvirt-qemu
  else
    echo "note: user libvirt-qemu is missing; sfnode needs it when run as root" >&2
  fi
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# node and npm may come from elsewhere (for example a preinstalled Node.js).
if command -v node >/dev/null && command -v npm >/dev/null; then
  missing=("${missing[@]/nodejs}"); missing=("${missing[@]/npm}")
fi
read -r -a missing <<<"${missing[*]}"
((${#missing[@]})) || exit 0

if [[ $(id -u) -ne 0 ]]; then
  echo "missing Debian packages (run as root to install): ${missing[*]}" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
