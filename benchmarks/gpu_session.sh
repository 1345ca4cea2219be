#!/usr/bin/env bash
# One call on the lent GPU machine: correctness first, then timings, each stage with its own time
# limit so a slow stage cannot starve the rest. Usage (from the repo root, with .whl carried):
#   bash benchmarks/gpu_session.sh [stage ...]     stages: tests bench quick decode sweep rewrite
# Outputs land under $OUT (or benchmarks/out) per stage; the last lines printed are the summary.
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/out}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
# registers the package's entry points (backend="lightning") without touching the image's packages
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests quick decode)
summary=()
for stage in "${stages[@]}"; do
  start=$(date +%s)
  case "$stage" in
    tests)   timeout 420 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -5 ;;
    bench)   timeout 540 python3 benchmarks/bench.py --out "$out/bench" 2>&1 | tail -60 ;;
    quick)   timeout 240 python3 benchmarks/bench.py --quick --out "$out/quick" 2>&1 | tail -12 ;;
    decode)  timeout 240 python3 benchmarks/bench_decode.py --out "$out/decode" 2>&1 | tail -40 ;;
    sweep)   timeout 300 python3 benchmarks/sweep_configs.py --backward 2>&1 | tail -45 ;;
    rewrite) timeout 300 python3 examples/rewrite_existing_model.py --device cuda --dtype bfloat16 --hidden 1024 \
               --heads 16 --layers 4 --lengths 4096 16384 --compile 2>&1 | tail -20 ;;
    *) echo "unknown stage $stage"; continue ;;
  esac
  summary+=("$stage: rc=${PIPESTATUS[0]} $(( $(date +%s) - start )) s")
done
printf '%s\n' "--- stages ---" "${summary[@]}"
