"""The benchmark runner works (CPU smoke mode): it writes its tables and agrees with the naive form."""

import json

import pytest

from _helpers import run_script

pytestmark = pytest.mark.slow


def test_bench_smoke(tmp_path):
    out = run_script("benchmarks/bench.py", "--smoke", "--out", str(tmp_path))
    # the N sweep's time-per-token spread, read off the summary
    assert "time per 64K tokens, ours H2 D32, N 128-256: fwd " in out, out[-2000:]
    assert (tmp_path / "results.csv").exists()
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"metadata", "results"} <= set(data)
    rows = data["results"]
    by_impl = {}
    for row in rows:
        by_impl.setdefault(row["impl"], []).append(row)
    assert "ours" in by_impl and "naive" in by_impl
    for row in by_impl["ours"]:
        assert row.get("fwd_ms") and row["fwd_ms"] > 0
    naive_errors = [row["rel_err_vs_ours"] for row in by_impl["naive"] if row.get("rel_err_vs_ours") is not None]
    # the same function in float32 (a wrong decay or scale gives errors ~1e-1); the bound leaves
    # room for summation order: 2e-7 is usual, one clean-clone CI run saw 2.3e-5 at N = 128
    assert naive_errors and max(naive_errors) < 1e-4


def test_bench_autotune_flag_is_recorded(tmp_path):
    """--autotune enables the autotuner with its cache beside the results (on CPU nothing is timed:
    the heuristic runs), and the metadata says so."""
    run_script("benchmarks/bench.py", "--smoke", "--impls", "ours", "--autotune", "--out", str(tmp_path))
    meta = json.loads((tmp_path / "results.json").read_text())["metadata"]
    assert meta["autotune"] == str(tmp_path / "autotune.json")
    run_script("benchmarks/bench.py", "--smoke", "--impls", "ours", "--out", str(tmp_path / "plain"))
    assert json.loads((tmp_path / "plain" / "results.json").read_text())["metadata"]["autotune"] is None


def test_bench_time_budget_stops_between_shapes_and_keeps_the_results(tmp_path):
    out = run_script("benchmarks/bench.py", "--smoke", "--impls", "ours", "--budget-s", "0", "--out", str(tmp_path))
    assert "time budget of 0 s spent: not run B1 N256 H2 D32" in out
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [row["N"] for row in rows] == [128]


def test_register_report_compiles_every_kernel_for_hopper():
    """benchmarks/registers.py compiles the three loop kernels for sm_90 without a GPU and reads
    registers and spills from ptxas."""
    out = run_script("benchmarks/registers.py", "--dims", "32")
    lines = [line for line in out.splitlines() if line.startswith("D=32")]
    assert [line.split()[1] for line in lines] == ["forward", "fused", "segment"]
    for line in lines:
        registers = int(line.split(": ")[1].split()[0])
        assert 0 < registers <= 255 and "spill stores" in line and "shared memory" in line
        assert len(line.rsplit("ptx ", 1)[1]) == 12  # the PTX digest
    # compiled as a launch specialises aligned arguments: pipelined loads (asynchronous copies)
    assert int(lines[0].split(" cp.async")[0].rsplit(", ", 1)[1]) > 0, lines[0]
    # the loop kernels' hot loop, disassembled: instructions per iteration, of them local memory
    for line in lines:
        loop = line.split(", loop ")[1].split(" instructions (")
        assert int(loop[0]) > 50 and int(loop[1].split(" local)")[0]) >= 0, line


def test_host_time_stubbed_shows_the_eager_path_cheaper():
    """benchmarks/host_time.py --stub times both paths with the kernels replaced by no-ops; the
    eager path skips the dispatcher's wrappers, so its forward+backward costs less host time."""
    lines = []
    for _ in range(3):  # a timing on a shared 2-core machine: one of three runs must show it
        out = run_script("benchmarks/host_time.py", "--stub", "--dims", "32", "--calls", "300")
        lines.append(next(line for line in out.splitlines() if line.startswith("D32:")))
        eager, op = (float(part.split("fwd+bwd ")[1].split(" us")[0]) for part in lines[-1].split(";")[:2])
        assert eager > 0 and op > 0, lines[-1]
        if eager < op:
            return
    raise AssertionError("the eager path was not cheaper in any run:\n" + "\n".join(lines))


def test_register_report_of_the_transposed_output_kernel():
    """``registers.py --transposed`` compiles ``_chunk_output_t_kernel`` in place of the forward
    output kernel (two key parts at D = 128), with pipelined loads."""
    out = run_script("benchmarks/registers.py", "--dims", "128", "--transposed")
    forward = next(line for line in out.splitlines() if line.startswith("D=128  forward"))
    assert "transposed:" in forward and int(forward.split(" cp.async")[0].rsplit(", ", 1)[1]) > 0, forward
