"""Triton kernels of context parallelism: the combine steps (forward: a rank's initial state and
the whole sequence's final state from the all-gathered states; backward: the gradient reaching the
state a rank's tokens leave, and the initial state's share), each one launch, and the state a
rank's tokens leave, summed from the segment-state pass's own states.

``distributed.py`` gathers, from each rank j of W, the state ``L_j`` its tokens leave from a zero
start and its length ``n_j`` (two floats, ``n_j // 2^24`` and ``n_j % 2^24``). With ``P_j`` the
tokens before rank j and N the total, rank r needs::

    S_r     = lam^P_r S_0 + sum_{j<r} lam^(P_r - P_{j+1}) L_j
    S_final = lam^N   S_0 + sum_j     lam^(N - P_{j+1})   L_j

Composed from PyTorch ops these are some twenty small kernels (the lengths decoded, their sums,
the exponents, the powers, two weighted sums, the initial state's terms), which the host launches
one by one; here each program reads its block of every rank's state once and writes both sums.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import launcher
from .config import cdiv
from .stages import _log2_decay

#: state elements per program
BLOCK = 1024


@triton.jit
def _power(log2_lam, exponent, HAS_DECAY: tl.constexpr):
    """``lam^exponent`` (1 for a zero exponent, also where lam = 0)."""
    if HAS_DECAY:
        return tl.exp2(tl.where(exponent == 0, 0.0, log2_lam * exponent.to(tl.float32)))
    return 1.0


@triton.jit
def _log2_rate(DECAY, h, HAS_DECAY: tl.constexpr):
    """log2(lam) of head h (0: no decay)."""
    if HAS_DECAY:
        return _log2_decay(DECAY, h)
    return 0.0


@triton.jit
def _length(code, length_base):
    """A rank's length from its two floats (``n // length_base``, ``n % length_base``), exact."""
    return tl.load(code).to(tl.int64) * length_base + tl.load(code + 1).to(tl.int64)


@triton.jit
def _rank_bounds(CODES, stride_code, world, rank, length_base):
    """``(P_r, P_{r+1}, N)``: the tokens before rank ``rank``, before the next one, and in all,
    from each rank's length code (rank j's at ``CODES + j * stride_code``)."""
    before = tl.cast(0, tl.int64)
    after = tl.cast(0, tl.int64)
    total = tl.cast(0, tl.int64)
    for j in range(0, world):
        length = _length(CODES + j * stride_code, length_base)
        before += tl.where(j < rank, length, 0)
        after += tl.where(j <= rank, length, 0)
        total += length
    return before, after, total


@triton.jit
def _rank_states_kernel(
    GATHERED, DECAY, INIT, START, FINAL,
    stride_ib, stride_ih, stride_ik, stride_iv,
    world, rank, row_len, HS, DK, DV, length_base,
    HAS_DECAY: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK: tl.constexpr,
):
    """One block of ``BLOCK`` elements of one (batch, state head)'s Dk x Dv state (grid: batch *
    heads, blocks). ``GATHERED``: float32 ``[world, row_len]``, each row a rank's flat state
    ``[B, Hs, Dk, Dv]`` then its two length floats."""
    bh = tl.program_id(0)
    h = bh % HS
    dkv = DK * DV
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < dkv
    row_len64 = row_len.to(tl.int64)  # world * row_len may pass 2^31
    codes = GATHERED + row_len - 2
    before, _, total = _rank_bounds(codes, row_len64, world, rank, length_base)
    log2_lam = _log2_rate(DECAY, h, HAS_DECAY)
    start = tl.zeros([BLOCK], dtype=tl.float32)
    final = tl.zeros([BLOCK], dtype=tl.float32)
    ends = tl.cast(0, tl.int64)  # P_{j+1}
    for j in range(0, world):
        ends += _length(codes + j * row_len64, length_base)
        state = tl.load(GATHERED + j * row_len64 + bh * dkv + offs, mask=valid, other=0.0)
        final += _power(log2_lam, total - ends, HAS_DECAY) * state
        if j < rank:
            start += _power(log2_lam, before - ends, HAS_DECAY) * state
    if HAS_INIT:
        b = bh // HS
        rows, cols = offs // DV, offs % DV
        init = tl.load(INIT + b * stride_ib + h * stride_ih + rows * stride_ik + cols * stride_iv, mask=valid,
                       other=0.0).to(tl.float32)
        start += _power(log2_lam, before, HAS_DECAY) * init
        final += _power(log2_lam, total, HAS_DECAY) * init
    tl.store(START + bh * dkv + offs, start, mask=valid)
    tl.store(FINAL + bh * dkv + offs, final, mask=valid)


def rank_states(gathered: Tensor, decay: Optional[Tensor], initial_state: Optional[Tensor], rank: int,
                shape: tuple, length_base: int) -> tuple[Tensor, Tensor]:
    """``(S_r, S_final)``, float32 of ``shape`` ``[B, Hs, Dk, Dv]``, from ``gathered`` (float32
    ``[W, B * Hs * Dk * Dv + 2]``, contiguous: each rank's flat state, then its length as
    ``n // length_base`` and ``n % length_base``), ``decay`` (``[Hs]`` rates, lam = exp(-decay), or
    None) and the whole sequence's ``initial_state`` (``[B, Hs, Dk, Dv]``, any strides and dtype,
    or None)."""
    b, hs, dk, dv = shape
    start = torch.empty(shape, dtype=torch.float32, device=gathered.device)
    final = torch.empty(shape, dtype=torch.float32, device=gathered.device)
    has_decay, has_init = decay is not None, initial_state is not None
    init_strides = initial_state.stride() if has_init else (0, 0, 0, 0)
    launcher(_rank_states_kernel)[(b * hs, cdiv(dk * dv, BLOCK))](
        gathered, decay if has_decay else gathered, initial_state if has_init else gathered, start, final,
        *init_strides, gathered.shape[0], rank, gathered.shape[1], hs, dk, dv, length_base,
        HAS_DECAY=has_decay, HAS_INIT=has_init, BLOCK=BLOCK, num_warps=4,
    )
    return start, final


@triton.jit
def _leaving_state_kernel(
    SEG_STATES, TAIL, DECAY, OUT, stride_tb, stride_th, pieces, num_slots, piece_len, N, H, tail_group, DKV,
    HAS_DECAY: tl.constexpr, BLOCK: tl.constexpr,
):
    """One block of ``BLOCK`` elements of one (batch, head)'s state the rows leave from a zero
    start: ``TAIL`` (the last segment's rows' state, head ``h // tail_group``; each head's Dk x Dv
    contiguous) plus each piece's own state (``SEG_STATES`` slot g: rows ``g * piece_len`` onwards)
    decayed over the rows after it, ``lam^(N - (g + 1) * piece_len)``."""
    bh = tl.program_id(0)
    h = bh % H
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < DKV
    log2_lam = _log2_rate(DECAY, h, HAS_DECAY)
    tail = TAIL + (bh // H).to(tl.int64) * stride_tb + (h // tail_group) * stride_th
    state = tl.load(tail + offs, mask=valid, other=0.0)
    slots = SEG_STATES + bh.to(tl.int64) * num_slots * DKV + offs
    for g in range(0, pieces):
        own = tl.load(slots + g * DKV, mask=valid, other=0.0)
        state += _power(log2_lam, N - (g + 1) * piece_len, HAS_DECAY) * own
    tl.store(OUT + bh * DKV + offs, state, mask=valid)


def leaving_state(seg_states: Tensor, tail: Tensor, decay: Optional[Tensor], pieces: int, piece_len: int,
                  n: int, batch: int, heads: int) -> Tensor:
    """float32 ``[B, H, Dk, Dv]``: ``tail`` (``[B, Ht, Dk, Dv]``, Ht dividing H, each head's state
    contiguous) plus the first
    ``pieces`` slots of ``seg_states`` (``[B * H, slots, Dk, Dv]``, each piece's own state, rows
    ``g * piece_len`` onwards) decayed to the end of ``n`` rows (``launch._leaving_state``)."""
    dk, dv = seg_states.shape[2], seg_states.shape[3]
    out = torch.empty(batch, heads, dk, dv, dtype=torch.float32, device=seg_states.device)
    launcher(_leaving_state_kernel)[(batch * heads, cdiv(dk * dv, BLOCK))](
        seg_states, tail, decay if decay is not None else seg_states, out, tail.stride(0), tail.stride(1), pieces,
        seg_states.shape[1], piece_len,
        n, heads, heads // tail.shape[1], dk * dv, HAS_DECAY=decay is not None, BLOCK=BLOCK, num_warps=4,
    )
    return out


@triton.jit
def _rank_gradients_kernel(
    GATHERED, CODES, DECAY, LEAVING, D_INIT,
    stride_code, world, rank, HS, DKV, length_base,
    HAS_DECAY: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK: tl.constexpr,
):
    """One block of one (batch, state head)'s state gradients. ``GATHERED``: float32
    ``[world, 2, B * Hs * Dk * Dv]``, each rank's ``G_j`` then its share ``g_j`` of the final
    state's gradient; ``CODES``: each rank's length as two floats (row stride ``stride_code``)."""
    bh = tl.program_id(0)
    h = bh % HS
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < DKV
    numel = tl.num_programs(0).to(tl.int64) * DKV
    before, after, total = _rank_bounds(CODES, stride_code, world, rank, length_base)
    log2_lam = _log2_rate(DECAY, h, HAS_DECAY)
    shares = tl.zeros([BLOCK], dtype=tl.float32)
    leaving = tl.zeros([BLOCK], dtype=tl.float32)
    starts = tl.cast(0, tl.int64)  # P_j
    for j in range(0, world):
        row = GATHERED + j * 2 * numel + bh * DKV + offs
        shares += tl.load(row + numel, mask=valid, other=0.0)
        if j > rank:
            leaving += _power(log2_lam, starts - after, HAS_DECAY) * tl.load(row, mask=valid, other=0.0)
        starts += _length(CODES + j * stride_code, length_base)
    leaving += _power(log2_lam, total - after, HAS_DECAY) * shares
    tl.store(LEAVING + bh * DKV + offs, leaving, mask=valid)
    if HAS_INIT:
        mine = GATHERED + rank * 2 * numel + bh * DKV + offs
        d_init = (_power(log2_lam, before, HAS_DECAY) * tl.load(mine, mask=valid, other=0.0)
                  + _power(log2_lam, total, HAS_DECAY) * tl.load(mine + numel, mask=valid, other=0.0))
        tl.store(D_INIT + bh * DKV + offs, d_init, mask=valid)


def rank_state_gradients(gathered: Tensor, codes: Tensor, decay: Optional[Tensor], rank: int, shape: tuple,
                         length_base: int, with_initial: bool) -> tuple[Tensor, Optional[Tensor]]:
    """The backward's combine step: ``(dL_r, d S_0's share or None)``, float32 of ``shape``
    ``[B, Hs, Dk, Dv]``, from ``gathered`` (float32 ``[W, 2, *shape]``, contiguous: each rank's
    ``G_j`` and ``g_j``), ``codes`` (``[W, 2]``, each rank's length as ``n // length_base`` and
    ``n % length_base``) and ``decay`` (``[Hs]`` rates or None)::

        dL_r   = sum_{j>r} lam^(P_j - P_{r+1}) G_j + lam^(N - P_{r+1}) sum_j g_j
        d S_0 <- lam^P_r G_r + lam^N g_r
    """
    b, hs, dk, dv = shape
    leaving = torch.empty(shape, dtype=torch.float32, device=gathered.device)
    d_init = torch.empty(shape, dtype=torch.float32, device=gathered.device) if with_initial else None
    launcher(_rank_gradients_kernel)[(b * hs, cdiv(dk * dv, BLOCK))](
        gathered, codes, decay if decay is not None else gathered, leaving, d_init if with_initial else leaving,
        codes.stride(0), gathered.shape[0], rank, hs, dk * dv, length_base,
        HAS_DECAY=decay is not None, HAS_INIT=with_initial, BLOCK=BLOCK, num_warps=4,
    )
    return leaving, d_init
