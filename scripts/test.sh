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
# TLS in front of the Kafka broker in the Kafka tests (tansu does not terminate TLS itself).
command -v stunnel4 >/dev/null || missing+=(stunnel4)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]} (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

echo "==> Kinesis emulator (npm: kinesis-local)"
npm ci --prefix tests/support --no-audit --no-fund --loglevel=error

# Python tools the tests run: prometheus-client (exposition parser) and zstandard (the consumer
# decoder in consumers/python). A venv keeps them off the system Python.
echo "==> Python test tools (PyPI: prometheus-client, zstandard, moto[server], duckdb)"
if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv
fi
[ -x tests/support/.venv/bin/python3 ] || python3 -m venv tests/support/.venv
tests/support/.venv/bin/pip install --quiet --disable-pip-version-check -r tests/support/requirements.txt

# promtool (the Prometheus project's exposition checker) comes from Debian's prometheus
# package; only the one binary is extracted, so no Prometheus server is installed or started.
if [ ! -x tests/support/bin/promtool ]; then
  echo "==> promtool (apt: prometheus, extracted)"
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) || {
    as_root apt-get update -qq
    (cd "$tmp" && apt-get download prometheus >/dev/null)
  }
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  mkdir -p tests/support/bin
  cp "$tmp/root/usr/bin/promtool" tests/support/bin/promtool
  rm -rf "$tmp"
fi

# s3s-fs, the stricter of the two S3 servers the tests run (it refuses parts under 5 MiB),
# built once into a folder outside the clone, keyed by its version, and reused.
s3s_version=0.14.1
tools="${EDGESHIP_TOOLS:-$HOME/.cache/edgeship/tools}"
export EDGESHIP_S3S_FS="$tools/s3s-fs-$s3s_version/bin/s3s-fs"
if [ ! -x "$EDGESHIP_S3S_FS" ]; then
  echo "==> s3s-fs $s3s_version (crates.io; built once into $tools)"
  cargo install s3s-fs --version "$s3s_version" --features binary --locked --quiet \
    --root "$tools/s3s-fs-$s3s_version"
fi

# tansu, a Kafka-compatible broker (its SQLite storage keeps users and survives restarts),
# built the same way, at opt-level 1 (a test broker: the build is the cost, not its speed).
tansu_version=0.6.0
export EDGESHIP_TANSU="$tools/tansu-$tansu_version/bin/tansu"
if [ ! -x "$EDGESHIP_TANSU" ]; then
  echo "==> tansu $tansu_version (crates.io; built once into $tools)"
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 cargo install tansu --version "$tansu_version" \
    --features libsql --locked --quiet --root "$tools/tansu-$tansu_version"
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> no import cycles among the agent's modules"
python3 scripts/module-cycles.py
echo "==> cargo clippy -D warnings"
cargo clippy --release --all-targets --locked -- -D warnings
# The packages' feature set (no demo) too.
cargo clippy --release --lib --bin edgeship --locked --no-default-features -- -D warnings
echo "==> criterion benchmarks in test mode (each runs once)"
cargo test --release --locked --bench hot_paths
echo "==> load program, quick mode (a smoke test: it prints figures and asserts no timings)"
cargo bench --locked --bench load -- --quick
echo "==> Python consumer decoder (consumers/python), against frames of the built agent"
cargo build --release --locked --bin edgeship
EDGESHIP_BIN="${CARGO_TARGET_DIR:-target}/release/edgeship" \
  tests/support/.venv/bin/python3 -m unittest discover -s consumers/python
# The .deb (packaging/): built from the same release binary, linted, then installed, upgraded,
# removed and purged on this machine. That changes the system, so it runs only as root (CI)
# or when EDGESHIP_TEST_DEB=1 asks for it.
if [ "$(id -u)" -eq 0 ] || [ "${EDGESHIP_TEST_DEB:-0}" = 1 ]; then
  echo "==> .deb package: build, lintian, install/upgrade/purge test"
  need=()
  for tool in lintian systemd-analyze adduser; do command -v "$tool" >/dev/null || need+=("$tool"); done
  if [ ${#need[@]} -gt 0 ]; then
    pkgs=(lintian adduser ca-certificates)
    command -v systemd-analyze >/dev/null || pkgs+=(systemd)
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
  fi
  deb_out=$(mktemp -d)
  bin="${CARGO_TARGET_DIR:-target}/release/edgeship"
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
  packaging/build-deb.sh --arch amd64 --binary "$bin" --out "$deb_out"
  packaging/build-deb.sh --arch amd64 --binary "$bin" --version "$version-1+upgrade" --out "$deb_out"
  lintian --fail-on error,warning "$deb_out/edgeship_${version}_amd64.deb"
  as_root packaging/test-deb.sh "$deb_out/edgeship_${version}_amd64.deb" "$deb_out/edgeship_${version}-1+upgrade_amd64.deb"
  # Spooled by the installed N (as its service user), shipped by N+1 installed over it.
  as_root env "PATH=$PATH" "CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}" \
    "EDGESHIP_DEB_N=$deb_out/edgeship_${version}_amd64.deb" \
    "EDGESHIP_DEB_N1=$deb_out/edgeship_${version}-1+upgrade_amd64.deb" \
    cargo test --release --locked --test e2e package -- --ignored
  rm -rf "$deb_out"
else
  echo "==> .deb package test skipped (not root; EDGESHIP_TEST_DEB=1 runs it with sudo)"
fi
# ARM: each target built once (cross/, the shipped `dist` profile), run in the end-to-end
# tests under qemu-user (aarch64 also with 16 KiB pages, as on a Raspberry Pi 5), and packaged.
echo "==> ARM builds (cross/build.sh), end-to-end under qemu (cross/e2e.sh), packages"
command -v lintian >/dev/null || {
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lintian
}
arm_debs=$(mktemp -d)
for arch in aarch64 armv7; do
  bin=$(cross/build.sh "$arch" | tail -1)
  deb_arch=arm64
  [ "$arch" = armv7 ] && deb_arch=armhf
  packaging/build-deb.sh --arch "$deb_arch" --binary "$bin" --out "$arm_debs"
done
lintian --fail-on error,warning "$arm_debs"/*.deb
rm -rf "$arm_debs"
cross/e2e.sh aarch64 4096
cross/e2e.sh aarch64 16384 hundred_thousand
cross/e2e.sh armv7 4096
echo "==> fuzzing, a short pass: every target 5 s (scripts/fuzz.sh 600 for the long one)"
scripts/fuzz.sh 5
echo "==> cargo test (unit + end-to-end), last so its summary closes the run"
# Two test threads: each end-to-end test runs its own broker and agent beside the emulator.
cargo test --release --locked --lib --bins --test e2e -- --test-threads 2
