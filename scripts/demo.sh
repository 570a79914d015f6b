#!/usr/bin/env bash
# Builds edgeship and runs its self-contained demo: an embedded MQTT broker, simulated devices
# and the real pipeline (SQLite spool, zstd frames) into a local folder. No cloud account and
# no installed broker needed. Extra arguments go to `edgeship demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin edgeship
exec "${CARGO_TARGET_DIR:-target}/release/edgeship" demo "$@"
