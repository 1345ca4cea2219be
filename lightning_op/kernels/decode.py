"""Triton kernel of the decode step: a few tokens against a carried state, updated in place.

For each token t of the T given (T is small, 1 when generating)::

    S   <- lam * S + k_t^T v_t
    o_t  = scale * q_t S

(``reference.attention_step``). One program per (value block, batch*head) (both on grid axis 0) keeps its Dk x BLOCK_V
slice of the float32 state in registers across the T tokens, then writes it back where it was
read: the state is read once and written once, and nothing is allocated but the output.
"""

import triton
import triton.language as tl

from .stages import _block_and_head, _head


@triton.jit(do_not_specialize=["T"])
def _decode_step_kernel(
    Q, K, V, O, STATE, DECAY,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_sb, stride_sh, stride_sk, stride_sv,
    T, H, DK, DV, scale,
    HAS_DECAY: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_v, bh = _block_and_head(DV, BLOCK_V)
    scale = tl.cast(scale, tl.float32)  # a float argument may arrive as fp64 (Inductor)
    b = bh // H
    h = bh % H
    cols_k = tl.arange(0, BLOCK_K)
    cols_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    valid_k = cols_k < DK
    valid_v = cols_v < DV
    tile_mask = valid_k[:, None] & valid_v[None, :]
    state_ptrs = _head(STATE, b, h, stride_sb, stride_sh) + cols_k[:, None] * stride_sk + cols_v[None, :] * stride_sv
    state = tl.load(state_ptrs, mask=tile_mask, other=0.0)
    if HAS_DECAY:
        lam = tl.exp(-tl.load(DECAY + h).to(tl.float32))
    q_ptr = _head(Q, b, h, stride_qb, stride_qh) + cols_k * stride_qd
    k_ptr = _head(K, b, h, stride_kb, stride_kh) + cols_k * stride_kd
    v_ptr = _head(V, b, h, stride_vb, stride_vh) + cols_v * stride_vd
    o_ptr = _head(O, b, h, stride_ob, stride_oh) + cols_v * stride_od
    for t in range(0, T):
        q = tl.load(q_ptr + t * stride_qt, mask=valid_k, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + t * stride_kt, mask=valid_k, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t * stride_vt, mask=valid_v, other=0.0).to(tl.float32)
        if HAS_DECAY:
            state = state * lam
        state += k[:, None] * v[None, :]
        out = tl.sum(q[:, None] * state, axis=0) * scale
        tl.store(o_ptr + t * stride_ot, out.to(O.dtype.element_ty), mask=valid_v)
    tl.store(state_ptrs, state, mask=tile_mask)
