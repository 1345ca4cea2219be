"""The examples run and say what they did (they are what users copy from)."""

import pytest

from _helpers import run_script

pytestmark = pytest.mark.slow


def _run(script, *args):
    return run_script(f"examples/{script}", *args)


def test_demo():
    out = _run("demo.py")
    assert "demo finished" in out
    assert "['lightning.attn.default']" in out  # the exported graph calls the op


def test_generate_memory_is_flat():
    out = _run("generate.py", "--contexts", "256,4096", "--steps", "4")
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0] in ("256", "4096")]
    assert len(rows) == 2
    cache_sizes = {row[4] for row in rows}  # "state cache" column, in KiB
    assert len(cache_sizes) == 1


def test_export_deploy_aoti_package(tmp_path):
    out = _run("export_deploy.py", "--out", str(tmp_path))
    assert "deploy example finished" in out
    assert (tmp_path / "model_aoti.pt2").exists() and (tmp_path / "model.pt2").exists()
    assert "['lightning.attn_inference.default']" in out  # for_package swapped the op
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "max |diff| vs eager" in line]
    assert len(diffs) == 7 and max(diffs) < 1e-3  # 4 in the example's process, 3 in run_package.py's
    assert "lightning_op imported: False" in out


def test_rewrite_existing_model():
    pytest.importorskip("transformers")
    out = _run("rewrite_existing_model.py")
    assert "rewritten" in out.lower()
