"""Triton kernel of the decode step: a few tokens against a carried state, updated in place.

For each token t of the T given (T is small, 1 when generating)::

    S   <- lam * S + k_t^T v_t
    o_t  = scale * q_t S

(``reference.attention_step``). One program per (value block, batch * state head) (both on grid
axis 0) keeps its Dk x BLOCK_V slice of the float32 state in registers across the T tokens, then
writes it back where it was read: the state is read once and written once, and nothing is
allocated but the output.

Two switches, both off in the dense launch (which then compiles to the code it had without them):

- a slot table (``SLOTS``): the state is a pool ``[P, Hs, Dk, Dv]`` (``P = NUM_SLOTS``) and row b
  continues slot ``SLOTS[b]``; a negative entry marks a padding row, whose loads are all masked
  off (its outputs are stored as zeros, whatever q, k and v hold) and whose state is neither read
  nor written. An entry >= P is treated the same way: eager calls refuse it before the launch,
  but captured and compiled calls cannot read the table, and a slot past the pool must never be
  written;
- grouped heads (k, v with Hkv heads, query head h reading kv head ``h // (H / Hkv)``): states
  per query head read their group's k, v (``KV_GROUP`` query heads per kv head); states shared by
  a group (``STATE_GROUP`` query heads per state) are updated once per token, after which each
  of the group's query heads reads it for its output.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import launcher
from .config import cdiv, choose_decode, next_power_of_2
from .stages import _block_and_head, _head


@triton.jit(do_not_specialize=["T", "NUM_SLOTS"])
def _decode_step_kernel(
    Q, K, V, O, STATE, DECAY,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_sb, stride_sh, stride_sk, stride_sv,
    T, H, DK, DV, scale,
    HAS_DECAY: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    SLOTS=None, stride_slot=1, NUM_SLOTS=0,
    KV_GROUP: tl.constexpr = 1, STATE_GROUP: tl.constexpr = 1,
    SEQUENCES=None, SHORT_ROWS: tl.constexpr = 0, DECAY_GROUP: tl.constexpr = 1,
):
    """H is the number of state heads; state head s belongs to query heads ``s * STATE_GROUP``
    onwards and reads kv head ``s // KV_GROUP`` and decay ``s * DECAY_GROUP``.

    ``SEQUENCES`` (packed sequences, ``launch._packed_plan``'s sequence table): q, k, v and the
    output hold them back to back in batch entry 0, and b is the sequence: its length is T and its
    first row where its tokens start; a sequence without rows or longer than ``SHORT_ROWS`` is
    the tiled kernels' and its programs return at once. (Constants: the dense launch compiles to
    the code it had without them.)"""
    pid_v, bh = _block_and_head(DV, BLOCK_V)
    scale = tl.cast(scale, tl.float32)  # a float argument may arrive as fp64 (Inductor)
    b = bh // H
    h = bh % H
    batch = b
    first_row = 0
    if SEQUENCES is not None:
        T = tl.load(SEQUENCES + 5 * b + 3)
        if (T == 0) | (T > SHORT_ROWS):
            return
        first_row = tl.load(SEQUENCES + 5 * b + 4).to(tl.int64)
        batch = 0
    cols_k = tl.arange(0, BLOCK_K)
    cols_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    valid_k = cols_k < DK
    valid_v = cols_v < DV
    read_k = valid_k
    read_v = valid_v
    slot = b
    if SLOTS is not None:
        slot = tl.load(SLOTS + b * stride_slot).to(tl.int64)
        # padding (or a slot past the pool): nothing loaded, so the state stays zero and so do the
        # outputs (even for NaN inputs), and the masked store writes nothing
        in_pool = (slot >= 0) & (slot < NUM_SLOTS)
        read_k = cols_k < tl.where(in_pool, DK, 0)
        read_v = cols_v < tl.where(in_pool, DV, 0)
        slot = tl.where(in_pool, slot, 0)
    tile_mask = read_k[:, None] & read_v[None, :]
    state_ptrs = _head(STATE, slot, h, stride_sb, stride_sh) + cols_k[:, None] * stride_sk + cols_v[None, :] * stride_sv
    state = tl.load(state_ptrs, mask=tile_mask, other=0.0)
    if HAS_DECAY:
        lam = tl.exp(-tl.load(DECAY + h * DECAY_GROUP).to(tl.float32))
    q_ptr = _head(Q, batch, h * STATE_GROUP, stride_qb, stride_qh) + first_row * stride_qt + cols_k * stride_qd
    k_ptr = _head(K, batch, h // KV_GROUP, stride_kb, stride_kh) + first_row * stride_kt + cols_k * stride_kd
    v_ptr = _head(V, batch, h // KV_GROUP, stride_vb, stride_vh) + first_row * stride_vt + cols_v * stride_vd
    o_ptr = _head(O, batch, h * STATE_GROUP, stride_ob, stride_oh) + first_row * stride_ot + cols_v * stride_od
    for t in range(0, T):
        q = tl.load(q_ptr + t * stride_qt, mask=read_k, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + t * stride_kt, mask=read_k, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t * stride_vt, mask=read_v, other=0.0).to(tl.float32)
        if HAS_DECAY:
            state = state * lam
        state += k[:, None] * v[None, :]
        out = tl.sum(q[:, None] * state, axis=0) * scale
        tl.store(o_ptr + t * stride_ot, out.to(O.dtype.element_ty), mask=valid_v)
        for g in tl.static_range(1, STATE_GROUP):  # the group's other query heads read the same state
            q = tl.load(q_ptr + g * stride_qh + t * stride_qt, mask=read_k, other=0.0).to(tl.float32)
            out = tl.sum(q[:, None] * state, axis=0) * scale
            tl.store(o_ptr + g * stride_oh + t * stride_ot, out.to(O.dtype.element_ty), mask=valid_v)
    tl.store(state_ptrs, state, mask=tile_mask)


def launch_decode_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, decay: Optional[Tensor], scale: float,
                       state_indices: Optional[Tensor] = None) -> Tensor:
    """``reference.attention_step`` on the decode kernel, for dense, pooled and grouped-head steps
    (inputs validated by ``ops.validate_step``, decay prepared by ``ops.prepare_decay``).

    q ``[B, H, T, Dk]``, k ``[B, Hkv, T, Dk]``, v ``[B, Hkv, T, Dv]``, any strides; ``state``
    float32 ``[B, Hs, Dk, Dv]``, or with ``state_indices`` (int32 / int64 ``[B]``, negative:
    padding) a pool ``[P, Hs, Dk, Dv]``, updated in place; Hs is H or Hkv
    (``reference.state_heads``). Returns ``[B, H, T, Dv]`` in q's dtype, the only allocation."""
    b, h, t, dk = q.shape
    hkv, hs, dv = k.shape[1], state.shape[1], v.shape[3]
    out = torch.empty(b, h, t, dv, dtype=q.dtype, device=q.device)
    if t == 0 or b == 0:
        return out
    block_k = max(16, next_power_of_2(dk))
    block_v, num_warps = choose_decode(b * hs, dv, q.device)
    arguments = (q, k, v, out, state, decay if decay is not None else state,
                 *q.stride(), *k.stride(), *v.stride(), *out.stride(), *state.stride(), t, hs, dk, dv, scale)
    groups = dict(KV_GROUP=hs // hkv, STATE_GROUP=h // hs, num_warps=num_warps)
    slots = {} if state_indices is None else dict(SLOTS=state_indices, stride_slot=state_indices.stride(0),
                                                  NUM_SLOTS=state.shape[0])
    launcher(_decode_step_kernel)[(b * hs * cdiv(dv, block_v),)](
        *arguments, HAS_DECAY=decay is not None, BLOCK_K=block_k, BLOCK_V=block_v, **slots, **groups)
    return out


def launch_short_sequences(q: Tensor, k: Tensor, v: Tensor, out: Tensor, pool: Tensor, decay: Optional[Tensor],
                           scale: float, state_rows: Tensor, sequences: Tensor, short_rows: int) -> None:
    """The packed sequences of 1 to ``short_rows`` rows of a pooled step, each continuing its pool
    row in place (``launch.linear_attention``'s ``state_rows``; the plan left them out). q
    ``[1, H, N, Dk]``, k, v ``[1, Hkv, N, .]``, out ``[1, H, N, Dv]`` (their rows written here),
    ``pool`` ``[P, Hs, Dk, Dv]``, ``decay`` one rate per query head or None, ``sequences`` the
    plan's sequence table (``[S, 5]``)."""
    h, dk = q.shape[1], q.shape[3]
    hkv, hs, dv = k.shape[1], pool.shape[1], v.shape[3]
    num_sequences = sequences.shape[0]
    block_k = max(16, next_power_of_2(dk))
    block_v, num_warps = choose_decode(num_sequences * hs, dv, q.device)
    launcher(_decode_step_kernel)[(num_sequences * hs * cdiv(dv, block_v),)](
        q, k, v, out, pool, decay if decay is not None else pool,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *pool.stride(), 1, hs, dk, dv, scale,
        HAS_DECAY=decay is not None, BLOCK_K=block_k, BLOCK_V=block_v, SLOTS=state_rows,
        stride_slot=state_rows.stride(0), NUM_SLOTS=pool.shape[0], KV_GROUP=hs // hkv, STATE_GROUP=h // hs,
        SEQUENCES=sequences, SHORT_ROWS=short_rows, DECAY_GROUP=h // hs, num_warps=num_warps)
