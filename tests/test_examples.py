"""The examples run, and the numbers they print are right (they are what users copy from).

Each example prints its comparisons as `check <name>: max_rel_err=<e> tol=<t>` and exits non-zero
when one is above its own tolerance (loose enough for a GPU and 16-bit dtypes). Here every check
must appear, and each error must be within a few times what it measures on CPU in float32 — so a
wrong decay or a dropped check fails, not only a crash.
"""

import re

import pytest

from _helpers import run_script

pytestmark = pytest.mark.slow

# (run_package.py adds "; max |diff| vs eager <d>", which tests/test_deploy.py reads)
CHECK_LINE = re.compile(r"^\s*check (\S+): max_rel_err=(\S+) tol=([^\s;]+)(?:;.*)?$", re.MULTILINE)

# Bounds on max |got - want| / max |want|, a few times the errors measured on CPU (torch 2.13,
# float32: 1e-7 to 6e-7, noted beside each). Float32 rounding of the same computation done in a
# different order stays near 1e-6; a wrong decay exponent gives 1e-2 and more. Checks measured
# as exactly 0 (the same kernels on the same inputs) get the float32-rounding bound all the same,
# so that a reordering that changes the last bits does not fail them.
ROUNDING = 2e-6
DEMO_BOUNDS = {
    "output_vs_float64": ROUNDING,  # 2.9e-7
    "final_state_vs_float64": ROUNDING,  # 2.5e-7
    "two_pieces_vs_one_pass": ROUNDING,  # 3.8e-7
    **{f"compiled_vs_eager_n{n}": ROUNDING for n in (128, 300, 1000)},  # 0
    **{f"compiled_grad_vs_eager_n{n}": ROUNDING for n in (128, 300, 1000)},  # 7e-8 to 8e-8
    "exported_vs_eager": ROUNDING,  # 0
    "decode_vs_float64": ROUNDING,  # 3.3e-7
    "decode_state_vs_float64": ROUNDING,  # 5.3e-7
}
GENERATE_BOUNDS = {
    "prefill_pieces_vs_one_pass": ROUNDING,  # 4.1e-7
    "decode_vs_full_recompute": ROUNDING,  # 4.4e-7
}
DEPLOY_BOUNDS = {
    "reloaded_vs_eager": ROUNDING,  # 0
    "package_vs_eager_prompt_100": ROUNDING,  # 2.7e-7
    "package_vs_eager_decode_step": ROUNDING,  # 2.4e-7
    "package_decode_step_vs_prefill": ROUNDING,  # 3.3e-7
    "package_vs_eager_prompt_777": ROUNDING,  # 3.2e-7
    # run_package.py, in a fresh process that cannot import lightning_op
    "fresh_process_prompt_100": ROUNDING,  # 2.7e-7
    "fresh_process_decode_step": ROUNDING,  # 1.5e-7
    "fresh_process_prompt_777": ROUNDING,  # 3.2e-7
}
SERVE_BOUNDS = {"logits_vs_alone": ROUNDING}  # 6.2e-7
# 12 requests through 4 slots; prompts up to 300 tokens in chunks of a 128-token budget; decode-only
# steps padded to bucketed batch sizes with slot -1 rows (what CUDA graphs replay on a GPU)
SERVE_ARGS = ("--device", "cpu", "--dtype", "float32", "--requests", "12", "--max-prompt", "300", "--max-new", "24",
              "--budget", "128", "--slots", "4", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
              "--decode-graphs", "pad", "--threads", "1")  # tiny ops: more threads only slow them on a busy machine
# two and three whole blocks of the model's 256 rows (the example's defaults, 1024 and 2048, take
# 1.6 times the CPU time); partial blocks are rewritten in tests/test_rewrite_models.py
REWRITE_LENGTHS = (512, 768)
REWRITE_BOUNDS = {f"rewritten_vs_original_n{n}": ROUNDING for n in REWRITE_LENGTHS}  # 3.1e-7 both


def _run(script, *args):
    return run_script(f"examples/{script}", *args)


def assert_checks(out: str, bounds: dict) -> None:
    """Every expected check was printed once, none other, and each error is within its bound."""
    found = CHECK_LINE.findall(out)
    names = [name for name, _, _ in found]
    assert sorted(names) == sorted(bounds), f"checks printed: {names}\n{out}"
    for name, error, _ in found:
        assert float(error) <= bounds[name], f"check {name}: {error} > {bounds[name]:.0e}\n{out}"


def test_demo():
    out = _run("demo.py")
    assert_checks(out, DEMO_BOUNDS)
    assert "['lightning.attn.default']" in out  # the exported graph calls the op


def test_generate_memory_is_flat():
    out = _run("generate.py", "--contexts", "256,4096", "--steps", "4")
    assert_checks(out, GENERATE_BOUNDS)
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0] in ("256", "4096")]
    assert len(rows) == 2
    cache_sizes = {row[4] for row in rows}  # "state cache" column, in KiB
    assert len(cache_sizes) == 1


def test_export_deploy_aoti_package(tmp_path):
    out = _run("export_deploy.py", "--out", str(tmp_path))
    assert_checks(out, DEPLOY_BOUNDS)
    assert (tmp_path / "model_aoti.pt2").exists() and (tmp_path / "model.pt2").exists()
    assert "['lightning.attn_inference.default']" in out  # for_package swapped the op
    assert "lightning_op imported: False" in out


def test_serve_continuous_batching():
    out = _run("serve.py", *SERVE_ARGS)
    assert_checks(out, SERVE_BOUNDS)
    steps = re.search(r"^steps: \d+ \((\d+) with prompt chunks, (\d+) decode-only\)", out, re.MULTILINE)
    assert steps and int(steps[1]) > 0 and int(steps[2]) > 0, out  # both kinds of step ran
    assert re.search(r"^throughput: [\d,]+ tokens/s", out, re.MULTILINE), out
    assert re.search(r"^one request at a time: [\d,]+ tokens/s in [\d.]+ s; the engine's throughput is "
                     r"[\d.]+x that", out, re.MULTILINE), out
    agreement = re.search(r"^agreement: (\d+)/(\d+) requests, (\d+)/(\d+) tokens equal the alone run", out,
                          re.MULTILINE)
    assert agreement, out
    requests, of_requests, tokens, of_tokens = map(int, agreement.groups())
    assert requests == of_requests == 12 and tokens == of_tokens > 12, out  # float32: every greedy token equal


def test_rewrite_existing_model():
    pytest.importorskip("transformers")
    # one timed repeat: the timings are not what is tested
    out = _run("rewrite_existing_model.py", "--lengths", *map(str, REWRITE_LENGTHS), "--repeats", "1")
    assert_checks(out, REWRITE_BOUNDS)
    # both linear-attention layers of the 3-layer model now call the op, at each length
    calls = re.findall(r"^rewrites n(\d+): lightning_attn_calls=(\d+) expected=(\d+)$", out, re.MULTILINE)
    assert calls == [(str(n), "2", "2") for n in REWRITE_LENGTHS], out
