"""The decay's gradient on the Triton path, through the interpreter on CPU: the output kernels'
row dot products (``row_dot_with`` / ``row_dots``) and the fused dk / dv pass's (``key_row_dots``)
against torch, and ``backends.backward``'s decay gradient (boundary states from
``kernels.boundary_states``, row sums from the dq pass and the fused dk / dv pass) against
autograd through the float64 quadratic oracle, with blocks short enough that every sequence
crosses several block boundaries."""

import dataclasses
import os

import pytest
import torch

from lightning_op import backends, reference
from lightning_op.kernels import config_override, key_value_gradients, linear_attention

from _helpers import rel_error

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs the Triton interpreter or a GPU",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DK, DV = 16, 32
#: a zero-length sequence, a one-row one, and lengths that are no multiple of the block
LENGTHS = [37, 0, 1, 58, 21]
#: rows per block of the decay gradient's position weights: several boundaries in each sequence
BLOCK = 16
#: the float64 oracle's distance per input dtype
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _rows(gen, b, heads, n, d, dtype):
    return (0.5 * torch.randn(b, heads, n, d, generator=gen)).to(dtype=dtype, device=DEVICE)


# ----------------------------------------------------------------------------- row dot products


def _assert_dots_of_unrounded_rows(dots, rounded_rows, weights):
    """``dots[..., t] = <x_t, weights_t>`` for rows x whose bf16 rounding is ``rounded_rows``: each
    within the rounding's bound (2^-8 of each product) of the rounded rows' dots."""
    rows = rounded_rows.float()
    bound = (rows.abs() * weights.abs()).sum(-1) * 2.0 ** -8
    assert ((dots - (rows * weights).sum(-1)).abs() <= bound + 1e-6).all()


@pytest.mark.parametrize(
    "dtype, reverse, transposed, packed, block_v",
    [(torch.float32, False, 0, False, 16),
     (torch.bfloat16, True, 1, True, 16),
     (torch.float32, True, 0, True, 32)],
    ids=["forward-split", "reverse-transposed-packed-split", "reverse-packed"],
)
def test_row_dots_of_the_output_rows(dtype, reverse, transposed, packed, block_v):
    """``row_dots[b, h, t] = <out_t, R_t>`` in float32 from the unrounded rows: the same output as
    without the option, R read at head h // group (R has half the heads), forward and reversed,
    packed (each sequence walked from its own end when reversed), value columns split over
    programs (``block_v`` < Dv) or not, in both output kernels."""
    gen = torch.Generator().manual_seed(1)
    n = sum(LENGTHS)
    q, k = _rows(gen, 1, 4, n, DK, dtype), _rows(gen, 1, 2, n, DK, dtype)
    v, with_ = _rows(gen, 1, 2, n, DV, dtype), _rows(gen, 1, 2, n, DV, dtype)
    decay = torch.tensor([0.01, 0.3, 0.05, 1.0], device=DEVICE)
    cu = _cu(LENGTHS) if packed else None
    init = torch.randn(len(LENGTHS) if packed else 1, 2, DK, DV, generator=gen).to(DEVICE)
    arguments = dict(out_scale=0.7, value_scale=1.3, initial_state=init, reverse=reverse, cu_seqlens=cu)
    dots = torch.full((1, 4, n), float("nan"), device=DEVICE)
    with config_override(transposed=transposed, block_v=block_v, chunk=16, segment_len=32):
        out, final = linear_attention(q, k, v, decay, row_dot_with=with_, row_dots=dots, **arguments)
        # the unrounded rows: the same call on float32 copies (the interpreter's products are float32)
        wide_out, wide_final = linear_attention(q.float(), k.float(), v.float(), decay, **arguments)
    # the option leaves the outputs as they are (16-bit inputs: a configuration of their own, whose
    # tensor-core products on a GPU round the scores to 16 bits, where the float32 copies' do not)
    exact = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=1e-2, atol=3e-2)
    torch.testing.assert_close(out.float(), wide_out, **exact)
    torch.testing.assert_close(final, wide_final, **exact)
    rows = with_.float().repeat_interleave(2, 1)
    if DEVICE == "cuda" and dtype != torch.float32:
        # a GPU's 16-bit products round the scores the float32 copies keep, so their rows are other
        # rows: the dots must be those of this call's rows before their rounding to 16 bits
        _assert_dots_of_unrounded_rows(dots, out, rows)
        return
    want = (wide_out * rows).sum(-1)
    torch.testing.assert_close(dots, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if dtype == torch.bfloat16:  # from the rounded rows the products would be this far off
        rounded = (out.float() * rows).sum(-1)
        assert (rounded - want).abs().max() > 10 * (dots - want).abs().max()


@pytest.mark.parametrize(
    "dtype, h, hkv, batch, packed, segment_len",
    [(torch.float32, 2, 2, 2, False, None),
     (torch.bfloat16, 4, 2, 1, True, 32),
     (torch.float32, 4, 1, 2, False, 32)],
    ids=["dense", "packed-grouped-segments-bf16", "grouped-segments"],
)
def test_key_row_dots_of_the_fused_pass(dtype, h, hkv, batch, packed, segment_len):
    """``key_row_dots[b, h, t] = <dk_t, k_t>`` of the fused dk / dv pass, dk per compute head h and
    k read at head h // group, in float32 from dk's unrounded rows: dk, dv and dS_0 as without the
    option, whole sequences or cut into segments of several programs each (rows walked from each
    packed sequence's own end)."""
    gen = torch.Generator().manual_seed(4)
    n = sum(LENGTHS) if packed else 131
    q, grad_out = _rows(gen, batch, h, n, DK, dtype), _rows(gen, batch, h, n, DV, dtype)
    k, v = _rows(gen, batch, hkv, n, DK, dtype), _rows(gen, batch, hkv, n, DV, dtype)
    decay = torch.tensor([0.01, 0.3, 0.05, 1.0][:h], device=DEVICE)
    cu = _cu(LENGTHS) if packed else None
    grad_final = torch.randn(len(LENGTHS) if packed else batch, hkv, DK, DV, generator=gen).to(DEVICE)
    arguments = dict(store_final=True, cu_seqlens=cu)
    dots = torch.full((batch, h, n), float("nan"), device=DEVICE)
    forced = {} if segment_len is None else dict(kv_chunk=16, kv_segment_len=segment_len)
    with config_override(**forced):
        dk, dv, ds0 = key_value_gradients(grad_out, grad_final, q, k, v, decay, 0.7, key_row_dots=dots, **arguments)
        plain = key_value_gradients(grad_out, grad_final, q, k, v, decay, 0.7, **arguments)
        # the unrounded rows: the same pass on float32 copies (the interpreter's products are float32)
        wide_dk = key_value_gradients(grad_out.float(), grad_final, q.float(), k.float(), v.float(), decay, 0.7,
                                      **arguments)[0]
    for got, want in zip((dk, dv, ds0), plain):  # the option leaves the gradients as they are
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    keys = k.float().repeat_interleave(h // hkv, 1)
    if DEVICE == "cuda" and dtype != torch.float32:
        # a GPU's 16-bit products round the pass's intermediates, so the float32 copies' dk is another
        # dk: the dots must be those of this pass's rows before their rounding to 16 bits
        _assert_dots_of_unrounded_rows(dots, dk, keys)
        return
    want = (wide_dk * keys).sum(-1)
    torch.testing.assert_close(dots, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if dtype == torch.float32:  # torch's products of the pass's own dk
        torch.testing.assert_close(dots, (dk * keys).sum(-1), rtol=1e-5, atol=1e-5 * want.abs().max().item())
    else:  # from the rounded rows the products would be this far off
        rounded = (dk.float() * keys).sum(-1)
        assert (rounded - want).abs().max() > 10 * (dots - want).abs().max()


# ----------------------------------------------------------------------------- the decay's gradient


def _oracle(q, k, v, decay, scale, init, cu, grad_out, grad_final):
    """Gradients of q, k, v, decay and the initial state by autograd through the quadratic form in
    float64."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, decay)]
    wide_init = None if init is None else init.detach().double().requires_grad_()
    out, final = reference.attention_quadratic(*leaves[:3], leaves[3], scale, wide_init, cu)
    loss = (out * grad_out.double()).sum()
    if grad_final is not None:
        loss = loss + (final * grad_final.double()).sum()
    inputs = leaves + ([wide_init] if wide_init is not None else [])
    return torch.autograd.grad(loss, inputs)


def _recording(backend, calls):
    """``backend`` with its linear attention and its fused dk / dv pass recording each pass: which
    one, its input dtypes and whether it computed row sums."""

    def linear_attention(query, key, value, *args, **kwargs):
        calls.append(("linear", query.dtype, key.dtype, value.dtype, "row_dot_with" in kwargs))
        return backend.linear_attention(query, key, value, *args, **kwargs)

    def fused(grad_out, grad_final_state, q, k, v, *args, **kwargs):
        calls.append(("fused", q.dtype, k.dtype, v.dtype, "key_row_dots" in kwargs))
        return backend.fused_key_value_gradients(grad_out, grad_final_state, q, k, v, *args, **kwargs)

    return dataclasses.replace(backend, linear_attention=linear_attention, fused_key_value_gradients=fused)


CASES = {
    # h, hkv, decay heads, batch, lengths (None: dense), dtype, initial state, final-state gradient
    "dense": (2, 2, 2, 2, None, torch.float32, True, True),
    "dense-bf16-no-states": (2, 1, 2, 1, None, torch.bfloat16, False, False),
    "packed-grouped": (4, 2, 4, 1, LENGTHS, torch.float32, True, True),
    "packed-shared-bf16": (4, 2, 2, 1, LENGTHS, torch.bfloat16, True, True),
    "packed-final-only": (2, 1, 1, 1, LENGTHS, torch.float32, False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decay_gradient_of_the_kernels(case, monkeypatch):
    """Every gradient of ``backends.backward`` on the Triton backend with ``decay_grad``, against
    the float64 oracle: boundary states every ``BLOCK`` rows from the kernels (the reference's
    block walk is never called), row sums from the dq pass and the fused dk / dv pass (dk and dv
    from one pass, as without the decay's gradient), which run in the inputs' type (no float32
    copies of 16-bit inputs)."""
    h, hkv, decay_heads, b, lengths, dtype, with_init, with_grad_final = CASES[case]
    gen = torch.Generator().manual_seed(2)
    n = 131 if lengths is None else sum(lengths)
    cu = None if lengths is None else _cu(lengths)
    states = b if cu is None else len(lengths)
    q, k, v = _rows(gen, b, h, n, DK, dtype), _rows(gen, b, hkv, n, DK, dtype), _rows(gen, b, hkv, n, DV, dtype)
    decay = torch.tensor([0.02, 0.3, 0.001, 0.1][:decay_heads], device=DEVICE)
    state_heads = reference.state_heads(h, hkv, decay)
    init = torch.randn(states, state_heads, DK, DV, generator=gen).to(DEVICE) if with_init else None
    grad_out = _rows(gen, b, h, n, DV, dtype)
    grad_final = torch.randn(states, state_heads, DK, DV, generator=gen).to(DEVICE) if with_grad_final else None

    def no_walk(*args, **kwargs):
        raise AssertionError("the Triton path walked the boundary states in Python")

    monkeypatch.setattr(reference, "block_states", no_walk)
    calls = []
    backend = _recording(backends.triton(), calls)
    dq, dk, dv, d_init, d_decay = backends.backward(backend, grad_out, grad_final, q, k, v, decay, 0.7, init,
                                                    cu_seqlens=cu, decay_grad=True, decay_block=BLOCK)
    assert all(call[1:4] == (dtype,) * 3 for call in calls), calls
    # dq's pass and the fused dk / dv pass, each with its row sums
    assert [(call[0], call[4]) for call in calls] == [("linear", True), ("fused", True)], calls
    want = _oracle(q, k, v, decay, 0.7, init, cu, grad_out, grad_final)
    assert d_decay.dtype == torch.float32 and d_decay.shape == decay.shape
    tolerance = TOLERANCE[dtype]
    errors = {name: rel_error(got, w) for name, got, w in zip(("dq", "dk", "dv", "decay", "init"),
                                                              (dq, dk, dv, d_decay, d_init), want)}
    assert max(errors.values()) < tolerance, errors
    # each head's decay gradient, not only their norm: a strongly decayed head's is small
    assert ((d_decay.double() - want[3]).abs() / want[3].abs()).max() < tolerance, (d_decay, want[3])


def test_decay_gradient_of_both_backends_agree_at_the_default_blocks():
    """The chunked backend's reference walk and the kernels' boundary states give the same decay
    gradient with their default blocks (64 rows on CPU), N crossing several of them."""
    gen = torch.Generator().manual_seed(3)
    n = 200
    q, k, v = _rows(gen, 1, 2, n, DK, torch.float32), _rows(gen, 1, 2, n, DK, torch.float32), _rows(
        gen, 1, 2, n, DV, torch.float32)
    grad_out = _rows(gen, 1, 2, n, DV, torch.float32)
    decay = torch.tensor([0.05, 0.005], device=DEVICE)
    init, grad_final = (torch.randn(1, 2, DK, DV, generator=gen).to(DEVICE) for _ in range(2))
    got = [backends.backward(backend, grad_out, grad_final, q, k, v, decay, 0.5, init, decay_grad=True)[4]
           for backend in (backends.chunked(32), backends.triton())]
    # on a GPU the two sum their terms in other orders (and other kernels): float32 rounding apart
    torch.testing.assert_close(got[0], got[1], rtol=2e-5 if DEVICE == "cpu" else 1e-4, atol=0)
