"""The decode and serving benchmark runners work (CPU smoke mode): they write their results and
ours agrees with the other ways (the plain PyTorch step; the packed serving call)."""

import json

import pytest

from _helpers import run_script

pytestmark = pytest.mark.slow


def test_bench_decode_smoke(tmp_path):
    stdout = run_script("benchmarks/bench_decode.py", "--smoke", "--out", str(tmp_path))
    assert (tmp_path / "results.csv").exists()
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"metadata", "results"} <= set(data)
    assert data["metadata"]["copy_bytes_per_s"] > 0
    ours = [row for row in data["results"] if row["impl"] == "ours"]
    assert {row["B"] for row in ours} == {1, 2}
    for row in ours:
        assert not row["error"]
        assert row["step_us"] > 0 and row["kernel_us"] > 0
        assert row["err_out_vs_torch_step"] < 1e-5 and row["err_state_vs_torch_step"] < 1e-5
    # every CUDA-graph impl of the default list, one step or 16 per replay, is reported unavailable on
    # the CPU (not run as an eager step, not dropped from the defaults)
    graph_impls = {f"{base}_graph{steps}" for base in ("ours", "fla", "torch_step") for steps in ("", "16")}
    unavailable = data["metadata"]["unavailable"]
    assert graph_impls <= set(unavailable)
    assert all("CUDA graphs" in unavailable[name] for name in graph_impls)
    assert not graph_impls & {row["impl"] for row in data["results"]}
    for name in graph_impls:
        assert f"unavailable: {name}: " in stdout
    assert all(row["steps_per_call"] == 1 for row in data["results"])
    last = stdout.rstrip().splitlines()[-1]
    assert last.startswith("targets:")  # the table comes last
    assert "one step per replay" in last and "16 steps per graph" in last


def test_bench_serve_smoke(tmp_path):
    """The mixed-step runner: the three ways, and the packed call at a forced segment length,
    agree with the packed call (outputs and pool) and the table comes last."""
    stdout = run_script("benchmarks/bench_serve.py", "--smoke", "--out", str(tmp_path), "--segment-lens", "64")
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [row["way"] for row in rows] == ["packed", "composed", "per_call", "packed_seg64"]
    for row in rows:
        assert row["eager_ms"] > 0
        assert row["err_out_vs_packed"] < 1e-5 and row["err_pool_vs_packed"] < 1e-5
    assert stdout.rstrip().splitlines()[-1].startswith("| packed_seg64 |")
