#!/usr/bin/env bash
# One call on the lent GPU machine: correctness first, then timings, each stage with its own time
# limit so a slow stage cannot starve the rest. Usage (with .whl carried; runs in the repo root):
#   bash benchmarks/device/stages.sh [stage ...]     stages: setup tests bench bench-check bench-short bench-long bench-dims quick decode
#                                                     rewrite deploy decay-grad serve serve-example census forms compiled
# `census forms` fit one 600-s call (300 + 270 s at most). Outputs land under $OUT (or benchmarks/out) per stage; the last lines printed are the summary.
# SKIP_INSTALL=1: the installs were made by an earlier call (parallel.sh); TEST_SHARDS: processes of the suite (default 8;
# each compiles its own kernels: 14 ran a cold run to its end in 500 s on an H100, where out-of-memory failures
# showed the caching allocators' share, now handed back after each test, tests/conftest.py); TEST_LIMIT: seconds per test shard
# (default 560: on a cold compile cache the eight shards need about 850 s, so a whole run takes two calls
# or a warm cache; a cut shard still lists every test it finished).
set -uo pipefail
export PYTHONUNBUFFERED=1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${OUT:-$root/benchmarks/out}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
cd "$root" || exit 2
if [ -n "${SKIP_INSTALL:-}" ]; then
  export PYTHONPATH="/tmp/site:$PWD"
elif ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
# registers the package's entry points (backend="lightning") without touching the image's packages
[ -n "${SKIP_INSTALL:-}" ] || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || echo "editable install failed"
# The image's CXX (/opt/gcc/bin/g++) builds AOTInductor packages whose load dies in std::regex
# (SIGSEGV); packages built by the system g++ load and run (RESULTS.md, 2026-12-02)
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests quick decode)
summary=()
for stage in "${stages[@]}"; do
  start=$(date +%s)
  case "$stage" in
    tests)   # the GPU suite and the kernel tests (tests/test_kernels*.py, the decay gradient's; on CUDA there); eight processes share the compile-bound run (see LIGHTNING_TEST_SHARD in tests/conftest.py),
             # a ninth and a tenth build and load the packages (about 200 s each); -v ends a line per test, so a shard cut off by its limit still shows how far it got
             # each AOTInductor package build (about 200 s) gets a process of its own
             pkg=tests/test_gpu.py::test_cuda_package_runs_without_lightning_op
             pkg2=tests/test_gpu.py::test_cuda_package_of_packed_grouped_heads
             rm -f /tmp/tests-*.log   # a warm machine keeps the last call's logs
             timeout "${TEST_LIMIT:-560}" python3 -m pytest -q -p no:cacheprovider "$pkg" >/tmp/tests-pkg.log 2>&1 &
             timeout "${TEST_LIMIT:-560}" python3 -m pytest -q -p no:cacheprovider "$pkg2" >/tmp/tests-pkg2.log 2>&1 &
             shards=${TEST_SHARDS:-8}
             for i in $(seq 0 $((shards - 1))); do
               LIGHTNING_TEST_SHARD=$i/$shards TORCHINDUCTOR_COMPILE_THREADS=1 timeout "${TEST_LIMIT:-560}" python3 -m pytest -v tests/test_gpu.py tests/test_kernels*.py tests/test_decay_grad_kernels.py tests/test_decay_grad_moment.py \
                 --deselect "$pkg" --deselect "$pkg2" -p no:cacheprovider >"/tmp/tests-$i.log" 2>&1 &
             done
             wait; cat /tmp/tests-*.log >"$out/tests.log"   # one file: few files come back from the device
             grep -h -E "passed|failed|error" /tmp/tests-*.log | tail -$((shards + 2))
             echo "tests run to the end, across shards (cut-off shards included):"
             grep -h -o -E " (PASSED|FAILED|ERROR|SKIPPED) " /tmp/tests-*.log | sort | uniq -c
             grep -h -E "^(FAILED|ERROR)" /tmp/tests-*.log | head -20 || true ;;
    setup)   ;;  # the installs above only
    bench-short|bench-long|bench-dims)
             preset=$([ "$stage" = bench-short ] && echo main-short || ([ "$stage" = bench-long ] && echo main-long,long || echo d64,d256))
             timeout 560 python3 benchmarks/bench.py --preset "$preset" --budget-s 420 --out "$out/$stage" 2>&1 | tee "$out/$stage.log" | tail -40 ;;
    bench-check)  # ours (both layouts) against fla where the last changes act: main, long, B = 1
             timeout 400 python3 benchmarks/bench.py --preset quick,main-long --impls ours,ours_bnhd,fla \
               --budget-s 300 --out "$out/$stage" 2>&1 | tee "$out/$stage.log" | tail -30 ;;
    bench)   timeout 540 python3 benchmarks/bench.py --budget-s 420 --out "$out/bench" 2>&1 | tee "$out/bench.log" | tail -60 ;;
    quick)   timeout 240 python3 benchmarks/bench.py --quick --out "$out/quick" 2>&1 | tee "$out/quick.log" | tail -12 ;;
    decode)  timeout 150 python3 benchmarks/bench_decode.py --out "$out/decode" 2>&1 | tee "$out/decode.log" | tail -40 ;;
    rewrite) timeout 200 python3 examples/rewrite_existing_model.py --device cuda --dtype bfloat16 --hidden 1024 \
               --heads 16 --layers 4 --lengths 4096 16384 2>&1 | tee "$out/rewrite.log" | tail -20 ;;
    deploy)  timeout 120 python3 examples/export_deploy.py --out /tmp/deploy 2>&1 | tee "$out/deploy.log" | tail -20 ;;
    forms)   # packed sequences beside fla's varlen path, grouped heads, the learnable decay (bench.py's form presets; fla from .whl)
             timeout 270 python3 benchmarks/bench.py --preset varlen,gqa,decay-grad --budget-s 210 --out "$out/forms" 2>&1 \
               | tee "$out/forms.log" | tail -40 ;;
    compiled)  # the op through the dispatcher and torch.compile'd against the eager wrapper (training graphs keep the forward's start states)
             timeout 200 python3 benchmarks/bench.py --preset compiled --budget-s 150 --out "$out/compiled" 2>&1 \
               | tee "$out/compiled.log" | tail -20 ;;
    serve-example)  # continuous batching over a tiny LM (64 slots), its throughput beside one request at a time
             timeout 300 python3 examples/serve.py 2>&1 | tee "$out/serve-example.log" | tail -12 ;;
    decay-grad)  # the moment pass: each head's error against float64 by length, its time beside the backward
             timeout 200 python3 benchmarks/decay_grad_accuracy.py --repeats 10 2>&1 | tee "$out/decay-grad.log" | tail -20 ;;
    serve)   # the mixed serving step (each way's kernels and their GPU time first), and the packed way at other forward segment lengths
             timeout 150 python3 benchmarks/bench_serve.py --segment-lens 256,512,2048 --profile --out "$out/serve" 2>&1 \
               | tee "$out/serve.log" | tail -60 ;;
    census)  # the forward's retirement candidates of the 2026-12-06 census, re-timed in alternation
             timeout 300 python3 benchmarks/census.py --repeats 5 --switches forward.transposed,forward.update_accumulate \
               2>&1 | tee "$out/census.log" | tail -16 ;;
    *) echo "unknown stage $stage"; continue ;;
  esac
  summary+=("$stage: rc=${PIPESTATUS[0]} $(( $(date +%s) - start )) s")
done
printf '%s\n' "--- stages ---" "${summary[@]}"
