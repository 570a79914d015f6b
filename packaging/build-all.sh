#!/usr/bin/env bash
# The three packages in one command: builds the shipped agent (`dist` profile) for x86-64,
# aarch64 and armv7, then edgeship_<version>_{amd64,arm64,armhf}.deb into ${1:-target/deb}.
#
#   packaging/build-all.sh [OUT_DIR]
#
# The ARM builds come from cross/build.sh (Debian's cross compilers, installed if missing).
# Each target is built once; clean builds take several minutes each on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/deb}
mkdir -p "$out"
target_dir=${CARGO_TARGET_DIR:-target}

cargo build --locked --profile dist --no-default-features --features parquet --bin edgeship
packaging/build-deb.sh --arch amd64 --binary "$target_dir/dist/edgeship" --out "$out"
for arch in aarch64 armv7; do
  bin=$(cross/build.sh "$arch" | tail -1)
  deb_arch=arm64
  [ "$arch" = armv7 ] && deb_arch=armhf
  packaging/build-deb.sh --arch "$deb_arch" --binary "$bin" --out "$out"
done
ls -l "$out"/*.deb
