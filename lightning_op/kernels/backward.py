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

from .stages import (_block_and_head, _chunk_mask, _chunk_rows, _chunk_scores, _dot, _head, _load_rows,
                     _mask_scores, _packed_segment, _segment_chunk, _segment_start_state, _store_rows, _store_state,
                     _update_state)


@triton.jit(do_not_specialize=["N"])
def _key_value_grad_kernel(
    Q, K, V, DO, DK, DV, DECAY, INIT, SEG_STATES, FINAL, SEGMENTS,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_ib, stride_ih, stride_ik, stride_iv,
    stride_fb, stride_fh, stride_fk, stride_fv,
    N, H, D_K, D_V, segment_len, num_segments, num_slots, split, scale,
    q_group, k_group, v_group, do_group, init_group,
    HAS_DECAY: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, STATE_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    STATE_PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr, VARLEN: tl.constexpr = False,
):
    """dk and dv of one segment (all value columns), walking its chunks from the sequence's end.
    ``ACCUMULATE`` as in ``chunked._chunk_output_kernel`` (here for dk and dv; scale is folded into
    the mask in both forms). Without it, dk's chunk scores ``(v do^T) * M`` are computed after dv
    is stored, not beside dv's: fewer float32 tiles live at once, which on sm_90 at D = 128 halves
    the loop's spills (``benchmarks/registers.py``: 1169 -> 1075 instructions, 102 -> 50 local
    accesses) and is faster (benchmarks/RESULTS.md). The state update adds its product to the
    decayed state rather than accumulating onto it in place, in both forms: the in-place update
    never won here, and lost at D = 64 (benchmarks/NOTES.md). ``VARLEN``
    (packed sequences): as in ``chunked._chunk_output_kernel``, each segment lies in one sequence
    and walks it from the sequence's end; dS_0 is stored per sequence."""
    _, bh = _block_and_head(D_V, BLOCK_V)
    scale = tl.cast(scale, tl.float32)  # a float argument may arrive as fp64 (Inductor)
    seg = tl.program_id(1)
    if VARLEN:  # seg becomes the segment's index in its sequence, N the sequence's length
        sequence, first_row, N, seg, slot = _packed_segment(SEGMENTS, seg)
        if sequence < 0:
            return
    b = bh // H
    h = bh % H
    q_ptr = _head(Q, b, h // q_group, stride_qb, stride_qh)
    k_ptr = _head(K, b, h // k_group, stride_kb, stride_kh)
    v_ptr = _head(V, b, h // v_group, stride_vb, stride_vh)
    do_ptr = _head(DO, b, h // do_group, stride_ob, stride_oh)
    dk_ptr = _head(DK, b, h, stride_dkb, stride_dkh)
    dv_ptr = _head(DV, b, h, stride_dvb, stride_dvh)
    if VARLEN:  # the sequence's rows
        q_ptr += first_row * stride_qn
        k_ptr += first_row * stride_kn
        v_ptr += first_row * stride_vn
        do_ptr += first_row * stride_on
        dk_ptr += first_row * stride_dkn
        dv_ptr += first_row * stride_dvn
    cols_k = tl.arange(0, BLOCK_K)
    cols_v = tl.arange(0, BLOCK_V)
    valid_k = cols_k < D_K
    valid_v = cols_v < D_V
    tile_mask = valid_k[:, None] & valid_v[None, :]
    idx = tl.arange(0, CHUNK)
    causal = idx[:, None] >= idx[None, :]
    log2_lam, mask = _chunk_mask(DECAY, h, causal, idx[:, None], idx[None, :], scale, 1.0, HAS_DECAY)

    # dS at the segment's first visited row: grad_final_state enters unshifted (the gradients'
    # init_shift 0); later segments start from the scan's state, one step further on.
    if VARLEN:  # the sequence's grad_final_state (batch entry `sequence`), the start slot of the table
        init_offset = sequence * stride_ib + (h // init_group) * stride_ih
        slot = (bh * num_slots + slot) * D_K * D_V
    else:
        init_offset = b * stride_ib + (h // init_group) * stride_ih
        slot = (bh * num_slots + seg * split - 1) * D_K * D_V
    state = _segment_start_state(
        INIT, init_offset, stride_ik, stride_iv,
        SEG_STATES, slot, seg, cols_k, cols_v, tile_mask,
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

        if not ACCUMULATE:
            kq = _chunk_scores(k, q, mask, scale, 1.0, HAS_DECAY, DOT_DTYPE, PRECISION)
        else:  # both products before both masks: the order the H200 timings were taken with
            kq = _dot(k, tl.trans(q), DOT_DTYPE, PRECISION)
            vdo = _dot(v, tl.trans(do), DOT_DTYPE, PRECISION)
            kq = _mask_scores(kq, mask, scale, 1.0, HAS_DECAY)
            vdo = _mask_scores(vdo, mask, scale, 1.0, HAS_DECAY)
        # dv = k dS and dk = v dS^T, each the state's share plus the chunk's own, as the forward's
        # output rows with out_scale 1 (scale sits in the mask and the state)
        dv = _chunk_rows(k, state, kq, do, log2_lam, idx, shift, 1.0, HAS_DECAY, ACCUMULATE, False, CHUNK,
                         DOT_DTYPE, PRECISION, STATE_DOT_DTYPE, STATE_PRECISION)
        _store_rows(dv_ptr, stride_dvn, stride_dvd, dv, rows, row_valid, cols_v, valid_v, N, True)
        if not ACCUMULATE:  # dk's scores once dv is stored: fewer float32 tiles live
            vdo = _chunk_scores(v, do, mask, scale, 1.0, HAS_DECAY, DOT_DTYPE, PRECISION)
        dk = _chunk_rows(v, state, vdo, q, log2_lam, idx, shift, 1.0, HAS_DECAY, ACCUMULATE, True, CHUNK,
                         DOT_DTYPE, PRECISION, STATE_DOT_DTYPE, STATE_PRECISION)
        _store_rows(dk_ptr, stride_dkn, stride_dkd, dk, rows, row_valid, cols_k, valid_k, N, True)
        # dS <- lam^(length-1+shift) dS + scale sum_i lam^(length-1-i) q_i^T do_i
        state = _update_state(state, q, do, log2_lam, idx, length, shift, scale, HAS_DECAY, False,
                              DOT_DTYPE, PRECISION)

    if STORE_FINAL:
        if VARLEN:  # the segment that reaches the sequence's first row
            last = seg_begin + segment_len >= N
            final_batch = sequence
        else:
            last = seg == num_segments - 1
            final_batch = b
        if last:
            _store_state(_head(FINAL, final_batch, h, stride_fb, stride_fh), stride_fk, stride_fv, state, cols_k,
                         cols_v, tile_mask)
