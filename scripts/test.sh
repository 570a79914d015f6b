#!/usr/bin/env bash
# The whole test suite, from a fresh Debian/Ubuntu machine with Rust: installs what the tests
# start (Mosquitto from apt; Node.js and the Kinesis emulator from npm), then runs formatting,
# lints, unit tests and the end-to-end tests against the real programs on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || missing+=(mosquitto)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]} (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

echo "==> Kinesis emulator (npm: kinesis-local)"
npm ci --prefix tests/support --no-audit --no-fund --loglevel=error

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy -D warnings"
cargo clippy --release --all-targets --locked -- -D warnings
echo "==> criterion benchmarks in test mode (each runs once)"
cargo test --release --locked --bench hot_paths
echo "==> load program, quick mode (a smoke test: it prints figures and asserts no timings)"
cargo bench --locked --bench load -- --quick
echo "==> cargo test (unit + end-to-end), last so its summary closes the run"
# Two test threads: each end-to-end test runs its own broker and agent beside the emulator.
cargo test --release --locked --lib --bins --test e2e -- --test-threads 2
