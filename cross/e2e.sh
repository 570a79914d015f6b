#!/usr/bin/env bash
# Runs end-to-end tests with an ARM build of the agent under qemu-user: the test harness
# (Mosquitto, the Kinesis emulator, the reader that compares records) runs natively, the agent
# process is the ARM binary, emulated. binfmt_misc is not assumed: qemu is called explicitly.
#
#   cross/e2e.sh aarch64 [PAGE_SIZE] [TEST_FILTER...]
#   cross/e2e.sh armv7   [PAGE_SIZE] [TEST_FILTER...]
#
# PAGE_SIZE (default 4096) is the page size qemu reports to the agent: 16384 plays a
# Raspberry Pi 5 kernel. Needs the binary from cross/build.sh and the native test build.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  aarch64 | arm64) triple=aarch64-unknown-linux-gnu gnu=aarch64-linux-gnu qemu=qemu-aarch64-static ;;
  armv7 | armhf) triple=armv7-unknown-linux-gnueabihf gnu=arm-linux-gnueabihf qemu=qemu-arm-static ;;
  *)
    echo "usage: cross/e2e.sh aarch64|armv7 [PAGE_SIZE] [TEST_FILTER...]" >&2
    exit 2
    ;;
esac
page=${2:-4096}
shift $(($# >= 2 ? 2 : 1))
filters=("$@")
[ ${#filters[@]} -gt 0 ] || filters=(hundred_thousand kill_nine metrics_account)

bin="$(realpath "${CARGO_TARGET_DIR:-target}/$triple/dist/edgeship")"
[ -x "$bin" ] || { echo "cross/e2e.sh: no $bin; run cross/build.sh $1 first" >&2; exit 1; }

# The harness starts the agent as `$EDGESHIP_AGENT_BIN run --config FILE`; exec keeps the
# process the harness signals (SIGTERM, kill -9) the emulated agent itself. Each start is
# recorded, so a run that silently used the native binary fails.
wrapper_dir=$(mktemp -d)
trap 'rm -rf "$wrapper_dir"' EXIT
cat >"$wrapper_dir/edgeship" <<WRAP
#!/bin/sh
[ "\$1" = run ] && echo start >>"$wrapper_dir/starts"
exec $qemu -p $page -L /usr/$gnu "$bin" "\$@"
WRAP
chmod +x "$wrapper_dir/edgeship"
reported=$("$wrapper_dir/edgeship" --version)
echo "==> $triple agent ($reported) under $qemu, page size $page: ${filters[*]}"

status=0
for f in "${filters[@]}"; do
  : >"$wrapper_dir/starts"
  log="$wrapper_dir/$f.log"
  if EDGESHIP_AGENT_BIN="$wrapper_dir/edgeship" \
    cargo test --release --locked --test e2e "$f" -- --test-threads 1 --nocapture >"$log" 2>&1 &&
    grep -q 'test result: ok\. [1-9]' "$log" && [ -s "$wrapper_dir/starts" ]; then
    grep -E '^test |^test [0-9]+|test result' "$log"
    echo "    ($(wc -l <"$wrapper_dir/starts") start(s) of the emulated agent)"
  else
    cat "$log"
    echo "cross/e2e.sh: $f failed with the $triple agent (page size $page)" >&2
    status=1
  fi
done
exit $status
