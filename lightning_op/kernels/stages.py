"""The chunk step's stages as ``@triton.jit`` helpers, shared by the kernel families.

A walking kernel reads, for each chunk of its segment: load the rows, score them (``(a b^T) * M``),
combine the state's share with the chunk's own (the output rows), store them, decay the state and
add the chunk. Triton inlines every helper into its kernel, so a kernel built from them compiles
to the code of one written out; the helpers only name the steps.

The decay factors all take the form ``lam^e = exp2(log2(lam) * e)`` with ``e >= 0`` counted from
a chunk's boundary (see ``chunked``): ``_row_decay`` (the state's share of row i, ``e = i + shift``),
``_key_decay`` (key row s's share of the state at the chunk's end, ``e = length - 1 - s``) and
``_chunk_decay`` (the state across the chunk, ``e = length - 1 + shift``).
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Matrix product with fp32 accumulation; operands cast to DOT_DTYPE first."""
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)


@triton.jit
def _dot_acc(acc, a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b``, the product accumulated into ``acc`` (float32) itself."""
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)


# ---- the program's tile -------------------------------------------------------------------------

@triton.jit
def _block_and_head(DV, BLOCK_V: tl.constexpr):
    """(value block, batch*head) of this program. Both share grid axis 0, value blocks fastest so
    the programs reading the same q and k rows run side by side; axis 0 also allows 2**31 - 1
    programs where the other axes stop at 65535. batch*head is 64-bit: offsets of large tensors
    pass 2**31 elements."""
    pid = tl.program_id(0).to(tl.int64)
    num_v_blocks = tl.cdiv(DV, BLOCK_V)
    return pid % num_v_blocks, pid // num_v_blocks


@triton.jit
def _head(ptr, b, h, stride_b, stride_h):
    """The [N, D] matrix of batch b, head h in a [B, H, N, D] tensor given by strides."""
    return ptr + b * stride_b + h * stride_h


@triton.jit
def _packed_segment(SEGMENTS, index):
    """Entry ``index`` of a packed batch's segment table (``launch._packed_plan``): the sequence
    (-1 where the table has no segment: the program returns), its first row (int64: offsets) and
    length, the segment's index in it and the slot of its start state."""
    entry = SEGMENTS + index * 5
    return (tl.load(entry).to(tl.int64), tl.load(entry + 1).to(tl.int64), tl.load(entry + 2), tl.load(entry + 3),
            tl.load(entry + 4))


@triton.jit
def _output_segment(SEGMENTS, STATE_ROWS, seg, N, VARLEN: tl.constexpr, POOLED: tl.constexpr):
    """What an output program walks: ``(sequence, first_row, N, seg, slot, state_row)``. Dense: the
    segment ``seg`` of its batch entry's N rows (the other values unused). ``VARLEN``: entry
    ``seg`` of the packed plan (``_packed_segment``; sequence -1: no segment, the program returns),
    whose states are at batch entry ``state_row``: the sequence's, or with ``POOLED`` its pool row
    ``STATE_ROWS[sequence]`` (read only for a real segment)."""
    sequence = 0
    first_row = 0
    slot = 0
    state_row = 0
    if VARLEN:
        sequence, first_row, N, seg, slot = _packed_segment(SEGMENTS, seg)
        if POOLED:
            state_row = tl.load(STATE_ROWS + sequence, mask=sequence >= 0, other=0).to(tl.int64)
        else:
            state_row = sequence
    return sequence, first_row, N, seg, slot, state_row


@triton.jit
def _rows_at(ptr, b, head, stride_b, stride_h, stride_n, first_row, VARLEN: tl.constexpr):
    """Row 0 of ``head`` of batch entry ``b``; ``VARLEN``: of the sequence starting at ``first_row``."""
    ptr = _head(ptr, b, head, stride_b, stride_h)
    if VARLEN:
        ptr += first_row * stride_n
    return ptr


@triton.jit
def _output_program(
    Q, K, V, O, SEGMENTS, STATE_ROWS, N, H, DV,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on, q_group, k_group, v_group,
    BLOCK_V: tl.constexpr, VARLEN: tl.constexpr, POOLED: tl.constexpr,
):
    """An output program's work: its value block and compute head, its segment
    (``_output_segment``: the caller returns where ``VARLEN``'s sequence is -1), and row 0 of its
    segment's sequence in q, k, v and the output:
    ``(pid_v, bh, b, h, sequence, first_row, N, seg, slot, state_row, q, k, v, o)``."""
    pid_v, bh = _block_and_head(DV, BLOCK_V)
    sequence, first_row, N, seg, slot, state_row = _output_segment(SEGMENTS, STATE_ROWS, tl.program_id(1), N,
                                                                   VARLEN, POOLED)
    b = bh // H
    h = bh % H
    q_ptr = _rows_at(Q, b, h // q_group, stride_qb, stride_qh, stride_qn, first_row, VARLEN)
    k_ptr = _rows_at(K, b, h // k_group, stride_kb, stride_kh, stride_kn, first_row, VARLEN)
    v_ptr = _rows_at(V, b, h // v_group, stride_vb, stride_vh, stride_vn, first_row, VARLEN)
    o_ptr = _rows_at(O, b, h, stride_ob, stride_oh, stride_on, first_row, VARLEN)
    return pid_v, bh, b, h, sequence, first_row, N, seg, slot, state_row, q_ptr, k_ptr, v_ptr, o_ptr


@triton.jit
def _start_slot(seg, slot, bh, b, h, state_row, stride_ib, stride_ih, init_group, num_slots, split, DK, DV,
                VARLEN: tl.constexpr, POOLED: tl.constexpr):
    """Where an output program's segment starts: ``(init_offset, slot offset, start_seg)`` for
    ``_segment_start_state`` (segment 0 from the initial state at ``init_offset``, a later one
    from the scanned states' slot). ``VARLEN``: the plan's start slot and the sequence's initial
    state; ``POOLED``: segment 0 from the lead slot where the sequence has one (slot >= 0)."""
    if VARLEN:
        init_offset = state_row * stride_ib + (h // init_group) * stride_ih
        if POOLED:
            start_seg = tl.where(slot >= 0, 1, 0)
        else:
            start_seg = seg
        slot = (bh * num_slots + slot) * DK * DV
    else:
        init_offset = b * stride_ib + (h // init_group) * stride_ih
        slot = (bh * num_slots + seg * split - 1) * DK * DV
        start_seg = seg
    return init_offset, slot, start_seg


@triton.jit
def _final_at(seg, seg_begin, segment_len, N, num_segments, b, h, state_row, final_group,
              VARLEN: tl.constexpr, POOLED: tl.constexpr):
    """``(whether this program stores the final state, batch entry, head)``: the last segment of
    its batch entry, or ``VARLEN`` of its sequence, at that entry's (or pool row's) head;
    ``POOLED`` with a state shared by a group of heads, only the group's first head, at the
    state's head. (The caller takes the address under its branch: computed before it, the
    forward's code changes.)"""
    final_head = h
    if VARLEN:
        last = seg_begin + segment_len >= N
        final_batch = state_row
        if POOLED:
            final_head = h // final_group
            last = last & (h % final_group == 0)
    else:
        last = seg == num_segments - 1
        final_batch = b
    return last, final_batch, final_head


@triton.jit
def _packed_piece(PIECES, index):
    """Entry ``index`` of a packed batch's piece table (``launch._packed_plan``): the sequence (-1:
    none), its first row (int64) and length, and the piece's index in it; the piece's own state goes
    to slot ``index``."""
    entry = PIECES + index * 4
    return tl.load(entry), tl.load(entry + 1).to(tl.int64), tl.load(entry + 2), tl.load(entry + 3)


# ---- rows of a chunk ----------------------------------------------------------------------------

@triton.jit
def _segment_chunk(start, seg_begin, seg_end, first_shift, idx, CHUNK: tl.constexpr):
    """The chunk of a segment's walk that begins at row ``start``: its rows, which of them lie in
    the segment, how many do, and the exponent its first row's state share carries (the
    segment's ``first_shift`` in its first chunk, else 1)."""
    rows = start + idx
    return rows, rows < seg_end, tl.minimum(seg_end - start, CHUNK), tl.where(start == seg_begin, first_shift, 1)


@triton.jit
def _positions(rows, N, REVERSE: tl.constexpr):
    """Sequence positions of walk rows: backward in time (``REVERSE``) rows count from the end."""
    if REVERSE:
        positions = N - 1 - rows
    else:
        positions = rows
    return positions


@triton.jit
def _load_rows(ptr, stride_n, stride_d, rows, row_valid, cols, col_valid, N, REVERSE: tl.constexpr):
    """A [rows, cols] tile of a [N, D] matrix given by strides; rows past the end read as zero."""
    offsets = _positions(rows, N, REVERSE).to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d
    return tl.load(ptr + offsets, mask=row_valid[:, None] & col_valid[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, stride_n, stride_d, tile, rows, row_valid, cols, col_valid, N, REVERSE: tl.constexpr):
    """Store a [rows, cols] tile into a [N, D] matrix given by strides, in its element type."""
    offsets = _positions(rows, N, REVERSE).to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d
    tl.store(ptr + offsets, tile.to(ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


@triton.jit
def _store_rows_t(ptr, stride_n, stride_d, tile_t, rows, row_valid, cols, col_valid, N, REVERSE: tl.constexpr):
    """Store a [cols, rows] tile (the rows transposed) into a [N, D] matrix given by strides."""
    offsets = _positions(rows, N, REVERSE).to(tl.int64)[None, :] * stride_n + cols[:, None] * stride_d
    tl.store(ptr + offsets, tile_t.to(ptr.dtype.element_ty), mask=row_valid[None, :] & col_valid[:, None])


# ---- decay --------------------------------------------------------------------------------------

@triton.jit
def _log2_decay(DECAY, h):
    """log2(lam) of head h, from its decay rate (lam = exp(-rate))."""
    return -tl.load(DECAY + h).to(tl.float32) * 1.4426950408889634


@triton.jit
def _chunk_mask(DECAY, h, causal, query_idx, key_idx, scale, out_scale, HAS_DECAY: tl.constexpr):
    """log2(lam) of head h and the chunk's mask M[i, s] = scale * out_scale * lam^(i-s) where query
    row i sees key row s (``causal``), else 0 (the exponent is clamped so that masked entries stay
    finite). Without decay: log2(lam) = 0 and the causal pattern itself (``_mask_scores`` then
    applies the scales). The row indices come broadcast: ``idx[:, None], idx[None, :]`` for a mask
    indexed [i, s]; the caller compares them (``causal``) as its layout reads best, which also
    fixes the order of the comparison's operands in the generated code."""
    if HAS_DECAY:
        log2_lam = _log2_decay(DECAY, h)
        distance = tl.maximum(query_idx - key_idx, 0).to(tl.float32)
        mask = tl.where(causal, tl.exp2(log2_lam * distance), 0.0) * (scale * out_scale)
    else:
        log2_lam = 0.0
        mask = causal
    return log2_lam, mask


@triton.jit
def _weighted_rows(tile, log2_lam, steps, scale, HAS_DECAY: tl.constexpr):
    """Each row of ``tile`` times ``scale * lam^steps`` (``steps`` per row, >= 0), lam = 1 without decay."""
    if HAS_DECAY:
        weight = tl.exp2(log2_lam * steps.to(tl.float32)) * scale
        tile = tile * weight[:, None]
    else:
        tile = tile * scale
    return tile


@triton.jit
def _row_decay(log2_lam, idx, shift):
    """lam^(i+shift): the state's share in row i of a chunk."""
    return tl.exp2(log2_lam * (idx + shift).to(tl.float32))


@triton.jit
def _key_decay(log2_lam, idx, length):
    """lam^(length-1-s): key row s's weight in the state at the chunk's last row (rows past the
    end are zero and get exponent 0)."""
    return tl.exp2(log2_lam * tl.maximum(length - 1 - idx, 0).to(tl.float32))


@triton.jit
def _chunk_decay(log2_lam, length, shift):
    """lam^(length-1+shift): the state carried across a chunk of ``length`` rows."""
    return tl.exp2(log2_lam * (length - 1 + shift).to(tl.float32))


# ---- the chunk step on a [Dk, BLOCK_V] state ----------------------------------------------------

@triton.jit
def _mask_scores(scores, mask, scale, out_scale, HAS_DECAY: tl.constexpr):
    """Scores times the chunk's mask (``_chunk_mask``), the scales folded in."""
    if HAS_DECAY:
        scores = scores * mask
    else:
        scores = tl.where(mask, scores * (scale * out_scale), 0.0)
    return scores


@triton.jit
def _chunk_scores(a, b, mask, scale, out_scale, HAS_DECAY: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  PRECISION: tl.constexpr):
    """``(a b^T) * M``: query rows a against key rows b, masked and scaled."""
    return _mask_scores(_dot(a, tl.trans(b), DOT_DTYPE, PRECISION), mask, scale, out_scale, HAS_DECAY)


# ---- non-finite inputs: the exact walk ----------------------------------------------------------
# In a chunk's products a masked score is 0 and 0 * NaN = NaN, so a NaN or inf in a later row's k
# or v would reach the earlier rows of its chunk (for k through its column of scores, for v
# through ``scores @ v``). Every such value also reaches the state the walk carries (the update
# multiplies it in), and a non-finite state stays non-finite. So an output program walks its
# segment as usual, checks the state it ends in once, and only where it is not finite walks the
# segment again in the exact form: masked scores selected to 0, the chunk's product taken with
# the non-finite values as 0, and the outputs that read one (its column, from its row on) set to
# NaN afterwards, as ``reference._chunk_product`` does. The usual walk costs one check per
# program; the outputs that do read a NaN or inf are NaN, where the reference may give inf.

@triton.jit
def _is_finite(x):
    """True where x is neither NaN nor inf (every comparison with NaN is false)."""
    return tl.abs(x.to(tl.float32)) <= 3.4028234663852886e38


@triton.jit
def _any_non_finite(state):
    """Whether a float32 state tile holds a NaN or inf."""
    return tl.max(tl.where(_is_finite(state), 0, 1)) > 0


@triton.jit
def _any_non_finite_t(states, KEY_PARTS: tl.constexpr):
    """``_any_non_finite`` of a state held in key parts (the transposed output pass)."""
    found = _any_non_finite(states[0])
    for part in tl.static_range(1, KEY_PARTS):
        found = found | _any_non_finite(states[part])
    return found


@triton.jit
def _exact_scores(scores, seen):
    """Scores with every masked entry exactly 0 (``seen``: where the query row sees the key row)."""
    return tl.where(seen, scores, 0.0)


@triton.jit
def _finite_values(v, idx, CHUNK: tl.constexpr):
    """(v with its NaN and inf as 0, in v's type; per column, the first row (of ``idx``) holding a
    NaN or inf, CHUNK where none does): column c of output row i reads one where ``i >= first[c]``
    (its chunk; the state carries it on)."""
    finite = _is_finite(v)
    first = tl.min(tl.where(finite, CHUNK, idx[:, None]), 0)
    return tl.where(finite, v, tl.zeros_like(v)), first


@triton.jit
def _state_share(x, state, TRANSPOSE_STATE: tl.constexpr, STATE_DOT_DTYPE: tl.constexpr,
                 STATE_PRECISION: tl.constexpr):
    """``x S``, or ``x S^T``: the transpose is taken right before its product. For a float32 state
    operand it compiles to a copy through shared memory where it is written; taken before the
    chunk's own product, that copy would move ahead of it."""
    if TRANSPOSE_STATE:
        state = tl.trans(state)
    return _dot(x, state, STATE_DOT_DTYPE, STATE_PRECISION)


@triton.jit
def _chunk_rows(
    x, state, scores, y, log2_lam, idx, shift, out_scale, HAS_DECAY: tl.constexpr, ACCUMULATE: tl.constexpr,
    TRANSPOSE_STATE: tl.constexpr, CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    STATE_DOT_DTYPE: tl.constexpr, STATE_PRECISION: tl.constexpr,
):
    """A chunk's output rows ``out_scale * (lam^(i+shift) x_i S + (scores y)_i)`` (``S^T`` with
    ``TRANSPOSE_STATE``): the state's share plus the chunk's own. The row weight goes on the
    product, so x enters the dot as loaded (no scaled copy of it). ``ACCUMULATE``: the chunk's
    product accumulates onto the state's share.
    Otherwise each product has its own tile, and one fused multiply-add per element combines
    them: written as a sum, the compiler would accumulate the one product onto the other, as the
    other form does, which spills at D = 128 (registers.py), and it times faster than three
    scaling passes (benchmarks/RESULTS.md)."""
    if ACCUMULATE:
        inter = _state_share(x, state, TRANSPOSE_STATE, STATE_DOT_DTYPE, STATE_PRECISION)
        if HAS_DECAY:
            inter = inter * _row_decay(log2_lam, idx, shift)[:, None]
        out = _dot_acc(inter, scores, y, DOT_DTYPE, PRECISION) * out_scale
    else:
        intra = _dot(scores, y, DOT_DTYPE, PRECISION)
        inter = _state_share(x, state, TRANSPOSE_STATE, STATE_DOT_DTYPE, STATE_PRECISION)
        if HAS_DECAY:
            row_weight = _row_decay(log2_lam, idx, shift) * out_scale
        else:
            row_weight = tl.full([CHUNK], 1.0, tl.float32) * out_scale
        out = tl.fma(inter, row_weight[:, None], intra)
    return out


@triton.jit
def _update_state(
    state, k, v, log2_lam, idx, length, shift, value_scale, HAS_DECAY: tl.constexpr, IN_PLACE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """``S <- lam^(length-1+shift) S + value_scale sum_s lam^(length-1-s) k_s^T v_s`` over a chunk.
    ``IN_PLACE``: the product accumulates onto the decayed state, value_scale in the key weights."""
    if HAS_DECAY:
        weight = _key_decay(log2_lam, idx, length)
        if IN_PLACE:
            weight = weight * value_scale
        k = k * weight[:, None]
        state = state * _chunk_decay(log2_lam, length, shift)
    elif IN_PLACE:
        k = k * value_scale
    if IN_PLACE:
        state = _dot_acc(state, tl.trans(k), v, DOT_DTYPE, PRECISION)
    else:
        state += _dot(tl.trans(k), v, DOT_DTYPE, PRECISION) * value_scale
    return state


# ---- states -------------------------------------------------------------------------------------

@triton.jit
def _segment_start_state(
    INIT, init_offset, stride_ik, stride_iv, SEG_STATES, slot, seg, cols_k, cols_v, tile_mask,
    stride_sk, stride_sv, HAS_INIT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The float32 state a segment starts from: segment 0 from the initial state (or zeros), a
    later one from ``slot`` of the scanned segment states (element (i, j) of a slot at
    ``i * stride_sk + j * stride_sv``: (DV, 1) for the states of this pass, (1, DK) for those of
    the transposed pass, see ``kernels.SegmentStates``)."""
    if seg == 0:
        if HAS_INIT:
            ptrs = INIT + init_offset + cols_k[:, None] * stride_ik + cols_v[None, :] * stride_iv
            state = tl.load(ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        else:
            state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    else:
        ptrs = SEG_STATES + slot + cols_k[:, None] * stride_sk + cols_v[None, :] * stride_sv
        state = tl.load(ptrs, mask=tile_mask, other=0.0).to(tl.float32)
    return state


@triton.jit
def _store_state(ptr, stride_k, stride_v, state, cols_k, cols_v, tile_mask):
    """Store a float32 [Dk, BLOCK_V] state tile at ``ptr`` (element (i, j) at ``i * stride_k + j * stride_v``)."""
    tl.store(ptr + cols_k[:, None] * stride_k + cols_v[None, :] * stride_v, state, mask=tile_mask)


# ---- the chunk step on S^T held in parts of key columns (the output kernel's TRANSPOSED form) ---
# Each part is a tile of PART key columns; the parts travel as a tuple of KEY_PARTS tiles, and the
# loops over them are unrolled at compile time (``tl.static_range``).

@triton.jit
def _key_parts(ptr, stride_n, stride_d, rows, row_valid, DK, N, REVERSE: tl.constexpr, KEY_PARTS: tl.constexpr,
               PART: tl.constexpr):
    """Rows of a [N, Dk] matrix (q or k) as KEY_PARTS tiles of PART key columns."""
    parts = ()
    for part in tl.static_range(KEY_PARTS):
        cols = part * PART + tl.arange(0, PART)
        parts = parts + (_load_rows(ptr, stride_n, stride_d, rows, row_valid, cols, cols < DK, N, REVERSE),)
    return parts


@triton.jit
def _state_part_t(ptr, stride_k, stride_v, part, cols_v, valid_v, DK, PART: tl.constexpr):
    """A float32 [BLOCK_V, PART] tile of a [Dk, Dv] state read transposed (key columns of ``part``)."""
    cols_k = part * PART + tl.arange(0, PART)
    ptrs = ptr + cols_v[:, None] * stride_v + cols_k[None, :] * stride_k
    return tl.load(ptrs, mask=valid_v[:, None] & (cols_k < DK)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _segment_start_state_t(
    INIT, init_offset, stride_ik, stride_iv, SEG_STATES, slot, seg, cols_v, valid_v, DK, stride_sk, stride_sv,
    HAS_INIT: tl.constexpr, BLOCK_V: tl.constexpr, KEY_PARTS: tl.constexpr, PART: tl.constexpr,
):
    """``_segment_start_state`` transposed, part by part."""
    states = ()
    for part in tl.static_range(KEY_PARTS):
        if seg == 0:
            if HAS_INIT:
                state_t = _state_part_t(INIT + init_offset, stride_ik, stride_iv, part, cols_v, valid_v, DK, PART)
            else:
                state_t = tl.zeros([BLOCK_V, PART], dtype=tl.float32)
        else:
            state_t = _state_part_t(SEG_STATES + slot, stride_sk, stride_sv, part, cols_v, valid_v, DK, PART)
        states = states + (state_t,)
    return states


@triton.jit
def _chunk_scores_t(ks, qs, mask_t, scale, out_scale, HAS_DECAY: tl.constexpr, KEY_PARTS: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``(k q^T) * M^T`` ([s, i]), the product summed over the key parts."""
    scores_t = _dot(ks[0], tl.trans(qs[0]), DOT_DTYPE, PRECISION)
    for part in tl.static_range(1, KEY_PARTS):
        scores_t = _dot_acc(scores_t, ks[part], tl.trans(qs[part]), DOT_DTYPE, PRECISION)
    return _mask_scores(scores_t, mask_t, scale, out_scale, HAS_DECAY)


@triton.jit
def _chunk_rows_t(
    qs, states, scores_t, v, log2_lam, idx, shift, out_scale, HAS_DECAY: tl.constexpr, KEY_PARTS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, STATE_DOT_DTYPE: tl.constexpr, STATE_PRECISION: tl.constexpr,
):
    """``_chunk_rows`` transposed ([BLOCK_V, rows]): ``(S^T q^T) * w + v^T (k q^T * M^T)``, the
    chunk's own share accumulated onto the state's (measured 4% faster than a fused multiply-add
    of two products in the prototype)."""
    inter_t = _dot(states[0], tl.trans(qs[0]), STATE_DOT_DTYPE, STATE_PRECISION)
    for part in tl.static_range(1, KEY_PARTS):
        inter_t = _dot_acc(inter_t, states[part], tl.trans(qs[part]), STATE_DOT_DTYPE, STATE_PRECISION)
    if HAS_DECAY:  # the state's share lam^(i+shift) q_i S, out_scale included
        inter_t = inter_t * (_row_decay(log2_lam, idx, shift) * out_scale)[None, :]
    else:
        inter_t = inter_t * out_scale
    return _dot_acc(inter_t, tl.trans(v), scores_t, DOT_DTYPE, PRECISION)


@triton.jit
def _update_state_t(
    states, v, ks, log2_lam, idx, length, shift, value_scale, HAS_DECAY: tl.constexpr, KEY_PARTS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """``_update_state`` transposed: ``S^T <- lam^(length-1+shift) S^T + (w v)^T k`` with
    ``w = value_scale lam^(length-1-s)``, k entering the product as loaded."""
    if HAS_DECAY:
        weighted_t = tl.trans(v * (_key_decay(log2_lam, idx, length) * value_scale)[:, None])
        decay_chunk = _chunk_decay(log2_lam, length, shift)
    else:
        weighted_t = tl.trans(v * value_scale)
        decay_chunk = 1.0
    updated = ()
    for part in tl.static_range(KEY_PARTS):
        updated = updated + (_dot_acc(states[part] * decay_chunk, weighted_t, ks[part], DOT_DTYPE, PRECISION),)
    return updated


@triton.jit
def _store_state_t(ptr, stride_k, stride_v, states, cols_v, valid_v, DK, KEY_PARTS: tl.constexpr,
                   PART: tl.constexpr):
    """Store S^T's parts into a [Dk, Dv] state (element (i, j) at ``i * stride_k + j * stride_v``)."""
    for part in tl.static_range(KEY_PARTS):
        cols_k = part * PART + tl.arange(0, PART)
        ptrs = ptr + cols_v[:, None] * stride_v + cols_k[None, :] * stride_k
        tl.store(ptrs, states[part], mask=valid_v[:, None] & (cols_k < DK)[None, :])
