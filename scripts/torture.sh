#!/usr/bin/env bash
# The fault-injection runs too long for every CI run: the kill storm (SIGKILL of the agent at
# random moments while devices publish; default 200 kills over 300,000 QoS 1 messages) and
# the power cuts (the spool and a folder destination on a disk that forgets unsynced writes,
# sync = "full"; default 200 cuts; needs root and /dev/fuse). Each prints its figures; any
# message lost fails the run.
#
#   scripts/torture.sh                      # defaults
#   EDGESHIP_TORTURE_KILLS=500 EDGESHIP_TORTURE_MESSAGES=1000000 EDGESHIP_TORTURE_CUTS=500 scripts/torture.sh
#
# Run scripts/test.sh once first: it installs Mosquitto and the Kinesis emulator.
set -euo pipefail
cd "$(dirname "$0")/.."
export EDGESHIP_TORTURE_KILLS="${EDGESHIP_TORTURE_KILLS:-200}"
export EDGESHIP_TORTURE_MESSAGES="${EDGESHIP_TORTURE_MESSAGES:-300000}"
export EDGESHIP_TORTURE_CUTS="${EDGESHIP_TORTURE_CUTS:-200}"
echo "==> kill storm: $EDGESHIP_TORTURE_KILLS kills, $EDGESHIP_TORTURE_MESSAGES messages"
cargo test --release --locked --test e2e -- --ignored --nocapture --test-threads 1 a_long_kill_storm
echo "==> power cuts: $EDGESHIP_TORTURE_CUTS cuts (sync = full)"
cargo test --release --locked --test e2e -- --ignored --nocapture --test-threads 1 many_power_cuts
