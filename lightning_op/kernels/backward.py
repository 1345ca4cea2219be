"""The fused key/value backward: ``dk`` and ``dv`` in one pass backward in time.

Both gradients are driven by the same state (``reference.key_value_gradients_chunked``)::

    dS_t = lam dS_{t+1} + scale q_t^T do_t       (dS_{N-1} also receives grad_final_state)
    dk_t = dS_t^T v_t  ->  scale * ((v do^T) * M) q  +  lam^(i+shift) v dS^T    within a chunk
    dv_t = k_t dS_t    ->  scale * ((k q^T) * M) do  +  lam^(i+shift) k dS

so one program carries one ``Dk x Dv`` state and reads q, k, v, do once per chunk, where the two
separate linear attentions each carried a copy of the state and read three tensors each. ``dk``
sums over all value columns, so a program holds the whole value width (``BLOCK_V >= Dv``); larger
heads take the two-pass composition instead. Rows are addressed from the end (position
``N - 1 - row``), as in ``chunked.py`` with ``REVERSE``; segments and their start states come from
``chunked._segment_state_kernel`` / ``_segment_scan_kernel`` with key q and value do.
"""

import triton
import triton.language as tl

from .chunked import (_block_and_head, _dot, _dot_acc, _intra_chunk_decay, _load_rows, _segment_chunk,
                      _segment_start_state)


@triton.jit
def _store_rows(ptr, stride_n, stride_d, tile, rows, row_valid, cols, col_valid, N):
    """Store a [rows, cols] tile at positions N - 1 - rows (reverse addressing)."""
    positions = N - 1 - rows
    offsets = positions.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d
    tl.store(ptr + offsets, tile.to(ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


@triton.jit
def _masked_scores(a, b, mask, scale, HAS_DECAY: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``(a b^T) * M``, scale folded in: ``mask`` is the decay mask times scale, or without decay
    the causal pattern."""
    scores = _dot(a, tl.trans(b), DOT_DTYPE, PRECISION)
    if HAS_DECAY:
        return scores * mask
    return tl.where(mask, scores * scale, 0.0)


@triton.jit(do_not_specialize=["N"])
def _key_value_grad_kernel(
    Q, K, V, DO, DK, DV, DECAY, INIT, SEG_STATES, FINAL,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_ib, stride_ih, stride_ik, stride_iv,
    stride_fb, stride_fh, stride_fk, stride_fv,
    N, H, D_K, D_V, segment_len, num_segments, num_slots, split, scale,
    HAS_DECAY: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, STATE_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    STATE_PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr, UPDATE_ACCUMULATE: tl.constexpr = False,
    LATE_DK_SCORES: tl.constexpr = False,
):
    """dk and dv of one segment (all value columns), walking its chunks from the sequence's end.
    ``ACCUMULATE`` and ``UPDATE_ACCUMULATE`` as in ``chunked._chunk_output_kernel`` (here for dk
    and dv; scale is folded into the mask in both forms). ``LATE_DK_SCORES`` (the other form only):
    dk's chunk scores ``(v do^T) * M`` are computed after dv is stored instead of beside dv's; on
    sm_90 at D = 128 that halves the loop's spills (``benchmarks/registers.py``: 1169 -> 1075
    instructions, 102 -> 50 local accesses); on the H200 4.8% faster forward+backward at the main
    shape (RESULTS.md, 2026-12-02), the default for keys up to 128 wide."""
    _, bh = _block_and_head(D_V, BLOCK_V)
    scale = tl.cast(scale, tl.float32)  # a float argument may arrive as fp64 (Inductor)
    seg = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_ptr = Q + b * stride_qb + h * stride_qh
    k_ptr = K + b * stride_kb + h * stride_kh
    v_ptr = V + b * stride_vb + h * stride_vh
    do_ptr = DO + b * stride_ob + h * stride_oh
    dk_ptr = DK + b * stride_dkb + h * stride_dkh
    dv_ptr = DV + b * stride_dvb + h * stride_dvh
    cols_k = tl.arange(0, BLOCK_K)
    cols_v = tl.arange(0, BLOCK_V)
    valid_k = cols_k < D_K
    valid_v = cols_v < D_V
    tile_mask = valid_k[:, None] & valid_v[None, :]
    idx = tl.arange(0, CHUNK)
    causal = idx[:, None] >= idx[None, :]
    if HAS_DECAY:
        log2_lam, intra_mask = _intra_chunk_decay(DECAY, h, idx, causal)
        intra_mask = intra_mask * scale

    # dS at the segment's first visited row: grad_final_state enters unshifted (the gradients'
    # init_shift 0); later segments start from the scan's state, one step further on.
    state = _segment_start_state(
        INIT, b * stride_ib + h * stride_ih, stride_ik, stride_iv,
        SEG_STATES, (bh * num_slots + seg * split - 1) * D_K * D_V, seg, cols_k, cols_v, tile_mask,
        D_V, 1, HAS_INIT, BLOCK_K, BLOCK_V,
    )
    first_shift = tl.where(seg == 0, 0, 1)

    seg_begin = seg * segment_len
    seg_end = tl.minimum(seg_begin + segment_len, N)
    for start in range(seg_begin, seg_end, CHUNK):
        rows, row_valid, length, shift = _segment_chunk(start, seg_begin, seg_end, first_shift, idx, CHUNK)
        q = _load_rows(q_ptr, stride_qn, stride_qd, rows, row_valid, cols_k, valid_k, N, True)
        k = _load_rows(k_ptr, stride_kn, stride_kd, rows, row_valid, cols_k, valid_k, N, True)
        v = _load_rows(v_ptr, stride_vn, stride_vd, rows, row_valid, cols_v, valid_v, N, True)
        do = _load_rows(do_ptr, stride_on, stride_od, rows, row_valid, cols_v, valid_v, N, True)

        if LATE_DK_SCORES and not ACCUMULATE:
            kq = _masked_scores(k, q, intra_mask if HAS_DECAY else causal, scale, HAS_DECAY, DOT_DTYPE, PRECISION)
        else:  # both products before both masks: the order the H200 timings were taken with
            kq = _dot(k, tl.trans(q), DOT_DTYPE, PRECISION)
            vdo = _dot(v, tl.trans(do), DOT_DTYPE, PRECISION)
            if HAS_DECAY:
                kq = kq * intra_mask
                vdo = vdo * intra_mask
            else:
                kq = tl.where(causal, kq * scale, 0.0)
                vdo = tl.where(causal, vdo * scale, 0.0)
        # the state's shares carry the row weight lam^(i+shift), applied to the products
        if ACCUMULATE:  # each gradient's chunk share accumulates onto its state share, one at a time
            dv = _dot(k, state, STATE_DOT_DTYPE, STATE_PRECISION)
            if HAS_DECAY:
                row_weight = tl.exp2(log2_lam * (idx + shift).to(tl.float32))[:, None]
                dv = dv * row_weight
            dv = _dot_acc(dv, kq, do, DOT_DTYPE, PRECISION)
            _store_rows(dv_ptr, stride_dvn, stride_dvd, dv, rows, row_valid, cols_v, valid_v, N)
            dk = _dot(v, tl.trans(state), STATE_DOT_DTYPE, STATE_PRECISION)
            if HAS_DECAY:
                dk = dk * row_weight
            dk = _dot_acc(dk, vdo, q, DOT_DTYPE, PRECISION)
        else:
            # each gradient's two shares combined by one fused multiply-add (the forward's reason:
            # a plain sum becomes an accumulating dot, which spills)
            dv_intra = _dot(kq, do, DOT_DTYPE, PRECISION)
            dv_inter = _dot(k, state, STATE_DOT_DTYPE, STATE_PRECISION)
            if HAS_DECAY:
                row_weight = tl.exp2(log2_lam * (idx + shift).to(tl.float32))
            else:
                row_weight = tl.full([CHUNK], 1.0, tl.float32)
            dv = tl.fma(dv_inter, row_weight[:, None], dv_intra)
            _store_rows(dv_ptr, stride_dvn, stride_dvd, dv, rows, row_valid, cols_v, valid_v, N)
            if LATE_DK_SCORES:  # dk's scores only once dv is stored: fewer float32 tiles live at once
                vdo = _masked_scores(v, do, intra_mask if HAS_DECAY else causal, scale, HAS_DECAY, DOT_DTYPE,
                                     PRECISION)
            dk_intra = _dot(vdo, q, DOT_DTYPE, PRECISION)
            dk_inter = _dot(v, tl.trans(state), STATE_DOT_DTYPE, STATE_PRECISION)
            dk = tl.fma(dk_inter, row_weight[:, None], dk_intra)
        _store_rows(dk_ptr, stride_dkn, stride_dkd, dk, rows, row_valid, cols_k, valid_k, N)

        # q's row weights lam^(length-1-i); in place (UPDATE_ACCUMULATE) they also carry scale
        if HAS_DECAY:
            q_weight = tl.exp2(log2_lam * tl.maximum(length - 1 - idx, 0).to(tl.float32))
            if UPDATE_ACCUMULATE:
                q_weight = q_weight * scale
            q = q * q_weight[:, None]
            state = state * tl.exp2(log2_lam * (length - 1 + shift).to(tl.float32))
        elif UPDATE_ACCUMULATE:
            q = q * scale
        if UPDATE_ACCUMULATE:
            state = _dot_acc(state, tl.trans(q), do, DOT_DTYPE, PRECISION)
        else:
            state += _dot(tl.trans(q), do, DOT_DTYPE, PRECISION) * scale

    if STORE_FINAL:
        if seg == num_segments - 1:
            final_ptr = FINAL + b * stride_fb + h * stride_fh
            tl.store(final_ptr + cols_k[:, None] * stride_fk + cols_v[None, :] * stride_fv, state, mask=tile_mask)
