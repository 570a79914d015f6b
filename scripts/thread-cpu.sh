#!/bin/bash
# CPU time and context switches of each thread of a running process over a window: where a
# fixed-rate shape's CPU goes (the runtime's worker, the spool thread, blocking threads).
# Threads that start or end within the window are left out.
# usage: scripts/thread-cpu.sh PID SECONDS
set -euo pipefail
pid=$1
secs=$2
snap() {
    for t in /proc/"$pid"/task/*; do
        # schedstat: ns on the CPU; status: voluntary and involuntary switches.
        echo "$(basename "$t") $(tr ' ' _ < "$t"/comm) $(awk '{print $1}' "$t"/schedstat)" \
            "$(awk '/^(non)?voluntary_ctxt_switches/ {s += $2} END {print s}' "$t"/status)"
    done | sort
}
before=$(snap)
sleep "$secs"
after=$(snap)
join <(echo "$before") <(echo "$after") | awk -v s="$secs" '
    { cpu = ($6 - $3) / 1e6; cs = $7 - $4; tc += cpu; tcs += cs
      printf "%-8s %-18s cpu %9.2f ms  switches %7d\n", $1, $2, cpu, cs }
    END { printf "total: %.3f ms of CPU a second, %.1f switches a second\n", tc / s, tcs / s }'
