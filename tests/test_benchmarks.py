"""The benchmark runner works (CPU smoke mode): it writes its tables and agrees with the naive form."""

import importlib
import json
import os
import sys

import pytest

from _helpers import ROOT, run_script

pytestmark = pytest.mark.slow


def test_bench_smoke(tmp_path):
    out = run_script("benchmarks/bench.py", "--smoke", "--out", str(tmp_path))
    # the N sweep's time-per-token spread, read off the summary
    assert "time per 64K tokens, ours H2 D32, N 128-256: fwd " in out, out[-2000:]
    assert (tmp_path / "results.csv").exists()
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"metadata", "results"} <= set(data)
    assert data["metadata"]["autotune"] is None  # no --autotune: none recorded
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


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    """One run of ours with --autotune and a time budget of 0 s (the first shape only), read by
    the two tests below: (its output, its folder)."""
    out_dir = tmp_path_factory.mktemp("bench_budget")
    out = run_script("benchmarks/bench.py", "--smoke", "--impls", "ours", "--autotune", "--budget-s", "0",
                     "--out", str(out_dir))
    return out, out_dir


def test_bench_autotune_flag_is_recorded(budget_run):
    """--autotune enables the autotuner with its cache beside the results (on CPU nothing is timed:
    the heuristic runs), and the metadata says so (test_bench_smoke: a run without it records none)."""
    _, out_dir = budget_run
    meta = json.loads((out_dir / "results.json").read_text())["metadata"]
    assert meta["autotune"] == str(out_dir / "autotune.json")


def test_bench_time_budget_stops_between_shapes_and_keeps_the_results(budget_run):
    out, out_dir = budget_run
    assert "time budget of 0 s spent: not run B1 N256 H2 D32" in out
    rows = json.loads((out_dir / "results.json").read_text())["results"]
    assert [row["N"] for row in rows] == [128]


def _pack_lengths(text: str) -> list[int]:
    """A row's ``lengths`` (runs written ``length*count``) as the list of lengths."""
    lengths = []
    for run in text.split():
        length, _, count = run.partition("*")
        lengths += [int(length)] * int(count or 1)
    return lengths


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/bench.py as a module (with common.py beside it), forgotten afterwards."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    names = [name for name in ("bench", "common") if name not in sys.modules]
    try:
        yield importlib.import_module("bench")
    finally:
        for name in names:
            sys.modules.pop(name, None)


def test_bench_form_presets_on_the_gpu_sizes(bench):
    """The shapes the form presets time on the GPU, read off bench.py without running them."""
    packs = bench.preset_shapes("varlen")
    assert [s.label for s in packs] == ["varlen 8x8K H16 D128", "varlen 20 mixed 300-12K H16 D128",
                                        "varlen 128x512 H16 D128", "varlen 48K+16x1K H16 D128"]
    for shape in packs:
        assert (shape.batch, shape.tokens, sum(shape.lengths)) == (1, 65536, 65536)
        assert _pack_lengths(bench.lengths_text(shape.lengths)) == list(shape.lengths)
    mixed = packs[1].lengths
    assert len(mixed) == 20 and min(mixed) == 300 and max(mixed) == 12288 and len(set(mixed)) > 10
    assert bench.preset_shapes("varlen")[1].lengths == mixed  # seeded: every run packs the same list
    (gqa,) = bench.preset_shapes("gqa")
    assert (gqa.label, gqa.tokens) == ("gqa B8 N8K H32/8 D128", 65536)
    assert [s.label for s in bench.preset_shapes("decay-grad")] == ["decay-grad B8 N8K H16 D128",
                                                                    "decay-grad B1 N64K H16 D128"]
    assert [s.label for s in bench.preset_shapes("compiled")] == ["compiled B4 N16K H16 D128",
                                                                  "compiled B1 N16K H16 D128",
                                                                  "compiled B1 N64K H16 D128"]
    assert bench.FORM_IMPLS["compiled"] == ("ours", "ours_op", "ours_compiled")
    # a form shape runs beside the dense one of the same size, not merged into it
    shapes = bench.select_shapes(["quick", "decay-grad"])
    assert [(s.form, s.label) for s in shapes][:2] == [("dense", "B8 N8K H16 D128"),
                                                      ("decay-grad", "decay-grad B8 N8K H16 D128")]


def test_bench_form_presets_smoke(tmp_path, monkeypatch):
    """``--smoke --preset varlen,gqa,decay-grad`` runs each form's implementations at tiny sizes
    (fla is absent on CPU): packs against the same tokens dense, grouped heads three ways, a
    learnable decay against a fixed one with its gradient's error against float64; the targets'
    lines close the output."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny tensors: two threads spinning on a busy host cost 20x
    out = run_script("benchmarks/bench.py", "--smoke", "--preset", "varlen,gqa,decay-grad", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    by_form = {}
    for row in rows:
        by_form.setdefault(row["form"], []).append(row)
        assert row["fwd_ms"] and row["fwd_ms"] > 0 and row["fwdbwd_ms"] and row["fwdbwd_ms"] > 0, row
        assert not (row["fwd_error"] or row["fwdbwd_error"] or row["check_error"]), row

    varlen = by_form["varlen"]
    assert [row["impl"] for row in varlen] == ["ours", "ours_dense"] * 4
    packs = [_pack_lengths(row["lengths"]) for row in varlen[::2]]
    assert all(sum(pack) == 512 for pack in packs) and [len(pack) for pack in packs] == [8, 20, 128, 17]
    assert "varlen 8x64 H2 D32: ours/ours_dense fwd " in out

    gqa = {row["impl"]: row for row in by_form["gqa"]}
    assert list(gqa) == ["ours", "ours_shared", "ours_repeat"]
    assert (gqa["ours"]["H"], gqa["ours"]["Hkv"]) == (8, 2)
    assert gqa["ours_repeat"]["rel_err_vs_ours"] < 1e-5  # grouped heads compute the repeated k, v's result
    assert "gqa B1 N128 H8/2 D32: ours_repeat/ours_shared f+b " in out

    learnable = [row for row in by_form["decay-grad"] if row["impl"] == "ours_decay_grad"]
    assert [row["N"] for row in learnable] == [128, 256]
    for row in learnable:
        assert row["rel_err_vs_ours"] < 1e-6
        # float32 against float64 over two heads: rounding may leave both exact, so no lower bound
        assert row["decay_grad_rel_err"] < 1e-4 and row["decay_grad_rel_err_fp32"] == row["decay_grad_rel_err"]
    assert out.rstrip().splitlines()[-1].startswith("decay-grad B1 N256 H2 D32: ours_decay_grad/ours f+b ")
    assert "d decay err float32 " in out


def test_register_report_compiles_every_kernel_for_hopper():
    """benchmarks/registers.py compiles the four loop kernels for sm_90 without a GPU and reads
    registers and spills from ptxas."""
    out = run_script("benchmarks/registers.py", "--dims", "32")
    lines = [line for line in out.splitlines() if line.startswith("D=32")]
    assert [line.split()[1] for line in lines] == ["forward", "fused", "segment", "moment"]
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
    """``registers.py --transposed`` compiles the forward output kernel in its ``TRANSPOSED`` form
    (two key parts at D = 128), with pipelined loads."""
    out = run_script("benchmarks/registers.py", "--dims", "128", "--transposed")
    forward = next(line for line in out.splitlines() if line.startswith("D=128  forward"))
    assert "transposed:" in forward and int(forward.split(" cp.async")[0].rsplit(", ", 1)[1]) > 0, forward


def test_census_repeats_a_chosen_switch_and_names_unknown_ones():
    out = run_script("benchmarks/census.py", "--smoke", "--switches", "forward.transposed", "--repeats", "2")
    # the flipped switch at the smoke shape, both values in the verdict table, no other switch
    assert "B1 N200 H2 D32 forward.transposed: default 0" in out, out[-2000:]
    table = [line for line in out.splitlines() if line.startswith("| forward.")]
    assert [line.split(" | ")[:2] for line in table] == [["| forward.transposed", "0"], ["| forward.transposed", "1"]]
    with pytest.raises(AssertionError, match="unknown switches"):
        run_script("benchmarks/census.py", "--smoke", "--switches", "forward.nope")


def test_census_skips_flips_the_kernels_ignore():
    """A switch the compiled kernels ignore in a configuration (the transposed output pass's
    accumulation, UPDATE_ACCUMULATE beside ACCUMULATE in the output pass) is not timed: both timings
    would be of the same code. Every switch flipped is a parameter of its family."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    census = importlib.import_module("census")
    from lightning_op.kernels.config import FAMILIES, LaunchConfig

    plain = LaunchConfig(64, 128, 128, 1024, 8)
    accumulating = LaunchConfig(64, 64, 64, 1024, 4, accumulate=True)
    transposed = LaunchConfig(64, 128, 128, 1024, 8, transposed=True)
    assert census._applies("forward", "update_accumulate", plain)
    assert not census._applies("forward", "update_accumulate", accumulating)
    assert not census._applies("forward", "accumulate", transposed)
    assert census._applies("forward", "transposed", transposed)
    assert census._applies("key_value", "accumulate", plain) and census._applies("key_value", "accumulate", accumulating)
    assert all(switch in FAMILIES[family] for family, switch in census.SWITCHES)
