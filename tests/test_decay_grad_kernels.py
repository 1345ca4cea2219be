"""The decay's gradient on the Triton path, through the interpreter on CPU: every gradient of
``backends.backward`` with ``decay_grad`` against autograd through the float64 quadratic oracle,
the passes it runs (dq's, the fused dk / dv pass and the moment pass, all in the inputs' type),
and the two backends' agreement at their default chunks."""

import dataclasses
import os

import pytest
import torch

from lightning_op import backends, reference

from _helpers import rel_error

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs the Triton interpreter or a GPU",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DK, DV = 16, 32
#: a zero-length sequence, a one-row one, and lengths that are no multiple of a chunk
LENGTHS = [37, 0, 1, 58, 21]
#: the float64 oracle's distance per input dtype
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _rows(gen, b, heads, n, d, dtype):
    return (0.5 * torch.randn(b, heads, n, d, generator=gen)).to(dtype=dtype, device=DEVICE)


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
    """``backend`` with its passes recording each call: which one and its input dtypes."""

    def linear_attention(query, key, value, *args, **kwargs):
        calls.append(("linear", query.dtype, key.dtype, value.dtype))
        return backend.linear_attention(query, key, value, *args, **kwargs)

    def fused(grad_out, grad_final_state, q, k, v, *args, **kwargs):
        calls.append(("fused", q.dtype, k.dtype, v.dtype))
        return backend.fused_key_value_gradients(grad_out, grad_final_state, q, k, v, *args, **kwargs)

    def decay_gradient(q, k, v, grad_out, *args, **kwargs):
        calls.append(("moment", q.dtype, k.dtype, v.dtype))
        return backend.decay_gradient(q, k, v, grad_out, *args, **kwargs)

    return dataclasses.replace(backend, linear_attention=linear_attention, fused_key_value_gradients=fused,
                               decay_gradient=decay_gradient)


CASES = {
    # h, hkv, decay heads, batch, lengths (None: dense), dtype, initial state, final-state gradient
    "dense": (2, 2, 2, 2, None, torch.float32, True, True),
    "dense-bf16-no-states": (2, 1, 2, 1, None, torch.bfloat16, False, False),
    "packed-grouped": (4, 2, 4, 1, LENGTHS, torch.float32, True, True),
    "packed-shared-bf16": (4, 2, 2, 1, LENGTHS, torch.bfloat16, True, True),
    "packed-final-only": (2, 1, 1, 1, LENGTHS, torch.float32, False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decay_gradient_of_the_kernels(case):
    """Every gradient of ``backends.backward`` on the Triton backend with ``decay_grad``, against
    the float64 oracle: dq's pass, the fused dk / dv pass (as without the decay's gradient) and the
    moment pass, each once and in the inputs' type (no float32 copies of 16-bit inputs)."""
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

    calls = []
    backend = _recording(backends.triton(), calls)
    dq, dk, dv, d_init, d_decay = backends.backward(backend, grad_out, grad_final, q, k, v, decay, 0.7, init,
                                                    cu_seqlens=cu, decay_grad=True)
    assert calls == [("linear", dtype, dtype, dtype), ("fused", dtype, dtype, dtype),
                     ("moment", dtype, dtype, dtype)], calls
    want = _oracle(q, k, v, decay, 0.7, init, cu, grad_out, grad_final)
    assert d_decay.dtype == torch.float32 and d_decay.shape == decay.shape
    tolerance = TOLERANCE[dtype]
    errors = {name: rel_error(got, w) for name, got, w in zip(("dq", "dk", "dv", "decay", "init"),
                                                              (dq, dk, dv, d_decay, d_init), want)}
    assert max(errors.values()) < tolerance, errors
    # each head's decay gradient, not only their norm: a strongly decayed head's is small
    assert ((d_decay.double() - want[3]).abs() / want[3].abs()).max() < tolerance, (d_decay, want[3])


def test_decay_gradient_of_both_backends_agree_at_the_default_chunks():
    """The chunked backend and the kernels give the same decay gradient with their default chunks
    (64 rows), N crossing several of them."""
    gen = torch.Generator().manual_seed(3)
    n = 200
    q, k, v = _rows(gen, 1, 2, n, DK, torch.float32), _rows(gen, 1, 2, n, DK, torch.float32), _rows(
        gen, 1, 2, n, DV, torch.float32)
    grad_out = _rows(gen, 1, 2, n, DV, torch.float32)
    decay = torch.tensor([0.05, 0.005], device=DEVICE)
    init, grad_final = (torch.randn(1, 2, DK, DV, generator=gen).to(DEVICE) for _ in range(2))
    got = [backends.backward(backend, grad_out, grad_final, q, k, v, decay, 0.5, init, decay_grad=True)[4]
           for backend in (backends.chunked(64), backends.triton())]
    # on a GPU the two sum their terms in other orders (and other kernels): float32 rounding apart
    torch.testing.assert_close(got[0], got[1], rtol=2e-5 if DEVICE == "cpu" else 1e-4, atol=0)
