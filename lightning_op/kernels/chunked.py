"""Triton kernels of the tiled causal linear attention (Lightning Attention-2).

One kernel family computes :func:`lightning_op.reference.linear_attention_chunked`::

    S_t   = lam * S_prev + key_t^T (value_scale * value_t)      (the first visited position takes
    out_t = out_scale * query_t S_t                              lam^INIT_SHIFT * initial_state)

forward in time, or backward in time when ``REVERSE`` (rows are then addressed from the end:
position = N - 1 - row, nothing is copied). The op's forward and its three gradients are all
instances of it (see ``reference.attention_backward_chunked``).

The sequence is cut into chunks of ``CHUNK`` rows (the paper's blocks) and the chunks into
segments of ``segment_len`` rows. Within a chunk: masked attention ``((Q K^T) * M) V``; across the
chunks of one segment: a Dk x BLOCK_V state carried in registers. Segments run in parallel:

1. ``_segment_state_kernel``: the state each segment (but the last) adds on its own, from zero,
   optionally in ``split`` pieces per segment, so that this pass, which has all but the last
   segment to work on, still spreads over the GPU when batch*heads is small;
2. ``_segment_scan_kernel``: a scan over segments (or pieces) turns those into the state at each
   segment (piece) start; segment ``seg`` starts from slot ``seg * split - 1``;
3. ``_chunk_output_kernel``: one program per (value block, segment, batch*head) walks its chunks
   from the segment's start state, writes the output and, in the last segment, the final state.
   For each chunk: scores, output rows, store, state update (the stages in ``stages.py``).

With one segment (long enough for the chip to be busy with B*H*value blocks alone) steps 1 and 2
vanish and this is the paper's kernel. Memory besides inputs and outputs: one float32 state per
segment boundary, never per chunk or per token, and nothing of size N x N.

Decay factors are always ``lam^e = exp2(log2(lam) * e)`` with ``e >= 0`` relative to a chunk or
segment boundary: they underflow for strong decays, they never overflow.

Grouped heads: a program computes one head h of H (the most heads any input has) and reads head
``h // X_group`` of each input X (``q_group``, ``k_group``, ...: compute heads per head of X, runtime
integers; a launch with equal head counts passes 1, which Triton compiles as a constant).

Packed sequences (``VARLEN``): the rows of batch entry 0 hold several sequences. Each is cut into
segments of its own (rows counted from its start, so chunks never straddle a boundary), listed
in a table built on the device (``launch._packed_plan``); a program looks its segment up, reads
that sequence's rows (``N`` becomes its length, so ``REVERSE`` walks it from its own end) and its
initial and final states at batch index ``sequence``, and the scan runs per sequence. The table's
pointers are None in dense launches, where ``VARLEN`` is off and the code is the dense code.
"""

import triton
import triton.language as tl

from .stages import (_any_non_finite, _any_non_finite_t, _block_and_head, _chunk_mask, _chunk_rows, _chunk_rows_t,
                     _chunk_scores, _chunk_scores_t, _dot, _dot_acc, _exact_scores, _final_at, _finite_values, _head,
                     _key_parts, _load_rows, _log2_decay, _output_program, _packed_piece, _segment_chunk,
                     _segment_start_state, _segment_start_state_t, _start_slot, _store_rows, _store_rows_t,
                     _store_state, _store_state_t, _update_state, _update_state_t, _weighted_rows)


# N is not specialised (its value and divisibility change with every sequence length), so one
# compiled kernel serves all lengths; strides stay specialised for aligned, vectorised loads.
@triton.jit(do_not_specialize=["N"])
def _segment_state_kernel(
    K, V, DECAY, SEG_STATES, PIECES,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    N, H, DK, DV, segment_len, num_segments, value_scale, k_group, v_group,
    HAS_DECAY: tl.constexpr, REVERSE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr,
    VARLEN: tl.constexpr = False,
):
    """Segment ``seg``'s own contribution sum_s lam^(end-s) key_s^T value_s (end = its last row).

    The grid covers every segment, so it is never empty; the last segment's own state is not
    needed (nothing follows it) and its programs return at once. ``VARLEN`` (packed sequences):
    program ``seg`` takes piece ``seg`` of the ``PIECES`` table (a piece of one sequence, rows
    counted from its start, or none: it returns) and stores into slot ``seg``."""
    seg = tl.program_id(1)
    if VARLEN:
        sequence, first_row, N, piece = _packed_piece(PIECES, seg)
        if sequence < 0:
            return
    else:
        if seg == num_segments - 1:
            return
        piece = seg
    pid_v, bh = _block_and_head(DV, BLOCK_V)
    value_scale = tl.cast(value_scale, tl.float32)  # a float argument may arrive as fp64 (Inductor)
    b = bh // H
    h = bh % H
    k_ptr = _head(K, b, h // k_group, stride_kb, stride_kh)
    v_ptr = _head(V, b, h // v_group, stride_vb, stride_vh)
    if VARLEN:  # the sequence's rows
        k_ptr += first_row * stride_kn
        v_ptr += first_row * stride_vn
    cols_k = tl.arange(0, BLOCK_K)
    cols_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    valid_k = cols_k < DK
    valid_v = cols_v < DV
    idx = tl.arange(0, CHUNK)
    log2_lam = 0.0
    if HAS_DECAY:
        log2_lam = _log2_decay(DECAY, h)

    state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    seg_begin = piece * segment_len
    seg_last = seg_begin + segment_len - 1
    for start in range(seg_begin, seg_begin + segment_len, CHUNK):
        rows = start + idx
        row_valid = rows < N
        k = _load_rows(k_ptr, stride_kn, stride_kd, rows, row_valid, cols_k, valid_k, N, REVERSE)
        v = _load_rows(v_ptr, stride_vn, stride_vd, rows, row_valid, cols_v, valid_v, N, REVERSE)
        # segments other than the last are whole chunks
        if ACCUMULATE:
            # each key carries its whole weight to the segment's end, lam^(last-row) (e >= 0:
            # it underflows, never overflows), and value_scale: the state is never rescaled
            k = _weighted_rows(k, log2_lam, seg_last - rows, value_scale, HAS_DECAY)
            state = _dot_acc(state, tl.trans(k), v, DOT_DTYPE, PRECISION)
        else:
            if HAS_DECAY:  # row weight lam^(CHUNK-1-i), the state decayed by a chunk
                weight = tl.exp2(log2_lam * (CHUNK - 1 - idx).to(tl.float32))
                k = k * weight[:, None]
                state = state * tl.exp2(log2_lam * CHUNK)
            state += _dot(tl.trans(k), v, DOT_DTYPE, PRECISION) * value_scale

    _store_state(SEG_STATES + (bh * num_segments + seg) * DK * DV, DV, 1, state, cols_k, cols_v,
                 valid_k[:, None] & valid_v[None, :])


@triton.jit
def _store_plan_entry(entry, sequence, first_row, length, index, taken):
    """The fields a segment's and a piece's plan entries share: sequence, first row, length and
    the entry's index in its sequence (lanes not ``taken`` store nothing)."""
    tl.store(entry, sequence, mask=taken)
    tl.store(entry + 1, first_row, mask=taken)
    tl.store(entry + 2, length, mask=taken)
    tl.store(entry + 3, index, mask=taken)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _packed_plan_kernel(
    CU_SEQLENS, SEGMENTS, PIECES, SEQUENCES, N, num_sequences, num_segments, num_pieces, segment_len, split,
    BLOCK: tl.constexpr, POOLED: tl.constexpr = False, STATE_ROWS=None, lead_all=None, pool_rows=None,
    short_rows=None,
):
    """The tables of a packed batch (``launch._packed_plan`` says what they hold), in one program:
    sequences BLOCK at a time, each block's segments and pieces placed after those of the blocks
    before it (running totals), then the surplus entries marked -1. ``POOLED``: the states are
    rows ``STATE_ROWS[s]`` of a pool of ``pool_rows`` rows, read and written in place: a sequence
    whose row is negative (padding) or past the pool gets no segment; a sequence cut into several
    segments (every one, with ``lead_all``) gets a lead slot ahead of its pieces, where the scan
    copies its initial state for segment 0 to start from, so that no program of the output pass
    reads a pool row that another one writes; a sequence of 1 to ``short_rows`` rows gets none
    either: the decode kernel runs it (``decode._decode_step_kernel``'s ``SEQUENCES``).

    The bounds are read as ``c_s = max(cu[0..s])`` clamped into [0, N]: the same values where
    ``cu_seqlens`` is valid, and otherwise (values no host check read: compiled, captured or
    changed behind the version counter) still rising sequences within the N rows, so the tables
    never overflow and no program reads or writes past the rows: wrong outputs, never a fault."""
    lanes = tl.arange(0, BLOCK)
    segments_before = tl.cast(0, tl.int32)
    slots_before = tl.cast(0, tl.int32)
    bound_before = tl.cast(0, tl.int32)
    for start in range(0, num_sequences, BLOCK):
        sequence = start + lanes
        valid = sequence < num_sequences
        lower = tl.load(CU_SEQLENS + sequence, mask=valid, other=0).to(tl.int32)
        upper = tl.load(CU_SEQLENS + sequence + 1, mask=valid, other=0).to(tl.int32)
        lower = tl.maximum(tl.associative_scan(tl.minimum(tl.maximum(lower, 0), N), 0, _max_combine), bound_before)
        upper = tl.maximum(tl.associative_scan(tl.minimum(tl.maximum(upper, 0), N), 0, _max_combine), lower)
        first_row = lower
        length = tl.where(valid, upper - lower, 0)
        bound_before = tl.max(tl.where(valid, upper, 0), 0)
        if POOLED:
            pool_row = tl.load(STATE_ROWS + sequence, mask=valid, other=-1)
            live = valid & (pool_row >= 0) & (pool_row < pool_rows)
            live = live & ((length == 0) | (length > short_rows))  # short ones: the decode kernel's
            segments = tl.where(live, tl.maximum((length + segment_len - 1) // segment_len, 1), 0)
            lead = tl.where(live & ((segments > 1) | (lead_all != 0)), 1, 0)
            slots = tl.where(live, (segments - 1) * split + lead, 0)
        else:
            segments = tl.where(valid, tl.maximum((length + segment_len - 1) // segment_len, 1), 0)
            slots = (segments - 1) * split  # negative for the lanes past the end: no slot
        first_segment = segments_before + tl.cumsum(segments, 0) - segments
        first_slot = slots_before + tl.cumsum(tl.maximum(slots, 0), 0) - tl.maximum(slots, 0)
        row = SEQUENCES + sequence * 5
        tl.store(row, first_slot, mask=valid)
        tl.store(row + 1, slots, mask=valid)
        tl.store(row + 2, first_segment, mask=valid)
        tl.store(row + 3, length, mask=valid)
        tl.store(row + 4, first_row, mask=valid)
        for index in range(0, tl.max(segments, 0)):
            entry = SEGMENTS + (first_segment + index) * 5
            taken = index < segments
            _store_plan_entry(entry, sequence, first_row, length, index, taken)
            if POOLED:  # segment 0 starts from the lead slot (none: from the pool row)
                tl.store(entry + 4, tl.where(lead > 0, first_slot + index * split, -1), mask=taken)
            else:
                tl.store(entry + 4, first_slot + index * split - 1, mask=taken)
        if POOLED:  # the lead slot holds no piece
            tl.store(PIECES + first_slot * 4, -1, mask=lead > 0)
            first_piece = first_slot + lead
            pieces = slots - lead
        else:
            first_piece = first_slot
            pieces = slots
        for index in range(0, tl.max(pieces, 0)):
            entry = PIECES + (first_piece + index) * 4
            taken = index < pieces
            _store_plan_entry(entry, sequence, first_row, length, index, taken)
        segments_before += tl.sum(segments, 0)
        slots_before += tl.sum(tl.maximum(slots, 0), 0)
    for start in range(segments_before, num_segments, BLOCK):
        tl.store(SEGMENTS + (start + lanes) * 5, -1, mask=start + lanes < num_segments)
    for start in range(slots_before, num_pieces, BLOCK):
        tl.store(PIECES + (start + lanes) * 4, -1, mask=start + lanes < num_pieces)


@triton.jit
def _segment_scan_kernel(
    DECAY, INIT, SEG_STATES, SEQUENCES,
    stride_ib, stride_ih, stride_ik, stride_iv,
    H, DK, DV, segment_len, num_segments, init_group,
    HAS_DECAY: tl.constexpr, HAS_INIT: tl.constexpr, INIT_SHIFT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, STAGES: tl.constexpr = 1, VARLEN: tl.constexpr = False,
    POOLED: tl.constexpr = False, STATE_ROWS=None,
):
    """In place: slot g of SEG_STATES goes from segment g's own state to the state at segment g+1's start.

    One program per block of ``BLOCK_V`` state columns and batch*head: the columns are independent,
    so narrow blocks spread the scan's sequential chain over many programs. ``STAGES`` > 1
    pipelines the slots' loads (asynchronous copies that many slots ahead), so that each step of
    the chain waits for one multiply-add, not for a round trip to memory. ``VARLEN`` (packed
    sequences): grid axis 1 is the sequence, whose slots are a run given by the ``SEQUENCES``
    table (first slot, count, ...), scanned from its own initial state. ``POOLED``: that state is
    row ``STATE_ROWS[sequence]`` of a pool, and the run's first slot (the lead slot, see
    ``_packed_plan_kernel``) receives a copy of it; sequences without slots return at once."""
    pid_v, bh = _block_and_head(DV, BLOCK_V)
    b = bh // H
    h = bh % H
    if VARLEN:
        sequence = tl.program_id(1)
        first_slot = tl.load(SEQUENCES + 5 * sequence)
        count = tl.load(SEQUENCES + 5 * sequence + 1)
        if POOLED:
            if count <= 0:  # one segment from the pool row, or padding: nothing to scan
                return
            state_batch = tl.load(STATE_ROWS + sequence).to(tl.int64)
        else:
            state_batch = sequence.to(tl.int64)
    else:
        state_batch = b
    cols_k = tl.arange(0, BLOCK_K)
    cols_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    tile_mask = (cols_k < DK)[:, None] & (cols_v < DV)[None, :]
    if HAS_INIT:
        init_ptr = _head(INIT, state_batch, h // init_group, stride_ib, stride_ih)
        state = tl.load(init_ptr + cols_k[:, None] * stride_ik + cols_v[None, :] * stride_iv, mask=tile_mask, other=0.0)
        state = state.to(tl.float32)
    else:
        state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    if HAS_DECAY:
        log2_lam = _log2_decay(DECAY, h)
        first_decay = tl.exp2(log2_lam * (segment_len - 1 + INIT_SHIFT))
        later_decay = tl.exp2(log2_lam * segment_len)
    if VARLEN:
        slot_ptr = SEG_STATES + (bh * num_segments + first_slot) * DK * DV + cols_k[:, None] * DV + cols_v[None, :]
        if POOLED:  # the lead slot: segment 0's start, a copy of the pool row
            tl.store(slot_ptr, state, mask=tile_mask)
            slot_ptr += DK * DV
            count -= 1
    else:
        slot_ptr = SEG_STATES + bh * num_segments * DK * DV + cols_k[:, None] * DV + cols_v[None, :]
        count = num_segments - 1
    for g in tl.range(0, count, num_stages=STAGES):
        own = tl.load(slot_ptr + g * DK * DV, mask=tile_mask, other=0.0)
        if HAS_DECAY:
            state = state * tl.where(g == 0, first_decay, later_decay)
        state = state + own
        tl.store(slot_ptr + g * DK * DV, state, mask=tile_mask)


@triton.jit
def _output_pass(
    tensors, strides, sizes, HAS_DECAY: tl.constexpr, HAS_INIT: tl.constexpr, INIT_SHIFT: tl.constexpr,
    REVERSE: tl.constexpr, STORE_FINAL: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr, DOT_DTYPE: tl.constexpr, STATE_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    STATE_PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr, UPDATE_ACCUMULATE: tl.constexpr,
    VARLEN: tl.constexpr, POOLED: tl.constexpr, TRANSPOSED: tl.constexpr, KEY_PARTS: tl.constexpr,
    PART: tl.constexpr, EXACT: tl.constexpr,
):
    """``_chunk_output_kernel``'s walk of its segment, its arguments grouped as the kernel's call
    names them; whether the state it ends in holds a NaN or inf. ``TRANSPOSED``: the state held as
    S^T in ``KEY_PARTS`` parts of ``PART`` key columns and every product the other way round (see
    the kernel). ``EXACT``: outputs of the rows before a NaN or inf in k or v as if it were finite
    (stages: the exact walk)."""
    (Q, K, V, O, DECAY, INIT, SEG_STATES, FINAL, SEGMENTS, STATE_ROWS) = tensors
    (stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
     stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on, stride_od,
     stride_ib, stride_ih, stride_ik, stride_iv, stride_fb, stride_fh, stride_fk, stride_fv, stride_sk,
     stride_sv) = strides
    (N, H, DK, DV, segment_len, num_segments, num_slots, split, out_scale, value_scale,
     q_group, k_group, v_group, init_group, final_group) = sizes
    # VARLEN: seg becomes the segment's index in its sequence, N the sequence's length
    (pid_v, bh, b, h, sequence, first_row, N, seg, slot, state_row,
     q_ptr, k_ptr, v_ptr, o_ptr) = _output_program(
        Q, K, V, O, SEGMENTS, STATE_ROWS, N, H, DV,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_on, q_group, k_group, v_group, BLOCK_V, VARLEN, POOLED)
    if VARLEN:
        if sequence < 0:
            return False
    out_scale, value_scale = tl.cast(out_scale, tl.float32), tl.cast(value_scale, tl.float32)  # fp64 (Inductor)
    # each form's columns in the order it was timed with (value columns first changes the direct form's PTX)
    if TRANSPOSED:
        cols_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        valid_v = cols_v < DV
    else:
        cols_k = tl.arange(0, BLOCK_K)
        cols_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        valid_k = cols_k < DK
        valid_v = cols_v < DV
        tile_mask = valid_k[:, None] & valid_v[None, :]
    idx = tl.arange(0, CHUNK)
    if TRANSPOSED:  # scores and mask indexed [s, i]: key row s is seen by query row i
        causal = idx[:, None] <= idx[None, :]
        log2_lam, mask = _chunk_mask(DECAY, h, causal, idx[None, :], idx[:, None], value_scale, out_scale,
                                     HAS_DECAY)
    else:
        # the scores carry value_scale, and out_scale too unless it is applied to the sum (ACCUMULATE)
        score_out_scale = 1.0 if ACCUMULATE else out_scale
        causal = idx[:, None] >= idx[None, :]
        log2_lam, mask = _chunk_mask(DECAY, h, causal, idx[:, None], idx[None, :], value_scale, score_out_scale,
                                     HAS_DECAY)

    # The state before the segment's first row. Segment 0 starts from the initial state, which
    # enters with lam^INIT_SHIFT at its first row; later segments from the scan, with lam^1.
    init_offset, slot, start_seg = _start_slot(seg, slot, bh, b, h, state_row, stride_ib, stride_ih, init_group,
                                               num_slots, split, DK, DV, VARLEN, POOLED)
    if TRANSPOSED:
        state = _segment_start_state_t(INIT, init_offset, stride_ik, stride_iv, SEG_STATES, slot, start_seg,
                                       cols_v, valid_v, DK, stride_sk, stride_sv, HAS_INIT, BLOCK_V, KEY_PARTS, PART)
    else:
        state = _segment_start_state(INIT, init_offset, stride_ik, stride_iv, SEG_STATES, slot, start_seg, cols_k,
                                     cols_v, tile_mask, stride_sk, stride_sv, HAS_INIT, BLOCK_K, BLOCK_V)
    first_shift = tl.where(seg == 0, INIT_SHIFT, 1)

    seg_begin = seg * segment_len
    seg_end = tl.minimum(seg_begin + segment_len, N)
    for start in range(seg_begin, seg_end, CHUNK):
        rows, row_valid, length, shift = _segment_chunk(start, seg_begin, seg_end, first_shift, idx, CHUNK)
        if TRANSPOSED:
            q = _key_parts(q_ptr, stride_qn, stride_qd, rows, row_valid, DK, N, REVERSE, KEY_PARTS, PART)
            k = _key_parts(k_ptr, stride_kn, stride_kd, rows, row_valid, DK, N, REVERSE, KEY_PARTS, PART)
        else:
            q = _load_rows(q_ptr, stride_qn, stride_qd, rows, row_valid, cols_k, valid_k, N, REVERSE)
            k = _load_rows(k_ptr, stride_kn, stride_kd, rows, row_valid, cols_k, valid_k, N, REVERSE)
        v = _load_rows(v_ptr, stride_vn, stride_vd, rows, row_valid, cols_v, valid_v, N, REVERSE)
        if TRANSPOSED:  # the scores in full, masked, then the state's share (timed fastest on the H200)
            scores = _chunk_scores_t(k, q, mask, value_scale, out_scale, HAS_DECAY, KEY_PARTS, DOT_DTYPE,
                                     PRECISION)
        else:
            scores = _chunk_scores(q, k, mask, value_scale, score_out_scale, HAS_DECAY, DOT_DTYPE, PRECISION)
        row_values = v
        if EXACT:
            row_values, first = _finite_values(v, idx, CHUNK)
            scores = _exact_scores(scores, causal)
        if TRANSPOSED:
            out = _chunk_rows_t(q, state, scores, row_values, log2_lam, idx, shift, out_scale, HAS_DECAY,
                                KEY_PARTS, DOT_DTYPE, PRECISION, STATE_DOT_DTYPE, STATE_PRECISION)
            if EXACT:
                out = tl.where(idx[None, :] >= first[:, None], float("nan"), out)
            _store_rows_t(o_ptr, stride_on, stride_od, out, rows, row_valid, cols_v, valid_v, N, REVERSE)
            state = _update_state_t(state, v, k, log2_lam, idx, length, shift, value_scale, HAS_DECAY, KEY_PARTS,
                                    DOT_DTYPE, PRECISION)
        else:
            out = _chunk_rows(q, state, scores, row_values, log2_lam, idx, shift, out_scale, HAS_DECAY, ACCUMULATE,
                              False, CHUNK, DOT_DTYPE, PRECISION, STATE_DOT_DTYPE, STATE_PRECISION)
            if EXACT:
                out = tl.where(idx[:, None] >= first[None, :], float("nan"), out)
            _store_rows(o_ptr, stride_on, stride_od, out, rows, row_valid, cols_v, valid_v, N, REVERSE)
            state = _update_state(state, k, v, log2_lam, idx, length, shift, value_scale, HAS_DECAY,
                                  ACCUMULATE or UPDATE_ACCUMULATE, DOT_DTYPE, PRECISION)

    # a pass that the exact one repeats leaves the final state to it: that state may be the row
    # this program started from (a pool row read and written in place)
    if EXACT:
        redo = False
    elif TRANSPOSED:
        redo = _any_non_finite_t(state, KEY_PARTS)
    else:
        redo = _any_non_finite(state)
    if STORE_FINAL:
        last, final_batch, final_head = _final_at(seg, seg_begin, segment_len, N, num_segments, b, h, state_row,
                                                  final_group, VARLEN, POOLED)
        if last & (redo == 0):
            final_ptr = _head(FINAL, final_batch, final_head, stride_fb, stride_fh)
            if TRANSPOSED:
                _store_state_t(final_ptr, stride_fk, stride_fv, state, cols_v, valid_v, DK, KEY_PARTS, PART)
            else:
                _store_state(final_ptr, stride_fk, stride_fv, state, cols_k, cols_v, tile_mask)
    return redo


@triton.jit(noinline=True)
def _output_pass_t_exact(
    tensors, strides, sizes, HAS_DECAY: tl.constexpr, HAS_INIT: tl.constexpr, INIT_SHIFT: tl.constexpr,
    REVERSE: tl.constexpr, STORE_FINAL: tl.constexpr, CHUNK: tl.constexpr, KEY_PARTS: tl.constexpr,
    PART: tl.constexpr, BLOCK_V: tl.constexpr, DOT_DTYPE: tl.constexpr, STATE_DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr, VARLEN: tl.constexpr, POOLED: tl.constexpr,
):
    """The transposed exact walk as a function of its own: inlined, its registers cost the usual
    walk at D = 256 (the forward 6% slower than as a call, H100, benchmarks/RESULTS.md); the call
    only happens after a NaN or inf."""
    _output_pass(tensors, strides, sizes, HAS_DECAY, HAS_INIT, INIT_SHIFT, REVERSE, STORE_FINAL, CHUNK,
                 KEY_PARTS * PART, BLOCK_V, DOT_DTYPE, STATE_DOT_DTYPE, PRECISION, STATE_PRECISION, False, False,
                 VARLEN, POOLED, True, KEY_PARTS, PART, True)


@triton.jit(do_not_specialize=["N"])
def _chunk_output_kernel(
    Q, K, V, O, DECAY, INIT, SEG_STATES, FINAL, SEGMENTS,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_ib, stride_ih, stride_ik, stride_iv,
    stride_fb, stride_fh, stride_fk, stride_fv,
    stride_sk, stride_sv,
    N, H, DK, DV, segment_len, num_segments, num_slots, split, out_scale, value_scale,
    q_group, k_group, v_group, init_group,
    HAS_DECAY: tl.constexpr, HAS_INIT: tl.constexpr, INIT_SHIFT: tl.constexpr,
    REVERSE: tl.constexpr, STORE_FINAL: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, STATE_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    STATE_PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr = False,
    UPDATE_ACCUMULATE: tl.constexpr = False, VARLEN: tl.constexpr = False,
    POOLED: tl.constexpr = False, STATE_ROWS=None, final_group=None,
    TRANSPOSED: tl.constexpr = False, KEY_PARTS: tl.constexpr = 1, PART: tl.constexpr = 64,
):
    """Outputs of one segment for one block of value columns, walking its chunks in order.

    ``ACCUMULATE``: the chunk's own products accumulate onto the state's (``_dot_acc``), with
    value_scale folded into the mask and the keys, instead of each product in a temporary of its
    own, scaled and added (fewer float32 tiles live; on the H200 faster at 64-wide heads, slower
    at 128 and 256: ``choose_config``). ``UPDATE_ACCUMULATE``: only the state update accumulates in
    place (the output's products as in the other form): at D = 128 on sm_90 that loop has fewer
    instructions than either form and no spills (``benchmarks/registers.py``); the output's
    accumulated product is what spills there.

    ``TRANSPOSED`` (config ``transposed``; ACCUMULATE and UPDATE_ACCUMULATE do not apply): the
    state is held as ``S^T`` ([BLOCK_V, Dk]) in a tuple of ``KEY_PARTS`` float32 tiles of ``PART``
    key columns (``BLOCK_K = KEY_PARTS * PART``), and every product is written the other way round:
    scores ``k q^T`` ([s, i]), outputs ``o^T = (S^T q^T) * w + v^T (k q^T * M^T)`` ([BLOCK_V, rows],
    stored through the output's strides), update ``S^T += (w v)^T k``. On sm_90 the state then is
    the register operand of the tensor-core product with q (no shared-memory copy of it per
    chunk), k enters the update as loaded, and with eight warps each warp group owns 64 value rows
    of the state, so one program covers 128 value columns and reads q and k once for them. Keys
    wider than 64 are split into parts so that the state's 16-bit copy for that product is one
    part at a time. It is the faster form for 16-bit keys of 65-128 columns and bfloat16's wider
    ones (the default there; timings in benchmarks/RESULTS.md). The segment states and the initial
    and final states keep their [Dk, Dv] layout in memory."""
    tensors = (Q, K, V, O, DECAY, INIT, SEG_STATES, FINAL, SEGMENTS, STATE_ROWS)
    strides = (stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
               stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on, stride_od,
               stride_ib, stride_ih, stride_ik, stride_iv, stride_fb, stride_fh, stride_fk, stride_fv, stride_sk,
               stride_sv)
    sizes = (N, H, DK, DV, segment_len, num_segments, num_slots, split, out_scale, value_scale,
             q_group, k_group, v_group, init_group, final_group)
    # A NaN or inf in k or v leaves the state non-finite: then the segment is walked again, exactly
    # (stages). The second pass recomputes what it needs from the arguments; values kept from the
    # first one would stay live through its loop and spill there.
    if _output_pass(tensors, strides, sizes, HAS_DECAY, HAS_INIT, INIT_SHIFT, REVERSE, STORE_FINAL, CHUNK, BLOCK_K,
                    BLOCK_V, DOT_DTYPE, STATE_DOT_DTYPE, PRECISION, STATE_PRECISION, ACCUMULATE, UPDATE_ACCUMULATE,
                    VARLEN, POOLED, TRANSPOSED, KEY_PARTS, PART, False):
        if TRANSPOSED:
            _output_pass_t_exact(tensors, strides, sizes, HAS_DECAY, HAS_INIT, INIT_SHIFT, REVERSE, STORE_FINAL,
                                 CHUNK, KEY_PARTS, PART, BLOCK_V, DOT_DTYPE, STATE_DOT_DTYPE, PRECISION,
                                 STATE_PRECISION, VARLEN, POOLED)
        else:
            _output_pass(tensors, strides, sizes, HAS_DECAY, HAS_INIT, INIT_SHIFT, REVERSE, STORE_FINAL, CHUNK,
                         BLOCK_K, BLOCK_V, DOT_DTYPE, STATE_DOT_DTYPE, PRECISION, STATE_PRECISION, ACCUMULATE,
                         UPDATE_ACCUMULATE, VARLEN, POOLED, False, KEY_PARTS, PART, True)
