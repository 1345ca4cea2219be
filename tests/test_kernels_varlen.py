"""Grouped heads in the Triton kernels, through the interpreter on CPU.

Every kernel call computes H heads (the most any input has); a tensor with fewer heads is read in
place, compute head h reading its head ``h // (H / heads)``. The float64 oracles of ``reference``
define them; the gradients are the passes ``backends.backward`` composes, against autograd
through the quadratic oracle.
"""

import os

import pytest
import torch

from lightning_op import reference

from _helpers import TOLERANCE, rel_error

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs the Triton interpreter or a GPU",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DK, DV = 16, 32
#: short segments and pieces: several of them in a sequence of 50 rows
SEGMENTS = dict(chunk=16, segment_len=32, state_split=2, kv_segment_len=32, kv_state_split=2)
MIXED_DECAY = [0.01, 3.0, 0.2, 0.05]  # weak and strong, per compute head


def _rows(n, heads, d, dtype, gen, bnhd):
    """[1, heads, n, d]; ``bnhd``: a view of [1, n, heads, d] storage, read in place."""
    if bnhd:
        x = torch.randn(1, n, heads, d, generator=gen).transpose(1, 2)
    else:
        x = torch.randn(1, heads, n, d, generator=gen)
    return (0.5 * x).to(dtype=dtype, device=DEVICE)


def _widen(x, h):
    """``x`` with its heads repeated up to h, in float64: the oracle's inputs (per compute head)."""
    return x.double().repeat_interleave(h // x.shape[1], 1)


def _oracle_decay(decay, h):
    """A decay of one slope per compute head, so that the oracle keeps a state per compute head
    as the kernels do (zeros stand for no decay)."""
    return torch.zeros(h, dtype=torch.float64, device=DEVICE) if decay is None else decay.double()


def _oracle_gradients(q, k, v, decay_h, scale, init_h, cu, grad_out, grad_final_h):
    """Out, final state and the gradients of q, k, v (at their own heads) and of the initial
    state per compute head, by autograd through the float64 quadratic oracle."""
    h = q.shape[1]
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, init_h)]
    out, final = reference.attention_quadratic(
        leaves[0], _widen(leaves[1], h), _widen(leaves[2], h), _oracle_decay(decay_h, h), scale, leaves[3],
        cu_seqlens=cu,
    )
    loss = (out * grad_out.double()).sum() + (final * grad_final_h.double()).sum()
    return torch.autograd.grad(loss, leaves)


def _group_sum(x, hkv):
    """Per-compute-head gradients [1, H, N, D] summed over each group: the kv heads' own."""
    return x.double().reshape(x.shape[0], hkv, -1, *x.shape[2:]).sum(2)


def test_grouped_heads_without_packing():
    """Grouped heads in a batch of two (no ``cu_seqlens``): the forward, dq and the fused dk / dv
    with q at 4 heads and k, v, the initial state and grad_final_state at 2, read in place from
    [B, N, H, D] storage, against the oracle per compute head; several segments."""
    from lightning_op.kernels import config_override, key_value_gradients, linear_attention

    gen = torch.Generator().manual_seed(2)
    h, hkv, n, scale = 4, 2, 50, 0.6
    q, k, v = _rows(2 * n, h, DK, torch.float32, gen, True), _rows(2 * n, hkv, DK, torch.float32, gen, True), \
        _rows(2 * n, hkv, DV, torch.float32, gen, True)
    q, k, v = (x.reshape(x.shape[1], 2, n, -1).transpose(0, 1) for x in (q, k, v))  # [2, heads, n, d] views
    decay_h = torch.tensor(MIXED_DECAY, device=DEVICE)
    init, grad_final = (torch.randn(2, hkv, DK, DV, generator=gen).to(DEVICE) for _ in range(2))
    grad_out = torch.randn(2, h, n, DV, generator=gen).to(DEVICE)
    with config_override(**SEGMENTS):
        out, final = linear_attention(q, k, v, decay_h, out_scale=scale, initial_state=init)
        dq, _ = linear_attention(grad_out, v, k, decay_h, out_scale=scale, initial_state=init.transpose(-1, -2),
                                 store_final=False)
        dk, dv, ds0 = key_value_gradients(grad_out, grad_final, q, k, v, decay_h, scale, store_final=True)
    expected_out, expected_final = reference.attention_quadratic(q.double(), _widen(k, h), _widen(v, h),
                                                                 decay_h.double(), scale, _widen(init, h))
    expected = _oracle_gradients(q, k, v, decay_h, scale, _widen(init, h), None, grad_out, _widen(grad_final, h))
    lam = torch.exp(-decay_h.double()).reshape(1, h, 1, 1)
    tolerance = TOLERANCE[torch.float32]
    for got, want in ((out, expected_out), (final, expected_final), (dq, expected[0]),
                      (_group_sum(dk, hkv), expected[1]), (_group_sum(dv, hkv), expected[2]),
                      (lam * ds0.double(), expected[3])):
        assert rel_error(got, want) < tolerance
