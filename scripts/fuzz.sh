#!/usr/bin/env bash
# Fuzzes the agent's parsers with cargo-fuzz (libFuzzer): the frame decoders, the KPL decoder,
# the config parser, the fleet document reader, and the MQTT topic-to-route path.
#
#   scripts/fuzz.sh                 # every target 600 s (what a release is held to)
#   scripts/fuzz.sh 5               # every target 5 s (CI: a short pass)
#   scripts/fuzz.sh 60 frame kpl    # chosen targets
#
# Installs the nightly toolchain (rustup) and cargo-fuzz (crates.io) on first use; cargo-fuzz
# is built once into a folder outside the clone, keyed by its version. Seeds are committed in
# tests/fuzz/corpus/<target>; what libFuzzer finds goes to a corpus beside the build, and a
# crash stops the run with the input saved under tests/fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame kpl config fleet_document route)

CARGO_FUZZ_VERSION=0.13.2
tools="${EDGESHIP_TOOLS_DIR:-/var/tmp/edgeship-tools}/cargo-fuzz-$CARGO_FUZZ_VERSION"
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "==> rustup toolchain install nightly (for cargo-fuzz's sanitizer flags)"
  rustup toolchain install nightly --profile minimal
fi
if [ ! -x "$tools/bin/cargo-fuzz" ]; then
  echo "==> cargo install cargo-fuzz $CARGO_FUZZ_VERSION into $tools"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$tools"
fi
export PATH="$tools/bin:$PATH"
work="${CARGO_TARGET_DIR:-target}/fuzz-corpus"
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  echo "==> fuzz $t for ${seconds}s"
  log="$work/$t.log"
  if ! cargo +nightly fuzz run --fuzz-dir tests/fuzz "$t" "$work/$t" "tests/fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=1024 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz $t failed (a crash is saved under tests/fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  grep -E "^stat::(number_of_executed_units|peak_rss_mb)" "$log" | sed "s/^/  $t /"
done
