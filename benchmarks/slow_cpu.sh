#!/usr/bin/env bash
# Run a command as if on a slower machine: the command and its children get CORES CPUs' worth of time per
# 100 ms (a CFS quota in a cgroup of their own), however many threads they run. On the project's 2-core VM,
# 0.78 cores run the demo's fp32 step (0.344 s on one thread) in 0.448 s: the slower machine of issue 22
# (benchmarks/RESULTS.md). With 2 threads a quota slows steps erratically (it also throttles their waits on each
# other); on one thread it is proportional.
#
#     sudo bash benchmarks/slow_cpu.sh 0.78 maskrcnn demo --minutes 5 --out /tmp/demo_slow
#
# Needs root and the cgroup `cpu` controller (v1 at /sys/fs/cgroup/cpu, or v2 with cpu.max). A quota slows
# every instruction alike: it does not model a CPU whose memory, vector units or caches differ.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 CORES COMMAND [ARGS...]   (CORES: CPU time per wall second, e.g. 0.78)" >&2
    exit 2
fi
cores=$1
shift
if ! [[ $cores =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "$0: CORES must be a positive number, got '$cores'" >&2
    exit 2
fi
period_us=100000
quota_us=$(awk -v c="$cores" -v p="$period_us" 'BEGIN { printf "%d", c * p }')
if [[ $quota_us -lt 1000 ]]; then
    echo "$0: CORES=$cores is under the kernel's 1 ms minimum quota per 100 ms" >&2
    exit 2
fi

name="maskrcnn-slow-$$"
if [[ -d /sys/fs/cgroup/cpu && -w /sys/fs/cgroup/cpu ]]; then        # cgroup v1
    group=/sys/fs/cgroup/cpu/$name
    mkdir "$group"
    echo "$period_us" > "$group/cpu.cfs_period_us"
    echo "$quota_us" > "$group/cpu.cfs_quota_us"
elif [[ -f /sys/fs/cgroup/cgroup.controllers ]] && grep -qw cpu /sys/fs/cgroup/cgroup.controllers; then  # v2
    group=/sys/fs/cgroup/$name
    mkdir "$group"
    echo "$quota_us $period_us" > "$group/cpu.max"
else
    echo "$0: no writable cgroup cpu controller (root and cgroup v1 or v2 needed)" >&2
    exit 1
fi
# on exit this shell moves back to the parent group, then the emptied group is removed
trap 'echo $$ > "$(dirname "$group")/cgroup.procs"; rmdir "$group" 2>/dev/null || true' EXIT
echo "slow_cpu: $cores CPUs' worth of time per wall second (quota $quota_us us per $period_us us) in $group" >&2
echo $$ > "$group/cgroup.procs"
"$@"
