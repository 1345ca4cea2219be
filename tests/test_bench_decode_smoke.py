"""The decode benchmark runner works (CPU smoke mode): it writes its results and ours agrees with
the plain PyTorch step."""

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
    assert stdout.rstrip().splitlines()[-1].startswith("targets:")  # the table comes last
