#!/usr/bin/env bash
# Builds the shipped agent (the `dist` profile: opt-level s, thin LTO, stripped) for an ARM
# gateway, from an x86-64 Debian/Ubuntu machine, with Debian's cross compilers and a rustup
# target. Installs what it needs (apt, rustup) when it is missing.
#
#   cross/build.sh aarch64   # Raspberry Pi 3/4/5 on a 64-bit OS, most industrial gateways
#   cross/build.sh armv7     # 32-bit Raspberry Pi OS (armhf)
#
# The binary lands in ${CARGO_TARGET_DIR:-target}/<triple>/dist/edgeship; the last line this
# prints is its path. The C in the dependency tree (SQLite, zstd, ring) is compiled by the
# target's gcc; TLS is rustls with ring, which cross-compiles without cmake or perl.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  aarch64 | arm64) triple=aarch64-unknown-linux-gnu gnu=aarch64-linux-gnu deb_arch=arm64 ;;
  armv7 | armhf) triple=armv7-unknown-linux-gnueabihf gnu=arm-linux-gnueabihf deb_arch=armhf ;;
  *)
    echo "usage: cross/build.sh aarch64|armv7" >&2
    exit 2
    ;;
esac

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

qemu="qemu-aarch64-static"
[ "$deb_arch" = armhf ] && qemu="qemu-arm-static"
if ! command -v "$gnu-gcc" >/dev/null || [ ! -d "/usr/$gnu/lib" ] || ! command -v "$qemu" >/dev/null; then
  echo "==> installing the $deb_arch cross toolchain (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "gcc-$gnu" "libc6-dev-$deb_arch-cross" "binutils-$gnu" qemu-user-static
fi
if ! rustup target list --installed | grep -qx "$triple"; then
  echo "==> rustup target add $triple"
  rustup target add "$triple"
fi

upper=$(echo "$triple" | tr '[:lower:]-' '[:upper:]_')
lower=${triple//-/_}
export "CARGO_TARGET_${upper}_LINKER=$gnu-gcc"
export "CC_${lower}=$gnu-gcc" "AR_${lower}=$gnu-ar"

# The packages' features: no demo (gateways have a broker), Parquet objects for S3.
echo "==> cargo build --profile dist --no-default-features --features parquet --target $triple"
cargo build --locked --profile dist --no-default-features --features parquet --target "$triple" --bin edgeship

bin="${CARGO_TARGET_DIR:-target}/$triple/dist/edgeship"
version=$("$qemu" -L "/usr/$gnu" "$bin" --version)
size=$(stat -c %s "$bin")
echo "==> $triple: $version, stripped binary $size bytes ($(awk "BEGIN{printf \"%.1f\", $size/1048576}") MiB)"
echo "$bin"
