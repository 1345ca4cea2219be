"""States at the block boundaries of each sequence, and from them the final state without the
outputs (``launch.final_state``, which context parallelism exchanges).

Blocks are counted from each sequence's start in both directions: block m holds rows
``m * block .. min((m + 1) * block, n) - 1`` of a sequence of n rows. Entry m is

- forward: the state entering row ``m * block``, the one that row's key and value are added to:
  ``lam * S_(m*block - 1)`` (zero for m = 0);
- ``REVERSE`` (the recurrence run from the sequence's end): the state after visiting rows n - 1
  down to ``m * block``, that row included.

Two passes, as the segment states of ``chunked.py``: each block's own contribution, all blocks in
parallel (``_block_state_kernel``), then per sequence a scan over its blocks that turns them into
the entries in place (``_block_scan_kernel``). Decay factors are ``lam^e`` with ``e >= 0`` only.
Dense batches, each walk from a zero state (what ``final_state`` needs).
"""

import triton
import triton.language as tl

from .stages import _block_and_head, _dot_acc, _head, _load_rows, _log2_decay, _store_state, _weighted_rows


@triton.jit(do_not_specialize=["N"])
def _block_state_kernel(
    K, V, DECAY, OUT,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    N, H, DK, DV, block, num_entries, value_scale, k_group, v_group,
    HAS_DECAY: tl.constexpr, REVERSE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Block ``entry``'s own contribution ``value_scale * sum_s lam^e_s key_s^T value_s`` with
    ``e_s`` the steps from row s to the block's last visited row (its last row forward, its first
    ``REVERSE``), stored at OUT's entry."""
    m = tl.program_id(1)
    pid_v, bh = _block_and_head(DV, BLOCK_V)
    cols_k = tl.arange(0, BLOCK_K)
    cols_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    valid_k = cols_k < DK
    valid_v = cols_v < DV
    out_ptr = OUT + (bh * num_entries + m) * DK * DV
    state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    value_scale = tl.cast(value_scale, tl.float32)
    b = bh // H
    h = bh % H
    k_ptr = _head(K, b, h // k_group, stride_kb, stride_kh)
    v_ptr = _head(V, b, h // v_group, stride_vb, stride_vh)
    idx = tl.arange(0, CHUNK)
    log2_lam = 0.0
    if HAS_DECAY:
        log2_lam = _log2_decay(DECAY, h)
    begin = m * block
    end = tl.minimum(begin + block, N)
    for start in range(begin, end, CHUNK):
        rows = start + idx
        # a key's steps to the block's last visited row (rows past the end are zero)
        if REVERSE:
            steps = rows - begin
        else:
            steps = tl.maximum(end - 1 - rows, 0)
        k = _load_rows(k_ptr, stride_kn, stride_kd, rows, rows < end, cols_k, valid_k, N, False)
        v = _load_rows(v_ptr, stride_vn, stride_vd, rows, rows < end, cols_v, valid_v, N, False)
        k = _weighted_rows(k, log2_lam, steps, value_scale, HAS_DECAY)
        state = _dot_acc(state, tl.trans(k), v, DOT_DTYPE, PRECISION)
    _store_state(out_ptr, DV, 1, state, cols_k, cols_v, valid_k[:, None] & valid_v[None, :])


@triton.jit(do_not_specialize=["N"])
def _block_scan_kernel(
    DECAY, OUT, N, H, DK, DV, block, num_entries,
    HAS_DECAY: tl.constexpr, REVERSE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    STORE_END: tl.constexpr = False,
):
    """In place, per batch entry and head (``ceil(N / block)`` entries): each block's own state
    becomes its entry (forward ``E_(m+1) = lam^rows_m E_m + lam own_m``; reverse ``R_m =
    lam^rows_m R_(m+1) + own_m``, the last block's ``R = own``). ``STORE_END`` (forward):
    entry ``count`` also receives the final state ``S_(N-1) = lam^(rows - 1) E_last + own_last``
    (no division by lam: exact for vanishing decays)."""
    pid_v, bh = _block_and_head(DV, BLOCK_V)
    h = bh % H
    length = N
    count = tl.cdiv(N, block)
    cols_k = tl.arange(0, BLOCK_K)
    cols_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    tile_mask = (cols_k < DK)[:, None] & (cols_v < DV)[None, :]
    state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    log2_lam = 0.0
    if HAS_DECAY:
        log2_lam = _log2_decay(DECAY, h)
    entry_ptr = OUT + bh * num_entries * DK * DV + cols_k[:, None] * DV + cols_v[None, :]
    if REVERSE:
        for i in range(count):
            m = count - 1 - i
            rows = tl.minimum(block, length - m * block)
            own = tl.load(entry_ptr + m * DK * DV, mask=tile_mask, other=0.0)
            if HAS_DECAY:  # the state carried from block m + 1 decays over block m's rows
                state = state * tl.exp2(log2_lam * rows.to(tl.float32))
            state = state + own
            tl.store(entry_ptr + m * DK * DV, state, mask=tile_mask)
    else:
        for m in range(count):
            rows = tl.minimum(block, length - m * block)
            own = tl.load(entry_ptr + m * DK * DV, mask=tile_mask, other=0.0)
            tl.store(entry_ptr + m * DK * DV, state, mask=tile_mask)
            if STORE_END:
                if m == count - 1:
                    if HAS_DECAY:
                        end = state * tl.exp2(log2_lam * (rows - 1).to(tl.float32)) + own
                    else:
                        end = state + own
                    tl.store(entry_ptr + count * DK * DV, end, mask=tile_mask)
            if HAS_DECAY:  # E_(m+1) = lam (lam^(rows-1) E_m + own_m), every exponent >= 0
                lam = tl.exp2(log2_lam)
                state = state * tl.exp2(log2_lam * rows.to(tl.float32)) + own * lam
            else:
                state = state + own
