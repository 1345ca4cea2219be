#!/usr/bin/env bash
# Several stages.sh stage groups at once, one GPU each (a machine of several GPUs):
#   bash benchmarks/device/parallel.sh "tests decode" "bench-short" "bench-long" "bench-dims"
# Group i runs on GPU i with its outputs under /tmp/res/g<i>; everything comes back as one
# $OUT/results.tgz (the device returns few files), and each group's summary is printed last.
# GROUP_LIMIT (seconds, default 540) stops a group early enough for the archive to be written.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$here/../out}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
cd "$here/../.." || exit 2
bash "$here/stages.sh" setup >/dev/null
i=0
for group in "$@"; do
  mkdir -p "/tmp/res/g$i"
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=$i SKIP_INSTALL=1 OUT="/tmp/res/g$i" timeout "${GROUP_LIMIT:-540}" bash "$here/stages.sh" $group \
    >"/tmp/res/g$i/stdout.log" 2>&1 &
  i=$((i + 1))
done
wait
tar czf "$out/results.tgz" -C /tmp/res . 2>/dev/null
for ((j = 0; j < i; j++)); do
  echo "=== GPU $j: ${*:$((j + 1)):1}"
  tail -n 25 "/tmp/res/g$j/stdout.log"
done
