#!/usr/bin/env bash
# Installs the host tools kiln needs (Debian 12) and builds kiln. Run as root (or with sudo).
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
PACKAGES=(
  mmdebstrap arch-test        # base stage
  squashfs-tools-ng           # sqfs2tar/sqfsdiff: tests read back kiln's root.squashfs
  squashfs-tools              # unsquashfs: read-back in tests; mksquashfs: kiln bench reference
  zstd                        # kiln bench reference (zstd -T0)
  qemu-system-x86 ovmf        # boot tests (TCG, UEFI)
  fdisk mtools                # GPT / FAT read-back in tests
  ipxe                        # kiln serve: iPXE binaries for PXE clients
  ca-certificates
)
# Not installed here: nginx-light and tftpd-hpa, kiln bench's pxe peers (the bench prints a SKIP
# row without them). Debian starts their system services on ports 80 and 69 (kiln serve's TFTP
# port); install them yourself and `systemctl disable --now nginx tftpd-hpa` if you want the rows.
if ! $SUDO apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
fi
# qemu-img (disk.qcow2) after qemu-system-x86, which may replace a qemu-utils from outside apt.
command -v qemu-img >/dev/null || $SUDO apt-get install -y -qq --no-install-recommends qemu-utils
command -v qemu-img >/dev/null || { echo "setup: qemu-img missing after install" >&2; exit 1; }
cargo build --release --locked
# The cluster's keys (SSH, image signing, sealed-secrets controller, k3s token, module
# signing), once; on later runs only key kinds a newer kiln added are made.
if [ ! -e keys/k3s-token ]; then ./target/release/kiln keys init; else ./target/release/kiln keys init --add-missing; fi
