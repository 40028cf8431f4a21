# Sourced by the image builds: Debian's shim and GRUB for UEFI boot, signed for secure
# boot, downloaded once into $CACHE and unpacked (never installed on the host).
#   efi_binaries DIR   -> DIR/BOOTX64.EFI (shim) and DIR/grubx64.efi
# shim starts the GRUB beside it, which reads its configuration from /EFI/debian on the
# EFI system partition (its built-in prefix). Needs: CACHE, log, die.
EFI_PACKAGES=(shim-signed grub-efi-amd64-signed)

efi_deb() {  # the newest cached .deb of a package
  compgen -G "$CACHE/${1}_*.deb" | sort -V | tail -n 1 || true
}

efi_binaries() {
  local dir=$1 pkg tmp
  for pkg in "${EFI_PACKAGES[@]}"; do
    if [[ -z $(efi_deb "$pkg") ]]; then
      log "downloading $pkg"
      tmp=$(mktemp -d "$CACHE/download.XXXXXX")
      (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg") >&2 ||
        die "apt-get download $pkg failed"
      mv "$tmp"/*.deb "$CACHE"/
      rmdir "$tmp"
    fi
  done
  if [[ -f $dir/grubx64.efi && $dir/grubx64.efi -nt $(efi_deb shim-signed) &&
        $dir/grubx64.efi -nt $(efi_deb grub-efi-amd64-signed) ]]; then
    return 0
  fi
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/deb"
  for pkg in "${EFI_PACKAGES[@]}"; do dpkg-deb -x "$(efi_deb "$pkg")" "$dir.tmp/deb"; done
  cp "$dir.tmp/deb/usr/lib/shim/shimx64.efi.signed" "$dir.tmp/BOOTX64.EFI"
  cp "$dir.tmp/deb/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed" "$dir.tmp/grubx64.efi"
  rm -rf "$dir.tmp/deb" "$dir" && mv "$dir.tmp" "$dir"
}
