"""The decay's gradient from the moment of the state (``launch.decay_gradient``), one pass over
q, k, v and the output's gradient: ``reference.decay_gradient_chunked`` on the GPU.

With ``a = -decay`` (``lam = e^a``) the moment ``M_t = dS_t / da`` obeys
``M_t = lam (M_{t-1} + S_{t-1})``, ``M_{-1} = 0``, and

    dL/d decay = -( scale sum_t <do_t, q_t M_t> + <grad_final, M_{N-1}> ).

A program walks the rows of one sequence (a batch entry, or a packed sequence) for one compute
head and one block of value columns, carrying the pair (S, M) in float32 registers, chunk by chunk
(row i of a chunk, S' and M' the pair before it)::

    share   = sum_(i, j) (q_i . k_j) (i - j) lam^(i-j) [i >= j] (do_i . v_j)
              + sum_i lam^(i+1) <do_i, q_i ((i + 1) S' + M')>
    M_end   = lam^C M' + C lam^C S' + sum_j (C - 1 - j) lam^(C-1-j) k_j^T v_j
    S_end   = lam^C S' + sum_j lam^(C-1-j) k_j^T v_j

The carried share is taken as ``<S', sum_i (i+1) lam^(i+1) q_i^T do_i> + <M', sum_i lam^(i+1) q_i^T
do_i>``, so S' and M' enter in float32 and every product's operands are inputs, one side weighted
(``_weighted_product``). Every weight is >= 0 and no two large sums are subtracted: the float32
sum keeps the precision of its terms at any N (a position-weighted form ``sum_t t (<q_t, dq_t> - <k_t, dk_t>)`` loses it
all). Each program stores one float32 partial; the launcher sums them per head (deterministic).

Long sequences with few heads split the walk into segments (``SEGMENTS`` > 1, dense batches):
``STATES_ONLY`` programs compute each segment's own end pair from (0, 0), the launcher chains
them into each segment's start pair (``launch._segment_moment_starts``), and the walking
programs start from those (``HAS_STARTS``). Packed sequences are cut the same way, each into
segments of its own counted from its first row, on the tables of ``launch._packed_plan`` (``PLAN``;
built on the device, so no length is read on the host): a program per piece entry computes an
own pair, ``_moment_chain_kernel`` chains each sequence's pairs from its initial state, and a
program per segment entry walks. ``PLAN`` is None (a constant) in other launches, dense ones or
packed sequences walked whole, whose code then holds none of its branches. Decay factors are
``lam^e`` with ``e >= 0`` only.
"""

import triton
import triton.language as tl

from .stages import (_block_and_head, _dot, _head, _load_rows, _log2_decay, _packed_piece, _packed_segment,
                     _store_state)


@triton.jit
def _weighted_product(acc, x, y, weight, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    """``acc + x^T (y * weight[:, None])`` (float32): x's and y's rows contracted, y's weighted (the
    value-side tile: BLOCK_V columns, no more than x's Dk). The weighted rows are no longer 16-bit
    numbers: rounded to DOT_DTYPE they lose 2^-9 (bfloat16) each, which at long N moves a head's
    gradient by up to 5e-2. ``SPLIT``: they enter as two DOT_DTYPE terms, ``hi`` and the rest
    ``lo`` (2^-17 for bfloat16), at twice the products; x enters as it is."""
    weighted = y.to(tl.float32) * weight[:, None]
    hi = weighted.to(DOT_DTYPE)
    x_t = tl.trans(x.to(DOT_DTYPE))
    acc = tl.dot(x_t, hi, acc, input_precision=PRECISION)
    if SPLIT:
        lo = (weighted - hi.to(tl.float32)).to(DOT_DTYPE)
        acc = tl.dot(x_t, lo, acc, input_precision=PRECISION)
    return acc


# N and the segment length (N itself where one segment covers it) change with every length: one
# compiled kernel serves them all
@triton.jit(do_not_specialize=["N", "segment_len"])
def _decay_moment_kernel(
    Q, K, V, DO, DECAY, INIT, GRAD_FINAL, CU_SEQLENS, STARTS, PARTIALS,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_ib, stride_ih, stride_ik, stride_iv,
    stride_gb, stride_gh, stride_gk, stride_gv,
    N, H, DK, DV, segment_len, scale, q_group, k_group, v_group, o_group, init_group,
    HAS_INIT: tl.constexpr, HAS_GRAD_FINAL: tl.constexpr, VARLEN: tl.constexpr,
    SEGMENTS: tl.constexpr, STATES_ONLY: tl.constexpr, HAS_STARTS: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    PLAN=None,
):
    """Program (value block and compute head, sequence or batch entry, segment). Without
    ``STATES_ONLY``: stores ``scale sum_t <do_t, q_t M_t>`` over its rows and value columns, plus
    ``<grad_final, M_{N-1}>`` where its rows end the sequence, at ``PARTIALS[((entry * SEGMENTS +
    segment) * H + h) * num_v_blocks + v block]``. ``STATES_ONLY``: stores the segment's own end
    pair (S, M from (0, 0)) at ``STARTS[entry, h, segment, 0 / 1]`` instead. ``HAS_STARTS``: a
    segment after the first starts from ``STARTS[entry, h, segment, 0 / 1]`` (the chained pairs).

    ``PLAN`` (packed sequences cut into segments, with ``VARLEN``): grid axis 2 indexes a table of
    ``launch._packed_plan``, axis 1 has one program. ``STATES_ONLY`` reads its piece table (piece
    p: a segment of a sequence but its last, whose own pair goes to slot p), the walk its segment
    table (sequence, first row, length, index in the sequence, start slot); an entry without a
    segment (-1) returns at once. Pairs lie at ``STARTS[slot, h, 0 / 1]`` ([slots, H, 2, Dk,
    Dv]), partials at ``PARTIALS[(entry_index * H + h) * num_v_blocks + v block]`` (the
    launcher zeroes those of returning programs)."""
    pid_v, bh = _block_and_head(DV, BLOCK_V)
    entry = tl.program_id(1).to(tl.int64)  # batch entry, or packed sequence
    segment = tl.program_id(2)
    num_v_blocks = tl.cdiv(DV, BLOCK_V)
    h = bh % H
    if VARLEN:
        b = 0
        if PLAN is not None:  # segment becomes the index in the sequence, entry the sequence
            if STATES_ONLY:
                entry, first_row, length, segment = _packed_piece(PLAN, tl.program_id(2))
                slot = tl.program_id(2)
            else:
                entry, first_row, length, segment, slot = _packed_segment(PLAN, tl.program_id(2))
            entry = entry.to(tl.int64)
            if entry < 0:
                return
        else:
            # clamped into [0, N]: values no host check read (compiled, captured) stay in the rows
            first_row = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + entry).to(tl.int64), 0), N)
            length = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + entry + 1).to(tl.int64), first_row), N) - first_row
    else:
        b = entry
        first_row = 0
        length = N
    begin = segment * segment_len
    end = tl.minimum(begin + segment_len, length)
    scale = tl.cast(scale, tl.float32)  # a float argument may arrive as fp64 (Inductor)
    q_ptr = _head(Q, b, h // q_group, stride_qb, stride_qh) + first_row * stride_qn
    k_ptr = _head(K, b, h // k_group, stride_kb, stride_kh) + first_row * stride_kn
    v_ptr = _head(V, b, h // v_group, stride_vb, stride_vh) + first_row * stride_vn
    o_ptr = _head(DO, b, h // o_group, stride_ob, stride_oh) + first_row * stride_on
    cols_k = tl.arange(0, BLOCK_K)
    cols_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    valid_k = cols_k < DK
    valid_v = cols_v < DV
    tile_mask = valid_k[:, None] & valid_v[None, :]
    log2_lam = _log2_decay(DECAY, h)

    if PLAN is not None:  # a slot's pairs of all heads side by side: the slot count is not needed
        pair_ptr = STARTS + (slot * H + h) * 2 * DK * DV
    else:
        pair_ptr = STARTS + ((entry * H + h) * SEGMENTS + segment) * 2 * DK * DV
    if HAS_INIT and not STATES_ONLY:
        init_ptr = _head(INIT, entry, h // init_group, stride_ib, stride_ih)
        state = tl.load(init_ptr + cols_k[:, None] * stride_ik + cols_v[None, :] * stride_iv, mask=tile_mask,
                        other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    moment = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    if HAS_STARTS:
        if segment > 0:  # the chained pair (segment 0 starts from the initial state)
            state = tl.load(pair_ptr + cols_k[:, None] * DV + cols_v[None, :], mask=tile_mask, other=0.0)
            moment = tl.load(pair_ptr + DK * DV + cols_k[:, None] * DV + cols_v[None, :], mask=tile_mask, other=0.0)

    idx = tl.arange(0, CHUNK)
    distance = idx[:, None] - idx[None, :]
    steps = tl.maximum(distance, 0).to(tl.float32)
    # W[i, j] = (i - j) lam^(i-j) for i >= j: 0 on the diagonal, so the mask only drops i < j
    pair_weight = tl.where(distance > 0, steps * tl.exp2(log2_lam * steps), 0.0)
    row_weight = tl.exp2(log2_lam * (idx + 1).to(tl.float32))  # lam^(i+1)
    state_weight = row_weight * (idx + 1).to(tl.float32)  # (i + 1) lam^(i+1)
    rows_sum = tl.zeros([CHUNK], dtype=tl.float32)
    # per key column: summing a state tile's rows would cross warps on every chunk
    keys_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(begin, end, CHUNK):
        rows = start + idx
        row_valid = rows < end
        k = _load_rows(k_ptr, stride_kn, stride_kd, rows, row_valid, cols_k, valid_k, N, False)
        v = _load_rows(v_ptr, stride_vn, stride_vd, rows, row_valid, cols_v, valid_v, N, False)
        if not STATES_ONLY:
            q = _load_rows(q_ptr, stride_qn, stride_qd, rows, row_valid, cols_k, valid_k, N, False)
            do = _load_rows(o_ptr, stride_on, stride_od, rows, row_valid, cols_v, valid_v, N, False)
            scores = _dot(q, tl.trans(k), DOT_DTYPE, PRECISION)
            grad_scores = _dot(do, tl.trans(v), DOT_DTYPE, PRECISION)
            rows_sum += tl.sum(scores * pair_weight * grad_scores, 1)
            # the carried pair's share <S', sum_i (i+1) lam^(i+1) q_i^T do_i> + <M', sum_i lam^(i+1) q_i^T do_i>:
            # S' and M' enter in float32, only inputs times weights are operands
            zero = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
            share = _weighted_product(zero, q, do, state_weight, DOT_DTYPE, PRECISION, SPLIT)
            keys_sum += tl.sum(state * share, 1)
            share = _weighted_product(zero, q, do, row_weight, DOT_DTYPE, PRECISION, SPLIT)
            keys_sum += tl.sum(moment * share, 1)
        length_c = tl.minimum(end - start, CHUNK)
        chunk_decay = tl.exp2(log2_lam * length_c.to(tl.float32))  # lam^C
        key_steps = tl.maximum(length_c - 1 - idx, 0).to(tl.float32)
        key_weight = tl.exp2(log2_lam * key_steps)  # lam^(C-1-j); rows past the end are zero
        moment = _weighted_product(moment * chunk_decay + state * (length_c.to(tl.float32) * chunk_decay), k, v,
                                   key_steps * key_weight, DOT_DTYPE, PRECISION, SPLIT)
        state = _weighted_product(state * chunk_decay, k, v, key_weight, DOT_DTYPE, PRECISION, SPLIT)

    if STATES_ONLY:
        _store_state(pair_ptr, DV, 1, state, cols_k, cols_v, tile_mask)
        _store_state(pair_ptr + DK * DV, DV, 1, moment, cols_k, cols_v, tile_mask)
    else:
        total = (tl.sum(rows_sum, 0) + tl.sum(keys_sum, 0)) * scale
        if HAS_GRAD_FINAL:
            if end == length:  # the segment that ends the sequence (an empty one: M = 0)
                grad_ptr = _head(GRAD_FINAL, entry, h, stride_gb, stride_gh)
                grad = tl.load(grad_ptr + cols_k[:, None] * stride_gk + cols_v[None, :] * stride_gv, mask=tile_mask,
                               other=0.0).to(tl.float32)
                total += tl.sum(tl.sum(grad * moment, 1), 0)
        if PLAN is not None:
            tl.store(PARTIALS + (tl.program_id(2) * H + h) * num_v_blocks + pid_v, total)
        else:
            tl.store(PARTIALS + ((entry * SEGMENTS + segment) * H + h) * num_v_blocks + pid_v, total)


@triton.jit
def _moment_chain_kernel(
    DECAY, INIT, STARTS, SEQUENCES,
    stride_ib, stride_ih, stride_ik, stride_iv,
    H, DK, DV, segment_len, init_group,
    HAS_INIT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, STAGES: tl.constexpr,
):
    """In place, per packed sequence: its segments' own end pairs ``(E_m, E'_m)`` (from (0, 0),
    every segment but its last, at its run of slots of ``STARTS`` [slots, H, 2, Dk, Dv]: first
    slot and count from ``SEQUENCES``, ``launch._packed_plan``'s sequence table) become the pairs
    segments 1, 2, ... start from. Segments of L = ``segment_len`` rows compose as

        S_(m+1) = lam^L S_m + E_m,    M_(m+1) = lam^L M_m + L lam^L S_m + E'_m,   (S_0, M_0) = (init, 0)

    One program per block of ``BLOCK_V`` state columns, compute head and sequence walks its slots
    in order in float32: every weight is >= 0 (lam^L with L >= 0), so no sum cancels.
    ``STAGES`` pipelines the slots' loads: each step waits for a multiply-add, not for memory."""
    pid_v, h = _block_and_head(DV, BLOCK_V)
    sequence = tl.program_id(1)
    first_slot = tl.load(SEQUENCES + 5 * sequence).to(tl.int64)
    count = tl.load(SEQUENCES + 5 * sequence + 1)
    cols_k = tl.arange(0, BLOCK_K)
    cols_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    tile_mask = (cols_k < DK)[:, None] & (cols_v < DV)[None, :]
    if HAS_INIT:
        init_ptr = _head(INIT, sequence.to(tl.int64), h // init_group, stride_ib, stride_ih)
        state = tl.load(init_ptr + cols_k[:, None] * stride_ik + cols_v[None, :] * stride_iv, mask=tile_mask,
                        other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    moment = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    length = tl.cast(segment_len, tl.float32)
    lam_length = tl.exp2(_log2_decay(DECAY, h) * length)  # lam^L
    tile = cols_k[:, None] * DV + cols_v[None, :]
    for g in tl.range(0, count, num_stages=STAGES):
        pair_ptr = STARTS + ((first_slot + g) * H + h) * 2 * DK * DV + tile
        own_state = tl.load(pair_ptr, mask=tile_mask, other=0.0)
        own_moment = tl.load(pair_ptr + DK * DV, mask=tile_mask, other=0.0)
        moment = moment * lam_length + state * (length * lam_length) + own_moment
        state = state * lam_length + own_state
        tl.store(pair_ptr, state, mask=tile_mask)
        tl.store(pair_ptr + DK * DV, moment, mask=tile_mask)
