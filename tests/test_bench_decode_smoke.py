"""The decode benchmark runner works (CPU smoke mode): it writes its results and ours agrees with
the plain PyTorch step."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_decode_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_decode.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
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
    assert result.stdout.rstrip().splitlines()[-1].startswith("targets:")  # the table comes last
