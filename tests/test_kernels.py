"""The Triton kernels against the float64 chunked reference, through the interpreter on CPU.

These exercise the launch paths the op rarely takes on a CPU: several segments (scan across
segments), reversed time, the gradients' init convention, strided and transposed states.
"""

import dataclasses
import os

import pytest
import torch

from lightning_op import reference

from _helpers import TOLERANCE, make_inputs, oracle, rel_error

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs the Triton interpreter or a GPU",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(q, k, v, decay, init, *, reverse, init_shift, segment_len, out_scale=0.6, value_scale=1.3):
    from lightning_op.kernels import linear_attention

    out, final = linear_attention(
        q, k, v, decay, out_scale=out_scale, value_scale=value_scale, initial_state=init,
        reverse=reverse, init_shift=init_shift, segment_len=segment_len,
    )
    expected = reference.linear_attention_chunked(
        q.double(), k.double(), v.double(), None if decay is None else decay.double(),
        out_scale=out_scale, value_scale=value_scale, initial_state=None if init is None else init.double(),
        reverse=reverse, init_shift=init_shift,
    )
    return (out, final), expected


# every direction and segmenting in float32; each 16-bit dtype takes each segmenting once, in
# both directions between them, so every pair is met in float32 and in one 16-bit dtype
SEGMENT_CASES = [(torch.float32, reverse, segment_len) for reverse in (False, True) for segment_len in (None, 64, 128)]
SEGMENT_CASES += [(torch.float16, False, 64), (torch.float16, True, 128), (torch.float16, False, None),
                  (torch.bfloat16, True, 64), (torch.bfloat16, False, 128), (torch.bfloat16, True, None)]


@pytest.mark.parametrize(
    "dtype, reverse, segment_len", SEGMENT_CASES,
    ids=[f"{'reverse' if r else 'forward'}-{'one-segment' if s is None else f'seg{s}'}-{str(d)[6:]}"
         for d, r, s in SEGMENT_CASES],
)
def test_segments_and_directions(dtype, reverse, segment_len):
    init_shift = 0 if reverse else 1
    q, k, v = make_inputs(2, 3, 200, 24, 40, dtype, DEVICE, seed=4)
    decay = torch.tensor([1e-5, 0.05, 30.0], device=DEVICE)
    init = torch.randn(2, 3, 24, 40, device=DEVICE)
    (out, final), (out_ref, final_ref) = _run(q, k, v, decay, init, reverse=reverse, init_shift=init_shift,
                                             segment_len=segment_len)
    assert out.dtype == dtype and final.dtype == torch.float32
    assert rel_error(out, out_ref) < TOLERANCE[dtype]
    assert rel_error(final, final_ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("segment_len", [None, 64])
def test_no_decay_no_init_transposed_state(segment_len):
    q, k, v = make_inputs(1, 2, 150, 32, 16, torch.float32, DEVICE, layout="bnhd", seed=5)
    init = torch.randn(1, 2, 16, 32, device=DEVICE).transpose(-1, -2)  # a strided [B, H, 32, 16] view
    for state in (None, init):
        (out, final), (out_ref, final_ref) = _run(q, k, v, None, state, reverse=False, init_shift=1,
                                                 segment_len=segment_len)
        assert rel_error(out, out_ref) < TOLERANCE[torch.float32]
        assert rel_error(final, final_ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize(
    "dk, dv, dtype",
    [(16, 256, torch.float32), (160, 48, torch.float32), (72, 24, torch.float32),
     # 16-bit keys wider than 128 take chunks and value blocks of 64 (float32 ones 32)
     (160, 80, torch.bfloat16), (200, 64, torch.float16)],
)
def test_head_dims(dk, dv, dtype):
    q, k, v = make_inputs(1, 2, 70, dk, dv, dtype, DEVICE, seed=6)
    decay = torch.tensor([0.01, 1.0], device=DEVICE)
    (out, final), (out_ref, final_ref) = _run(q, k, v, decay, None, reverse=False, init_shift=1, segment_len=None)
    assert rel_error(out, out_ref) < TOLERANCE[dtype]
    assert rel_error(final, final_ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("accumulate", [0, 1])
def test_keys_wider_than_the_value_block(accumulate):
    """Keys wider than the value block (the state update's row weights on the wider key tile):
    both kernel forms, in the segment-state pass too (several segments and pieces)."""
    from lightning_op.kernels import config_override

    q, k, v = make_inputs(1, 2, 150, 96, 40, torch.float32, DEVICE, seed=7)
    decay = torch.tensor([0.05, 2.0], device=DEVICE)
    with config_override(accumulate=accumulate, chunk=16, block_v=16, segment_len=64, state_split=2):
        (out, final), (out_ref, final_ref) = _run(q, k, v, decay, None, reverse=False, init_shift=1,
                                                 segment_len=None)
    assert rel_error(out, out_ref) < TOLERANCE[torch.float32]
    assert rel_error(final, final_ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize(
    "dk, dv, block_v, decay_kind, with_init, reverse, segment_len",
    [(256, 256, 128, "mixed", True, False, None), (256, 40, 32, "mixed", True, True, 48),
     (96, 80, 64, "mixed", False, True, None), (128, 128, 128, "none", True, False, 64),
     (32, 24, 16, "none", False, False, None), (200, 40, 64, "mixed", True, False, 32)],
    ids=lambda x: str(x),
)
def test_transposed_output_kernel(dk, dv, block_v, decay_kind, with_init, reverse, segment_len):
    """The output kernel's ``TRANSPOSED`` form (``transposed=1``: the state held transposed in one, two or four
    parts of key columns) against the float64 chunked form: key widths that are not a multiple of
    the part, value blocks narrower than Dv, initial state, both directions, several segments."""
    from lightning_op.kernels import config_override

    q, k, v = make_inputs(2, 2, 75, dk, dv, torch.float32, DEVICE, seed=dk + dv)
    decay = torch.tensor([0.05, 2.0], device=DEVICE) if decay_kind == "mixed" else None
    init = torch.randn(2, 2, dk, dv, device=DEVICE) if with_init else None
    changes = dict(transposed=1, block_v=block_v, chunk=16)
    if segment_len is not None:
        changes.update(segment_len=segment_len, state_split=2)
    with config_override(**changes):
        (out, final), (out_ref, final_ref) = _run(q, k, v, decay, init, reverse=reverse,
                                                 init_shift=0 if reverse else 1, segment_len=None)
    assert rel_error(out, out_ref) < TOLERANCE[torch.float32]
    assert rel_error(final, final_ref) < TOLERANCE[torch.float32]


def test_bad_segment_length():
    from lightning_op.kernels import linear_attention

    q, k, v = make_inputs(1, 1, 10, 16, 16, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="segment_len"):
        linear_attention(q, k, v, segment_len=100)


@pytest.mark.parametrize(
    "changes",
    [dict(block_v=128), dict(chunk=128), dict(chunk=32, block_v=32), dict(chunk=16, segment_len=48),
     dict(num_warps=2, num_stages=1), dict(kv_chunk=32, kv_num_stages=1), dict(kv_chunk=16, kv_segment_len=48),
     dict(kv_fused=0, segment_len=64), dict(kv_chunk=16, kv_segment_len=48, segment_len=128),
     dict(chunk=16, segment_len=64, state_split=2), dict(chunk=16, segment_len=64, state_split=4, kv_state_split=2),
     dict(accumulate=0, chunk=16, segment_len=64, kv_segment_len=48, state_split=2),
     dict(accumulate=1, chunk=16, segment_len=64, kv_segment_len=48, state_split=2),
     dict(accumulate=1, state_accumulate=0, chunk=16, segment_len=64, kv_segment_len=48),
     dict(accumulate=0, update_accumulate=1, chunk=16, segment_len=64, state_split=2),
     # each fused backward form beside the forward's other one (the families choose apart)
     dict(accumulate=1, key_value=dict(accumulate=0), chunk=16, segment_len=64, kv_segment_len=48, state_split=2),
     dict(accumulate=0, update_accumulate=1, key_value=dict(accumulate=1), chunk=16, kv_segment_len=48),
     dict(transposed=1, chunk=16, segment_len=64, state_split=2), dict(transposed=1, block_v=32, chunk=32)],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_forced_configs_compute_the_same_function(changes, monkeypatch):
    """Every configuration the tuning sweeps may pick is correct, forward and all gradients."""
    monkeypatch.setenv("LIGHTNING_OP_BACKEND", "triton")  # CPU tensors: the interpreted kernels
    from lightning_op import lightning_attn
    from lightning_op.kernels import config_override

    from _helpers import oracle

    # float32 under the interpreter; bf16 on a GPU, where float32 tiles of the wider configs
    # (BLOCK_V 128, chunk 128) do not fit in shared memory
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    q, k, v = make_inputs(1, 2, 150, 32, 80, dtype, DEVICE, layout="bnhd", seed=11)
    decay = torch.tensor([0.02, 1.5], device=DEVICE)
    init = torch.randn(1, 2, 32, 80, device=DEVICE)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, init)]
    with config_override(**changes):
        out, final = lightning_attn(*leaves[:3], decay, scale=0.5, initial_state=leaves[3], output_final_state=True)
        grad_out, grad_final = torch.randn_like(out), torch.randn_like(final)
        grads = torch.autograd.grad((out * grad_out).sum() + (final * grad_final).sum(), leaves)
    out_ref, final_ref, grads_ref = oracle(q, k, v, decay, 0.5, init, grad_out, grad_final)
    for got, want in zip((out, final, *grads), (out_ref, final_ref, *grads_ref)):
        assert rel_error(got, want) < TOLERANCE[dtype]


# the two widest shapes (the slowest under the interpreter) with decay and dS_0 only: "plain" is met
# fused and composed at 128 padded columns by (150, 32, 80), in the two-pass fallback by (70, 16, 144)
KEY_VALUE_SHAPES = [(1, 16, 16, None, True), (150, 32, 80, 64, True), (203, 128, 128, 128, True),
                    (97, 24, 40, None, True), (130, 200, 40, 64, False), (70, 16, 144, None, False)]
KEY_VALUE_CASES = [(*shape, dtype, with_decay, with_decay)
                   for shape in KEY_VALUE_SHAPES for dtype in (torch.float32, torch.bfloat16)
                   for with_decay in (True, False) if with_decay or shape[1] < 128]


@pytest.mark.parametrize(
    "n, dk, dv, segment_len, fused, dtype, with_decay, with_grad_final", KEY_VALUE_CASES,
    ids=[f"{'decay+dS' if c[6] else 'plain'}-{'-'.join(map(str, c[:5]))}-{c[5]}" for c in KEY_VALUE_CASES],
)
def test_key_value_gradients_fused_and_composed(n, dk, dv, segment_len, fused, dtype, with_decay, with_grad_final,
                                                monkeypatch):
    """The fused dk/dv pass (heads up to 128 wide) and its two-pass fallback (wider heads) both
    equal the float64 composition, with several segments, odd lengths and dS_0 returned."""
    from lightning_op import backends
    from lightning_op.kernels import config_override

    backend, fused_calls = _counting_fused(backends.triton())
    q, k, v = make_inputs(2, 3, n, dk, dv, dtype, DEVICE, layout="bnhd", seed=5)
    grad_out = torch.randn(2, 3, n, dv, device=DEVICE).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    decay = torch.tensor([0.005, 0.4, 4.0], device=DEVICE) if with_decay else None
    grad_final = torch.randn(2, 3, dv, dk, device=DEVICE).transpose(-1, -2) if with_grad_final else None
    with config_override(**({} if segment_len is None else {"segment_len": segment_len})):
        got = backends.key_value_gradients(backend, grad_out, grad_final, q, k, v, decay, 0.8, store_final=True)
    # float32 tiles fit the fused pass only up to 64 columns
    widest = max(1 << (dk - 1).bit_length(), 1 << (dv - 1).bit_length())
    assert bool(fused_calls) == (fused and (dtype != torch.float32 or widest <= 64))
    want = backends.key_value_gradients(
        backends.chunked(), grad_out.double(), None if grad_final is None else grad_final.double(), q.double(),
        k.double(), v.double(), decay, 0.8, store_final=True,
    )
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    for a, b in zip(got, want):
        assert rel_error(a, b) < TOLERANCE[dtype]


def test_config_override_validates_and_restores():
    from lightning_op.kernels import choose_config, config_override

    default = choose_config(4, 1000, 64, 64, torch.device("cpu"))
    with config_override(block_v=32, num_stages=2):
        forced = choose_config(4, 1000, 64, 64, torch.device("cpu"))
        assert (forced.block_v, forced.num_stages) == (32, 2)
    assert choose_config(4, 1000, 64, 64, torch.device("cpu")) == default
    with pytest.raises(ValueError, match="unknown parameters"):
        with config_override(tile=64):
            pass
    with pytest.raises(ValueError, match="power of two"):
        with config_override(chunk=48):
            pass
    with pytest.raises(ValueError, match="decode_block_v must be a power of two"):
        with config_override(decode_block_v=24):
            pass
    with pytest.raises(ValueError, match="kv_fused must be 0 or 1"):
        with config_override(kv_fused=2):
            pass
    with pytest.raises(ValueError, match="accumulate must be 0 or 1"):
        with config_override(accumulate=2):
            pass
    with pytest.raises(ValueError, match="update_accumulate must be 0 or 1"):
        with config_override(update_accumulate=-1):
            pass
    # not parameters: each has one form, built in
    for name in ("weight_values", "kv_state_accumulate", "kv_update_accumulate", "kv_late_dk_scores"):
        with pytest.raises(ValueError, match=f"unknown parameters \\['{name}'\\]"):
            with config_override(**{name: 1}):
                pass
    with pytest.raises(ValueError, match="num_warps must be a positive int"):
        with config_override(kv_num_warps=0):
            pass


def test_config_override_of_the_fused_backward_wins_there_only():
    from lightning_op.kernels import choose_config, config_override

    cpu = torch.device("cpu")
    with config_override(chunk=32, num_warps=2, kv_chunk=16, kv_num_stages=1, kv_segment_len=100):
        general = choose_config(4, 1000, 64, 80, cpu)
        fused = choose_config(4, 1000, 64, 80, cpu, whole_value=True)
    assert (general.chunk, general.num_warps, general.num_stages, general.segment_len) == (32, 2, 3, 1024)
    # kv_ parameters win; general ones fill the rest; the value block is the whole (padded) width
    assert (fused.chunk, fused.num_warps, fused.num_stages, fused.segment_len, fused.block_v) == (16, 2, 1, 112, 128)


def _counting_fused(backend):
    """``backend`` with its fused dk / dv pass counted: ``(counting backend, calls)``."""
    calls = []

    def fused(*args, **kwargs):
        calls.append(1)
        return backend.fused_key_value_gradients(*args, **kwargs)

    return dataclasses.replace(backend, fused_key_value_gradients=fused), calls


def test_config_override_per_family():
    """``forward=`` forces the forward family alone, ``key_value=`` the fused backward alone,
    ``decode=`` the decode step; each family's parameters are checked against its declarations."""
    from lightning_op.kernels import choose_config, config_override
    from lightning_op.kernels.config import choose_decode

    cpu = torch.device("cpu")
    default_fused = choose_config(4, 1000, 64, 80, cpu, whole_value=True)
    with config_override(forward=dict(chunk=32, num_warps=2)):
        general = choose_config(4, 1000, 64, 80, cpu)
        assert choose_config(4, 1000, 64, 80, cpu, whole_value=True) == default_fused  # unlike the flat chunk=32
    assert (general.chunk, general.num_warps) == (32, 2)
    with config_override(key_value=dict(chunk=16, accumulate=0), decode=dict(block_v=64, num_warps=2)):
        fused = choose_config(4, 1000, 64, 80, cpu, whole_value=True)
        general = choose_config(4, 1000, 64, 80, cpu)
        assert choose_decode(4, 80, cpu) == (64, 2)
    assert (fused.chunk, fused.accumulate) == (16, False) and (general.chunk, general.accumulate) == (64, True)
    assert choose_decode(4, 80, cpu) == (32, 4)
    with config_override(chunk=32, key_value=dict(chunk=16)):  # the family's own wins over the flat shared name
        assert choose_config(4, 1000, 64, 80, cpu, whole_value=True).chunk == 16
    for bad, message in ((dict(forward=dict(fused=0)), "unknown forward parameter 'fused'"),
                         (dict(key_value=dict(block_v=32)), "unknown key_value parameter 'block_v'"),
                         (dict(key_value=dict(late_dk_scores=1)), "unknown key_value parameter 'late_dk_scores'"),
                         (dict(key_value=dict(update_accumulate=1)), "unknown key_value parameter 'update_accumulate'"),
                         (dict(key_value=dict(chunk=24)), "must be a power of two >= 16, got 24"),
                         (dict(decode=dict(num_warps=0)), "must be a positive int, got 0"),
                         (dict(forward=dict(num_warps=3)), "num_warps must be a power of two, got 3")):
        with pytest.raises(ValueError, match=message):
            with config_override(**bad):
                pass


def test_kv_fused_0_takes_the_composed_backward():
    from lightning_op import backends
    from lightning_op.kernels import config_override

    backend, fused_calls = _counting_fused(backends.triton())
    q, k, v = make_inputs(1, 2, 40, 16, 16, torch.float32, DEVICE)
    backends.key_value_gradients(backend, v, None, q, k, v, None, 1.0)
    assert fused_calls == [1]
    with config_override(kv_fused=0):
        backends.key_value_gradients(backend, v, None, q, k, v, None, 1.0)
    assert fused_calls == [1]


def test_choose_config_is_remembered_per_argument_set(monkeypatch):
    """Known argument sets cost a lookup; the GPU's size and forced parameters are part of the
    choice, so neither may be answered from the memory of another."""
    from lightning_op import kernels

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(kernels.config, "multiprocessors", lambda index: 132)
    first = kernels.choose_config(16, 65536, 128, 128, gpu)
    assert kernels.choose_config(16, 65536, 128, 128, gpu) is first
    monkeypatch.setattr(kernels.config, "multiprocessors", lambda index: 16)  # a smaller GPU: fewer segments
    assert kernels.choose_config(16, 65536, 128, 128, gpu).segment_len > first.segment_len
    with kernels.config_override(segment_len=1024):
        assert kernels.choose_config(16, 65536, 128, 128, gpu).segment_len == 1024
    monkeypatch.setattr(kernels.config, "multiprocessors", lambda index: 132)
    assert kernels.choose_config(16, 65536, 128, 128, gpu) == first
    with pytest.raises(ValueError, match="segment_len"):
        kernels.choose_config(1, 100, 16, 16, torch.device("cpu"), 100)


def test_choose_config_follows_the_measured_rules(monkeypatch):
    """The defaults the H200 sweeps chose (benchmarks/RESULTS.md), on a 132-multiprocessor GPU."""
    from lightning_op import kernels

    monkeypatch.setattr(kernels.config, "multiprocessors", lambda index: 132)
    gpu = torch.device("cuda", 0)
    main = kernels.choose_config(128, 8192, 128, 128, gpu)
    # whole value width, eight warps, and 128 programs occupy the GPU: one segment
    assert (main.block_v, main.num_warps, main.num_stages, main.segment_len) == (128, 8, 3, 8192)
    # B = 1: 16 programs; segments of 8192 rows give 128
    assert kernels.choose_config(16, 65536, 128, 128, gpu).segment_len == 8192
    # D = 64: four warps, the accumulating form, and 128 programs in one segment (2026-12-02:
    # 0.158 ms forward, 0.832 forward+backward, against 0.182 / 1.553 with segments of 4096)
    d64 = kernels.choose_config(128, 8192, 64, 64, gpu)
    assert (d64.block_v, d64.num_warps, d64.segment_len, d64.accumulate) == (64, 4, 8192, True)
    assert not main.accumulate and kernels.choose_config(128, 8192, 96, 80, gpu).accumulate is False
    # D = 128 (keys 65-128 wide) in 16-bit inputs: the forward's state update alone accumulating;
    # not in float32, not at D = 256, and implied by the accumulating form at D = 64; never in the
    # fused backward, which has no such form, not even where the forward's is forced
    assert main.update_accumulate and kernels.choose_config(128, 8192, 96, 80, gpu).update_accumulate
    assert not kernels.choose_config(128, 8192, 128, 128, gpu, itemsize=4).update_accumulate
    assert not kernels.choose_config(128, 8192, 256, 256, gpu).update_accumulate
    assert not kernels.choose_config(128, 8192, 64, 64, gpu).update_accumulate
    assert not kernels.choose_config(128, 8192, 128, 128, gpu, whole_value=True).update_accumulate
    with kernels.config_override(update_accumulate=1):
        assert kernels.choose_config(128, 8192, 64, 64, gpu).update_accumulate
        assert not kernels.choose_config(128, 8192, 64, 64, gpu, whole_value=True).update_accumulate
    # the transposed output kernel for 16-bit keys of 65-128 columns, and
    # wider ones with a 16-bit state operand (bfloat16), there in value blocks of 128 and two
    # stages; not float32, not float16 above 128 (its float32 state operand overflows shared
    # memory), not D = 64, not the fused backward (which has no such form)
    assert main.transposed and kernels.choose_config(128, 8192, 96, 80, gpu).transposed
    d256 = kernels.choose_config(128, 8192, 256, 256, gpu)
    assert (d256.transposed, d256.chunk, d256.block_v, d256.num_stages, d256.accumulate) == (True, 64, 128, 2, False)
    assert kernels.choose_config(128, 8192, 128, 128, gpu, state_itemsize=4).transposed  # float16 at D = 128
    d256_float16 = kernels.choose_config(128, 8192, 256, 256, gpu, state_itemsize=4)
    assert (d256_float16.transposed, d256_float16.block_v, d256_float16.num_stages) == (False, 64, 3)
    assert not kernels.choose_config(128, 8192, 128, 128, gpu, itemsize=4).transposed
    assert not d64.transposed and not kernels.choose_config(128, 8192, 128, 128, gpu, whole_value=True).transposed
    assert kernels.state_itemsize_of(torch.bfloat16) == 2
    assert kernels.state_itemsize_of(torch.float16) == kernels.state_itemsize_of(torch.float32) == 4
    # forcing the other output kernel at D = 256 brings back its own tiles
    with kernels.config_override(transposed=0):
        other = kernels.choose_config(128, 8192, 256, 256, gpu)
    assert (other.transposed, other.block_v, other.num_stages) == (False, 64, 3)
    # float32 tiles: half the value width; D = 256: chunks of 64 (32 and value blocks of 32 in float32)
    assert kernels.choose_config(128, 8192, 128, 128, gpu, itemsize=4).block_v == 64
    d256_float32 = kernels.choose_config(128, 8192, 256, 256, gpu, itemsize=4)
    assert (d256_float32.chunk, d256_float32.block_v) == (32, 32)
    # the fused backward: the whole value, fewer stages
    fused = kernels.choose_config(128, 8192, 128, 128, gpu, whole_value=True)
    assert (fused.block_v, fused.num_stages) == (128, 2)
    assert kernels.choose_config(128, 8192, 64, 64, gpu, whole_value=True).num_stages == 1
    # the segment-state pass of few programs is split until it covers 90% of the GPU: B4 N16K H16
    # has 64 programs in one segment of two, B2 N32K 32 x 3, B1 N64K 16 x 7: two pieces each
    assert (kernels.choose_config(64, 16384, 128, 128, gpu).segment_len,
            kernels.choose_config(64, 16384, 128, 128, gpu).state_split) == (8192, 2)
    assert kernels.choose_config(32, 32768, 128, 128, gpu).state_split == 2
    assert kernels.choose_config(16, 65536, 128, 128, gpu).state_split == 2
    assert kernels.choose_config(16, 131072, 128, 128, gpu).state_split == 2  # 16 x 7 of 16384 rows
    # B3 N16K: 48 programs in one segment of two: four pieces
    assert kernels.choose_config(48, 16384, 128, 128, gpu).state_split == 4
    # the segment-state pass in the accumulating form at every head dim, the output pass not at 128
    assert main.state_accumulate and d64.state_accumulate and d256.state_accumulate and fused.state_accumulate
    assert main.state_split == 1 and kernels.choose_config(64, 16384, 128, 128, gpu, 2048).state_split == 1
    # segments never shorter than 8 chunks
    assert kernels.choose_config(1, 1000, 128, 128, gpu).segment_len == 512
    # CPU (interpreter): one segment, whatever the size
    assert kernels.choose_config(1, 100_000, 128, 128, torch.device("cpu")).segment_len == 100_032


@pytest.mark.parametrize("accumulate", [0, 1, "update"])
def test_both_kernel_forms_without_decay(accumulate, monkeypatch):
    """The ``ACCUMULATE`` form, the other, and the other with the forward's state update
    accumulating (``update_accumulate``; the fused backward in its other form), without decay (the
    paths where value_scale and scale are not folded into a mask), with segments and a split state
    pass: forward and all gradients against the float64 oracle."""
    monkeypatch.setenv("LIGHTNING_OP_BACKEND", "triton")
    from lightning_op import lightning_attn
    from lightning_op.kernels import config_override

    from _helpers import oracle

    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    q, k, v = make_inputs(2, 1, 137, 48, 24, dtype, DEVICE, seed=5)
    init = torch.randn(2, 1, 48, 24, device=DEVICE)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, init)]
    form = dict(accumulate=0, update_accumulate=1) if accumulate == "update" else dict(accumulate=accumulate)
    with config_override(**form, chunk=16, segment_len=64, kv_segment_len=32, state_split=2):
        out, final = lightning_attn(*leaves[:3], None, scale=0.3, initial_state=leaves[3], output_final_state=True)
        grad_out, grad_final = torch.randn_like(out), torch.randn_like(final)
        grads = torch.autograd.grad((out * grad_out).sum() + (final * grad_final).sum(), leaves)
    out_ref, final_ref, grads_ref = oracle(q, k, v, None, 0.3, init, grad_out, grad_final)
    for got, want in zip((out, final, *grads), (out_ref, final_ref, *grads_ref)):
        assert rel_error(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("accumulate", [0, 1])
def test_both_fused_backward_forms_with_decay(accumulate, monkeypatch):
    """The fused dk/dv pass in each of its two forms (``ACCUMULATE``; without it, dk's scores
    after dv's store) with decay, an initial state, several segments and a split state pass, the
    forward in its other form: forward and all gradients against the float64 oracle, with the
    fused pass seen launching in the form asked for (float32 tiles fit it up to 64 columns)."""
    monkeypatch.setenv("LIGHTNING_OP_BACKEND", "triton")
    from lightning_op import kernels, lightning_attn
    from lightning_op.kernels import config_override

    forms = []
    kernel = kernels.launch._key_value_grad_kernel

    class Recorded:
        def __getitem__(self, grid):
            def launch(*args, **params):
                forms.append(params["ACCUMULATE"])
                return kernel[grid](*args, **params)

            return launch

    monkeypatch.setattr(kernels.launch, "_key_value_grad_kernel", Recorded())
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    q, k, v = make_inputs(2, 2, 137, 48, 24, dtype, DEVICE, layout="bnhd", seed=7)
    decay = torch.tensor([0.03, 0.9], device=DEVICE)
    init = torch.randn(2, 2, 48, 24, device=DEVICE)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, init)]
    with config_override(forward=dict(accumulate=1 - accumulate, chunk=16, segment_len=64),
                         key_value=dict(accumulate=accumulate, chunk=16, segment_len=32, state_split=2)):
        out, final = lightning_attn(*leaves[:3], decay, scale=0.6, initial_state=leaves[3], output_final_state=True)
        grad_out, grad_final = torch.randn_like(out), torch.randn_like(final)
        grads = torch.autograd.grad((out * grad_out).sum() + (final * grad_final).sum(), leaves)
    assert forms == [bool(accumulate)]
    out_ref, final_ref, grads_ref = oracle(q, k, v, decay, 0.6, init, grad_out, grad_final)
    for got, want in zip((out, final, *grads), (out_ref, final_ref, *grads_ref)):
        assert rel_error(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("dk, dv, with_init", [(32, 32, True), (32, 32, False), (16, 40, True)])
def test_backward_starts_dq_from_the_forwards_segment_states(dk, dv, with_init, monkeypatch):
    """The eager path keeps the forward's segment start states and dq's pass starts from them,
    read transposed: a segmented forward+backward runs two segment-state passes instead of three
    (the forward's and dk/dv's, both of their own kind), with the oracle's gradients; so does the
    op through the dispatcher (its autograd runs ``attn_train``), to the same values."""
    from lightning_op import kernels, ops
    from lightning_op.kernels import config_override

    monkeypatch.setenv("LIGHTNING_OP_BACKEND", "triton")
    passes = []
    real = kernels.launch._segment_start_states

    def counted(key, value, *args, **kwargs):
        passes.append((tuple(key.shape), tuple(value.shape), kwargs["reverse"]))
        return real(key, value, *args, **kwargs)

    monkeypatch.setattr(kernels.launch, "_segment_start_states", counted)
    # 200 rows: four forward segments of 64 (the last partial), two of 128 where the backward recuts
    q, k, v = make_inputs(2, 2, 200, dk, dv, torch.float32, DEVICE, seed=11)
    decay = torch.tensor([0.01, 0.3], device=DEVICE)
    init = torch.randn(2, 2, dk, dv, device=DEVICE) if with_init else None
    grad_out = torch.randn(2, 2, 200, dv, device=DEVICE)
    grad_final = torch.randn(2, 2, dk, dv, device=DEVICE)
    expected_out, expected_final, expected_grads = oracle(q, k, v, decay, 0.7, init, grad_out, grad_final)

    cut = dict(segment_len=64, state_split=2, kv_segment_len=64, kv_state_split=2)

    def run(attn, backward_cut=cut):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)] + ([init.clone().requires_grad_()] if with_init else [])
        with config_override(**cut):
            out, final = attn(*leaves[:3], decay, 0.7, leaves[3] if with_init else None)
        with config_override(**backward_cut):
            torch.autograd.backward((out, final), (grad_out, grad_final))
        found = list(passes)
        passes.clear()
        return (out, final, [x.grad for x in leaves]), found

    eager, eager_passes = run(ops.attn_eager)
    op, op_passes = run(torch.ops.lightning.attn)
    # where the backward cuts the sequence otherwise, dq's pass cannot use the forward's states
    recut, recut_passes = run(ops.attn_eager, dict(cut, segment_len=128))
    # forward (keys k), dk/dv (keys q, reverse); a backward cut otherwise adds dq's own (keys v)
    for found in (eager_passes, op_passes):
        assert [p[2] for p in found] == [False, True], found
    assert [p[0][-1] for p in recut_passes] == [dk, dv, dk] and [p[2] for p in recut_passes] == [False, False, True], \
        recut_passes
    for got in (eager, op, recut):
        assert rel_error(got[0], expected_out) < TOLERANCE[torch.float32]
        assert rel_error(got[1], expected_final) < TOLERANCE[torch.float32]
        for grad, want in zip(got[2], expected_grads):
            assert rel_error(grad, want) < TOLERANCE[torch.float32]
    for a, b in zip(eager[2], op[2]):
        assert rel_error(a, b) < 1e-5


@pytest.mark.parametrize("form", ["dense", "packed-grouped", "dynamic"])
def test_training_graphs_carry_the_forwards_segment_states(form, monkeypatch):
    """A compiled training graph of ``torch.ops.lightning.attn`` (AOTAutograd, as Inductor's) runs
    ``attn_train``, whose start states travel to ``attn_bwd``: dq's pass starts from them, so the
    graphs run the eager path's two segment-state passes, with the oracle's values and gradients
    (packed sequences with a group of heads sharing k, v and the state too). With a symbolic
    length the cut is not known when the graph is traced: ``attn`` and a third pass, same values."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    from lightning_op import kernels
    from lightning_op.kernels import config_override

    monkeypatch.setenv("LIGHTNING_OP_BACKEND", "triton")
    passes, graphs = [], []
    real = kernels.launch._segment_start_states

    def counted(key, value, *args, **kwargs):
        passes.append(kwargs["reverse"])
        return real(key, value, *args, **kwargs)

    monkeypatch.setattr(kernels.launch, "_segment_start_states", counted)

    def recorded(gm, inputs):
        def compiler(graph, _):
            graphs.append({str(node.target) for node in graph.graph.nodes if node.op == "call_function"})
            return make_boxed_func(graph.forward)
        return aot_module_simplified(gm, inputs, fw_compiler=compiler, bw_compiler=compiler)

    n, dk, dv = 200, 16, 24
    packed = form == "packed-grouped"
    b, h, hkv = (1, 4, 2) if packed else (2, 2, 2)
    q = torch.randn(b, h, n, dk, device=DEVICE) * 0.5
    k = torch.randn(b, hkv, n, dk, device=DEVICE) * 0.5
    v = torch.randn(b, hkv, n, dv, device=DEVICE)
    decay = torch.tensor([0.01, 0.3], device=DEVICE)  # [Hkv]: each group shares one state
    cu = torch.tensor([0, 70, 70, 200], device=DEVICE) if packed else None
    init = torch.randn(3 if packed else b, 2, dk, dv, device=DEVICE)
    grad_out = torch.randn(b, h, n, dv, device=DEVICE)
    grad_final = torch.randn_like(init)
    expected = oracle(q, k, v, decay, 0.7, init, grad_out, grad_final, cu_seqlens=cu)

    def attention(q, k, v, init):
        return torch.ops.lightning.attn(q, k, v, decay, 0.7, init, cu)

    compiled = torch.compile(attention, backend=recorded, fullgraph=True, dynamic=form == "dynamic")
    leaves = [x.clone().requires_grad_() for x in (q, k, v, init)]
    with config_override(chunk=16, segment_len=64, state_split=2, kv_segment_len=64, kv_state_split=2):
        out, final = compiled(*leaves)
        torch.autograd.backward((out, final), (grad_out, grad_final))
    forward_ops, backward_ops = graphs
    if form == "dynamic":
        assert "lightning.attn.default" in forward_ops and passes == [False, False, True], (forward_ops, passes)
    else:
        assert "lightning.attn_train.default" in forward_ops and "lightning.attn_bwd.default" in backward_ops
        assert passes == [False, True], passes
    for got, want in zip((out, final, *(x.grad for x in leaves)), (expected[0], expected[1], *expected[2])):
        assert rel_error(got, want) < TOLERANCE[torch.float32]
