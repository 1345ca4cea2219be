"""The autotuner (``lightning_op.kernels.autotune``): which candidate is used, the cache in memory
and on disk, and when nothing is timed.

On CPU the kernels run in Triton's interpreter and candidates are "timed" by a fake timer (the
module's test hook), so the choice is deterministic; every candidate is still launched for real.
"""

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

import lightning_op
from lightning_op import lightning_attn

from _helpers import ROOT, TOLERANCE, make_inputs, oracle, rel_error

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs the Triton interpreter or a GPU",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# B = 1, H = 2, N = 200, Dk = 16, Dv = 32, float32: the heuristic takes BLOCK_V 32, 4 warps, 3 stages,
# the ACCUMULATE form and one segment, so the forward has four variations (accumulate, block_v,
# num_warps, num_stages)
SHAPE = dict(b=1, h=2, n=200, dk=16, dv=32)
DEFAULT = dict(BLOCK_V=32, num_warps=4, num_stages=3, ACCUMULATE=True)


@pytest.fixture
def autotune(tmp_path, monkeypatch):
    """Autotuning on, with a cache file in a fresh directory; off again afterwards."""
    from lightning_op.kernels import autotune

    monkeypatch.setenv("LIGHTNING_OP_BACKEND", "triton")  # CPU tensors through lightning_attn: the kernels
    lightning_op.enable_autotune(tmp_path / "autotune.json")
    yield autotune
    lightning_op.disable_autotune()


class Timer:
    """The fake timer: 1 ms for every candidate but those in ``fast`` (changes -> ms); records calls."""

    def __init__(self, fast=()):
        self.fast = list(fast)
        self.calls = []

    def __call__(self, kind, changes):
        self.calls.append((kind, changes))
        return next((ms for wanted, ms in self.fast if wanted == changes), 1.0)


class Spy:
    """Stands in for a kernel: records each launch's compile-time parameters, and raises for
    those that ``fail(params)`` picks (a candidate that does not compile or launch)."""

    def __init__(self, kernel, fail=None):
        self.kernel, self.fail, self.launches = kernel, fail, []

    def __getitem__(self, grid):
        def launch(*args, **params):
            self.launches.append(params)
            if self.fail is not None and self.fail(params):
                raise RuntimeError("out of resources: shared memory (simulated)")
            return self.kernel[grid](*args, **params)

        return launch


def _spy(monkeypatch, name="_chunk_output_kernel", fail=None):
    from lightning_op.kernels import launch

    spy = Spy(getattr(launch, name), fail)
    monkeypatch.setattr(launch, name, spy)
    return spy


def _inputs(n=SHAPE["n"], seed=0):
    q, k, v = make_inputs(SHAPE["b"], SHAPE["h"], n, SHAPE["dk"], SHAPE["dv"], torch.float32, DEVICE, seed=seed)
    return q, k, v, torch.tensor([0.05, 1.0], device=DEVICE)


def _forward_checked(q, k, v, decay):
    """lightning_attn's output and final state, checked against the float64 oracle."""
    out, final = lightning_attn(q, k, v, decay, scale=0.5, output_final_state=True)
    out_ref, final_ref, _ = oracle(q, k, v, decay, 0.5, None, torch.zeros_like(out), None)
    assert rel_error(out, out_ref) < TOLERANCE[torch.float32]
    assert rel_error(final, final_ref) < TOLERANCE[torch.float32]


def _used(spy):
    """The last launch's parameters among those DEFAULT names."""
    return {name: spy.launches[-1][name] for name in DEFAULT}


def _forward_key(autotune, n_class=256):
    return autotune._key_string((autotune._device_tag(torch.device(DEVICE)), autotune.KERNEL_VERSION, "forward",
                                 torch.float32, SHAPE["dk"], SHAPE["dv"], 2, n_class, True, False))


def _write_cache(path, entries):
    path.write_text(json.dumps({"format": 1, "entries": entries}))


def test_fastest_candidate_is_used_and_cached(autotune, monkeypatch, tmp_path):
    spy = _spy(monkeypatch)
    timer = Timer(fast=[({"block_v": 16}, 0.5)])
    with autotune._fake_timing(timer):
        _forward_checked(*_inputs())
        assert sorted(str(changes) for _, changes in timer.calls) == sorted(
            ["{}", "{'accumulate': 0}", "{'block_v': 16}", "{'num_warps': 8}", "{'num_stages': 2}"])
        assert _used(spy) == {**DEFAULT, "BLOCK_V": 16}
        # another length of the same class (N up to 256): looked up, not timed, and by the
        # in-memory key alone (the file's string key is not even built)
        with monkeypatch.context() as patch:
            patch.setattr(autotune, "_key_string", None)
            _forward_checked(*_inputs(n=150, seed=1))
        assert len(timer.calls) == 5 and _used(spy) == {**DEFAULT, "BLOCK_V": 16}
        saved = json.loads((tmp_path / "autotune.json").read_text())
        assert saved["entries"][_forward_key(autotune)]["config"] == {"block_v": 16}
        # a new process (a fresh in-memory state) reads the file and times nothing
        lightning_op.enable_autotune(tmp_path / "autotune.json")
        _forward_checked(*_inputs(seed=2))
        assert len(timer.calls) == 5 and _used(spy) == {**DEFAULT, "BLOCK_V": 16}
        # a new class (N up to 512) is timed
        _forward_checked(*_inputs(n=300))
        assert len(timer.calls) == 10
    assert not [name for name in os.listdir(tmp_path) if name != "autotune.json"]  # no temporary left


def test_off_by_default_and_after_disable(autotune, monkeypatch):
    spy = _spy(monkeypatch)
    timer = Timer(fast=[({"block_v": 16}, 0.5)])
    lightning_op.disable_autotune()
    with autotune._fake_timing(timer):
        _forward_checked(*_inputs())
    assert not timer.calls and _used(spy) == DEFAULT and autotune.cache_path() is None


def test_corrupt_file_warns_and_is_replaced(autotune, monkeypatch, tmp_path):
    path = tmp_path / "autotune.json"
    path.write_text("{not json")
    spy = _spy(monkeypatch)
    with autotune._fake_timing(Timer(fast=[({"num_warps": 8}, 0.5)])):
        with pytest.warns(UserWarning, match=re.escape(str(path))):
            _forward_checked(*_inputs())
    assert _used(spy) == {**DEFAULT, "num_warps": 8}
    assert json.loads(path.read_text())["entries"][_forward_key(autotune)]["config"] == {"num_warps": 8}


@pytest.mark.parametrize("config", [{"bogus": 1}, {"num_warps": 3}, {"block_v": 24}, {"num_stages": "2"},
                                    {"kv_num_warps": 8}, {"decode_block_v": 16}, "block_v=16", {"chunk": 4096},
                                    {"block_v": 512}, {"num_stages": 64}, {"weight_values": 1}])
def test_invalid_entry_is_ignored(autotune, monkeypatch, tmp_path, config):
    """Unknown names, values config_override refuses, another kind's parameters: timed afresh."""
    _write_cache(tmp_path / "autotune.json", {_forward_key(autotune): {"config": config}})
    spy = _spy(monkeypatch)
    timer = Timer(fast=[({"accumulate": 0}, 0.5)])
    with autotune._fake_timing(timer):
        _forward_checked(*_inputs())
    assert len(timer.calls) == 5 and _used(spy) == {**DEFAULT, "ACCUMULATE": False}


def test_a_cached_key_value_choice_of_forms_it_lacks_is_invalid(autotune):
    """A fused backward choice naming a form switch that pass does not have (its state update and
    its dk scores have one form each) is not used: the class is timed afresh."""
    assert autotune._valid_choice({"config": {"kv_chunk": 32, "accumulate": 0}}, "key_value") == \
        {"kv_chunk": 32, "accumulate": 0}
    for config in ({"kv_update_accumulate": 0}, {"kv_late_dk_scores": 1}, {"kv_chunk": 32, "kv_late_dk_scores": 1},
                   {"update_accumulate": 1}):
        assert autotune._valid_choice({"config": config}, "key_value") is None, config
    assert autotune._valid_choice({"config": {"update_accumulate": 1}}, "forward") == {"update_accumulate": 1}


def test_a_cached_choice_that_cannot_launch_falls_back(autotune, monkeypatch, tmp_path):
    """A valid-looking entry that fails here (another GPU's, a hand edit) costs one warning, not
    every call of its class: the heuristic runs instead, and the file's entry is not used again."""
    _write_cache(tmp_path / "autotune.json", {_forward_key(autotune): {"config": {"num_warps": 8}}})
    spy = _spy(monkeypatch, fail=lambda params: params["num_warps"] == 8)
    with pytest.warns(UserWarning, match=r"cached choice \{'num_warps': 8\}.*failed"):
        _forward_checked(*_inputs())
    assert _used(spy) == DEFAULT
    launches = len(spy.launches)
    _forward_checked(*_inputs())  # remembered: no second trial
    assert len(spy.launches) == launches + 1 and _used(spy) == DEFAULT


@pytest.mark.parametrize("edit", [None, ("kernels=7", "kernels=6"), ("triton=", "triton=0.0+"), ("dv=32", "dv=64"),
                                  ("n=256", "n=512"), ("kind=forward", "kind=key_value")],
                         ids=["same-key", "kernel-version", "triton-version", "dv", "n-class", "kind"])
def test_entries_of_other_keys_are_not_used(autotune, monkeypatch, tmp_path, edit):
    key = _forward_key(autotune)
    assert "kernels=7;" in key and autotune.KERNEL_VERSION == 7
    if edit is not None:
        assert edit[0] in key
        key = key.replace(*edit)
    _write_cache(tmp_path / "autotune.json", {key: {"config": {"block_v": 16}}})
    spy = _spy(monkeypatch)
    _forward_checked(*_inputs())  # not on the GPU and no test hook: a cached choice, or the heuristic
    assert _used(spy) == (DEFAULT if edit else {**DEFAULT, "BLOCK_V": 16})


def test_kernel_version_bump_ignores_old_choices(autotune, monkeypatch, tmp_path):
    spy = _spy(monkeypatch)
    with autotune._fake_timing(Timer(fast=[({"block_v": 16}, 0.5)])):
        _forward_checked(*_inputs())
    assert _used(spy)["BLOCK_V"] == 16
    monkeypatch.setattr(autotune, "KERNEL_VERSION", autotune.KERNEL_VERSION + 1)
    lightning_op.enable_autotune(tmp_path / "autotune.json")
    _forward_checked(*_inputs())
    assert _used(spy) == DEFAULT


@pytest.mark.parametrize("all_fail", [False, True], ids=["fastest-fails", "all-but-default-fail"])
def test_failing_candidates_are_skipped(autotune, monkeypatch, caplog, all_fail):
    if all_fail:
        def fail(params):
            return any(params[name] != value for name, value in DEFAULT.items())
    else:
        def fail(params):
            return params["BLOCK_V"] == 16
    spy = _spy(monkeypatch, fail=fail)
    timer = Timer(fast=[({"block_v": 16}, 0.1), ({"num_warps": 8}, 0.5)])
    with caplog.at_level(logging.DEBUG, logger="lightning_op.autotune"), autotune._fake_timing(timer):
        _forward_checked(*_inputs())
    assert "{'block_v': 16} failed: RuntimeError: out of resources" in caplog.text
    assert _used(spy) == (DEFAULT if all_fail else {**DEFAULT, "num_warps": 8})
    assert ({"block_v": 16}) not in [changes for _, changes in timer.calls]
    assert "tuned gpu=" in caplog.text  # the info line


def test_a_failing_heuristic_fails_the_call(autotune, monkeypatch):
    """The heuristic's own launch failing is the call's error (as without autotuning), not a skip."""
    _spy(monkeypatch, fail=lambda params: params["BLOCK_V"] == 32)
    with autotune._fake_timing(Timer(fast=[({"block_v": 16}, 0.5)])), pytest.raises(RuntimeError, match="simulated"):
        lightning_attn(*_inputs())


def test_duplicate_candidates_are_dropped(autotune, monkeypatch):
    """Candidates deriving a LaunchConfig already listed (the heuristic's own, or each other's) are
    timed once."""
    monkeypatch.setattr(autotune, "_candidates", lambda *args: [
        {"num_warps": 4}, {"num_warps": 8}, {"num_warps": 8, "num_stages": 3}, {"chunk": 48}])
    timer = Timer()
    with autotune._fake_timing(timer):
        _forward_checked(*_inputs())
    assert timer.calls == [("forward", {}), ("forward", {"num_warps": 8})]


@pytest.mark.parametrize("condition", ["config_override", "capturing", "compiling", "traceable", "segment_len"])
def test_nothing_is_timed(autotune, monkeypatch, tmp_path, condition):
    """... under a user's overrides (which also win over a cached choice), during CUDA-graph
    capture, while compiling, for traced launches and explicit segment lengths (which still take
    a cached choice)."""
    from lightning_op import reference
    from lightning_op.kernels import config_override, linear_attention

    q, k, v, decay = _inputs()
    if condition == "capturing":
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    if condition == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    options = {"traceable": dict(traceable=True, segment_len=256), "segment_len": dict(segment_len=256)}
    spy = None if condition == "traceable" else _spy(monkeypatch)  # wrap_triton needs the real kernel
    timer = Timer(fast=[({"block_v": 16}, 0.5)])
    expected = reference.linear_attention_chunked(q.double(), k.double(), v.double(), decay.double())
    for cached in (False, True):
        if cached:
            _write_cache(tmp_path / "autotune.json", {_forward_key(autotune): {"config": {"block_v": 16}}})
            lightning_op.enable_autotune(tmp_path / "autotune.json")
        with autotune._fake_timing(timer), \
                config_override(**({"num_warps": 8} if condition == "config_override" else {})):
            out, final = linear_attention(q, k, v, decay, **options.get(condition, {}))
        assert rel_error(out, expected[0]) < TOLERANCE[torch.float32]
        assert rel_error(final, expected[1]) < TOLERANCE[torch.float32]
        assert not timer.calls
        if spy is not None:
            block_v = 16 if cached and condition != "config_override" else 32
            assert spy.launches[-1]["BLOCK_V"] == block_v
            assert spy.launches[-1]["num_warps"] == (8 if condition == "config_override" else 4)


def test_backward_tunes_the_fused_key_value_pass(autotune, monkeypatch, tmp_path):
    """Through autograd: the forward and dq passes are tuned as "forward", the fused dk/dv pass as
    "key_value" (its kv_* parameters), and every gradient is right."""
    spy = _spy(monkeypatch, "_key_value_grad_kernel")
    timer = Timer(fast=[({"kv_chunk": 32}, 0.5)])
    q, k, v, decay = _inputs()
    init = torch.randn(1, 2, SHAPE["dk"], SHAPE["dv"], device=DEVICE)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, init)]
    with autotune._fake_timing(timer):
        out, final = lightning_attn(*leaves[:3], decay, scale=0.5, initial_state=leaves[3], output_final_state=True)
        grad_out, grad_final = torch.randn_like(out), torch.randn_like(final)
        grads = torch.autograd.grad((out * grad_out).sum() + (final * grad_final).sum(), leaves)
    out_ref, final_ref, grads_ref = oracle(q, k, v, decay, 0.5, init, grad_out, grad_final)
    for got, want in zip((out, final, *grads), (out_ref, final_ref, *grads_ref)):
        assert rel_error(got, want) < TOLERANCE[torch.float32]
    key_value = [changes for kind, changes in timer.calls if kind == "key_value"]
    assert sorted(map(str, key_value)) == sorted(
        ["{}", "{'accumulate': 0}", "{'kv_chunk': 32}", "{'kv_num_warps': 8}", "{'kv_num_stages': 2}"])
    assert {kind for kind, _ in timer.calls} == {"forward", "key_value"}
    assert spy.launches[-1]["CHUNK"] == 32
    entries = json.loads((tmp_path / "autotune.json").read_text())["entries"]
    assert [entries[key]["config"] for key in entries if "kind=key_value" in key] == [{"kv_chunk": 32}]
    assert len(entries) == 3  # forward, dq (Dk and Dv swapped: another class), key_value


def test_candidates_of_a_segmented_launch():
    from lightning_op.kernels import LaunchConfig
    from lightning_op.kernels.autotune import _candidates

    cfg = LaunchConfig(chunk=64, block_k=128, block_v=128, segment_len=2048, num_warps=8, num_stages=3,
                       state_split=2, accumulate=False)
    assert _candidates("forward", cfg, 8000, 8192) == [
        {"accumulate": 1}, {"update_accumulate": 1}, {"block_v": 64}, {"transposed": 1}, {"num_warps": 4},
        {"num_stages": 2}, {"segment_len": 4096},
        {"segment_len": 1024}, {"segment_len": 8192}, {"state_split": 4}, {"state_split": 1},
        {"state_accumulate": 1}]
    whole = LaunchConfig(chunk=64, block_k=128, block_v=128, segment_len=1024, num_warps=8, num_stages=2,
                         state_split=1, accumulate=False)
    assert _candidates("key_value", whole, 3000, 4096) == [
        {"accumulate": 1}, {"kv_chunk": 32}, {"kv_num_warps": 4}, {"kv_num_stages": 1}, {"kv_num_stages": 3},
        {"kv_segment_len": 2048}, {"kv_segment_len": 512}, {"kv_segment_len": 4096}, {"kv_state_split": 2}]
    one_segment = LaunchConfig(64, 64, 64, 4096, 4, 3, 1, True)
    assert len(_candidates("forward", one_segment, 4000, 4096)) == 4
    # keys wider than the value block: the update's row weights stay on the keys (no other form)
    wide = LaunchConfig(64, 256, 64, 8192, 8, 3, 1, False)
    assert not any("weight_values" in c for c in _candidates("forward", wide, 8192, 8192))
    # keys of 128: the other output kernel, either way round
    assert {"transposed": 0} in _candidates("forward", dataclasses.replace(cfg, transposed=True), 8000, 8192)
    # keys wider than 128, transposed (bfloat16's default): the other kernel in its own tiles;
    # not transposed (float16, float32: a float32 state operand, whose transposed tiles overflow
    # shared memory): the transposed kernel is no candidate
    wide_t = LaunchConfig(64, 256, 128, 8192, 8, 2, 1, False, transposed=True)
    assert {"transposed": 0, "block_v": 64, "num_stages": 3} in _candidates("forward", wide_t, 8192, 8192)
    assert not any("transposed" in c for c in _candidates("forward", wide, 8192, 8192))
    assert not any("transposed" in c for c in _candidates("forward", one_segment, 4000, 4096))  # D = 64
    assert not any("transposed" in c for c in _candidates("key_value", whole, 3000, 4096))


def test_unwritable_cache_warns_once_and_keeps_choices(autotune, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    lightning_op.enable_autotune(blocker / "autotune.json")  # its directory cannot be created
    spy = _spy(monkeypatch)
    timer = Timer(fast=[({"block_v": 16}, 0.5)])
    with autotune._fake_timing(timer), pytest.warns(UserWarning) as caught:
        _forward_checked(*_inputs())
        _forward_checked(*_inputs(n=300))
        _forward_checked(*_inputs(n=150))
    assert len(timer.calls) == 10 and _used(spy)["BLOCK_V"] == 16
    assert sum("cannot write the cache file" in str(w.message) for w in caught) == 1


def test_saving_merges_what_another_process_wrote(autotune, monkeypatch, tmp_path):
    path = tmp_path / "autotune.json"
    with autotune._fake_timing(Timer()):
        _forward_checked(*_inputs())
        entries = json.loads(path.read_text())["entries"]
        entries["gpu=other;cc=1.0;triton=x;kernels=1;kind=forward"] = {"config": {"num_warps": 8}}
        _write_cache(path, entries)  # another process tuned meanwhile
        _forward_checked(*_inputs(n=300))
    saved = json.loads(path.read_text())["entries"]
    assert len(saved) == 3 and saved["gpu=other;cc=1.0;triton=x;kernels=1;kind=forward"]["config"] == {"num_warps": 8}


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False),
                                       ("off", False), ("maybe", False)])
def test_environment_variable(autotune, tmp_path, value, on):
    environ = {"LIGHTNING_OP_AUTOTUNE": value, "LIGHTNING_OP_CACHE_DIR": str(tmp_path / "cache")}
    lightning_op.disable_autotune()
    if value == "maybe":
        with pytest.warns(UserWarning, match="LIGHTNING_OP_AUTOTUNE must be 0 or 1, got 'maybe'"):
            autotune._from_environment(environ)
    else:
        autotune._from_environment(environ)
    assert autotune.enabled() is on
    if on:
        assert autotune.cache_path() == str(tmp_path / "cache" / "autotune.json")


def test_cache_path_resolution(autotune, tmp_path):
    from lightning_op.kernels.autotune import _resolve_path

    environ = {"LIGHTNING_OP_CACHE_DIR": str(tmp_path)}
    assert _resolve_path(tmp_path / "mine.json", environ) == str(tmp_path / "mine.json")
    assert _resolve_path(None, environ) == str(tmp_path / "autotune.json")
    assert _resolve_path(None, {}) == os.path.expanduser(os.path.join("~", ".cache", "lightning_op", "autotune.json"))
    with pytest.raises(TypeError, match="cache_path must be a str or os.PathLike, got int"):
        lightning_op.enable_autotune(3)


def test_environment_variable_is_read_at_import(tmp_path):
    env = {**os.environ, "LIGHTNING_OP_AUTOTUNE": "1", "LIGHTNING_OP_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", "from lightning_op.kernels import autotune; print(autotune.enabled(), autotune.cache_path())"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", str(tmp_path / "autotune.json")]


def test_packed_calls_are_a_class_of_their_own(autotune, monkeypatch, tmp_path):
    """A pack of sequences and a dense call of the same B*H and N do not share a choice: the
    packed call's key says so, a dense entry is not used for it nor a packed one for a dense call;
    a packed decode step that updates a pool in place times nothing (a repeat would advance it)."""
    q, k, v, decay = _inputs()
    cu = torch.tensor([0, 50, 50, SHAPE["n"]], device=DEVICE)
    packed_key = _forward_key(autotune) + ";packed=1"
    _write_cache(tmp_path / "autotune.json", {_forward_key(autotune): {"config": {"block_v": 16}},
                                              packed_key: {"config": {"num_warps": 8}}})
    spy = _spy(monkeypatch)
    lightning_attn(q, k, v, decay, cu_seqlens=cu)
    assert _used(spy) == {**DEFAULT, "num_warps": 8}
    _forward_checked(q, k, v, decay)
    assert _used(spy) == {**DEFAULT, "BLOCK_V": 16}
    lightning_op.enable_autotune(tmp_path / "fresh.json")
    timer = Timer()
    with autotune._fake_timing(timer):
        pool = torch.randn(4, SHAPE["h"], SHAPE["dk"], SHAPE["dv"], device=DEVICE)
        lightning_op.attn_step(q, k, v, pool, decay, cu_seqlens=cu, state_indices=torch.tensor([2, 0, 3]))
        assert not timer.calls
        lightning_attn(q, k, v, decay, cu_seqlens=cu)
        assert timer.calls  # an ordinary packed call is tuned, under its own key
    assert list(json.loads((tmp_path / "fresh.json").read_text())["entries"]) == [packed_key]
