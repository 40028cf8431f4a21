# Shell functions shared by /init and its helpers (sourced, busybox ash).
# shellcheck shell=sh

# say MESSAGE: an "SFTEST ..." marker line on the serial console, and on the VGA
# text console (tty0) so that a screenshot shows it too. The markers are listed
# in guest/README.md; tests and the node agent wait for them.
say() {
  echo "SFTEST $*" >/dev/console
  echo "SFTEST $*" >/dev/tty0 2>/dev/null
}

# nap SECONDS: sleep without a process. `sleep` forks and execs busybox, which
# under TCG costs enough to show as idle CPU when done a few times a second.
# A read with a timeout on a FIFO that nobody writes waits just as well.
nap() {
  [ -p /run/nap ] || mkfifo /run/nap
  # shellcheck disable=SC3045  # busybox ash's read has -t, with fractions
  read -r -t "$1" _ 0<>/run/nap || true
}

# nic_added NAME / nic_removed NAME: report a NIC once (a directory per NIC in
# /run/nics makes this safe when the boot-time scan and uevents overlap).
# Only interfaces backed by a device count: not lo, not virtual ones.
nic_added() {
  [ -e "/sys/class/net/$1/device" ] || return 0
  mkdir -p /run/nics
  mkdir "/run/nics/$1" 2>/dev/null || return 0
  read -r mac <"/sys/class/net/$1/address"
  ip link set "$1" up
  say "nic-added: $1 $mac"
  # Its address by DHCP (bin/sf-dhcp), in the background: a few tries, then quiet
  # (an idle guest stays idle on a network without DHCP). -O mtu asks for the MTU.
  udhcpc -i "$1" -s /bin/sf-dhcp -O mtu -f -n -t 8 -T 2 -x hostname:"$(hostname)" \
    -p "/run/nics/$1/udhcpc.pid" >/dev/null 2>&1 &
}
nic_removed() {
  [ -d "/run/nics/$1" ] || return 0
  [ -f "/run/nics/$1/udhcpc.pid" ] && kill "$(cat "/run/nics/$1/udhcpc.pid")" 2>/dev/null
  rm -rf "/run/nics/$1"
  say "nic-removed: $1"
}
