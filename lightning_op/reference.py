"""The semantics of ``lightning::attn`` in plain PyTorch.

For batch ``b``, head ``h`` and decay slope ``s_h >= 0`` (``lam = exp(-s_h)``)::

    S_t = lam * S_{t-1} + k_t^T v_t        S_{-1} = initial_state (or zeros)
    o_t = scale * q_t S_t

and the returned final state is ``S_{N-1}``. Three forms of it live here:

- :func:`attention_quadratic`, the masked-attention form ``scale * ((Q K^T) * M) V`` with
  ``M[t, s] = lam^(t-s) [t >= s]``: the oracle the tests compare against, O(N^2) memory.
- :func:`attention_recurrent`, the token-by-token recurrence above: a second oracle.
- :func:`linear_attention_chunked`, the tiled algorithm of Lightning Attention-2 (masked
  attention inside a chunk, a carried state between chunks) with O(N) memory. It is the CPU
  implementation of the op, forward and backward, and mirrors the Triton kernels line by line.

Every gradient of the op is itself a causal linear attention, running forward or backward in time;
``backends.backward`` composes them from the chunked form (or the kernels).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

__all__ = [
    "attention_quadratic",
    "state_heads",
    "attention_recurrent",
    "linear_attention_chunked",
    "attention_forward_chunked",
    "attention_forward_scan",
    "attention_step",
    "decay_gradient_chunked",
    "decay_mask",
    "slopes",
]


def slopes(num_heads: int, layer_idx: Optional[int] = None, num_layers: Optional[int] = None) -> Tensor:
    """The standard decay slopes: ALiBi's geometric sequence, as used by Lightning Attention.

    For a power-of-two ``num_heads`` H, head h gets ``(2 ** (-8 / H)) ** (h + 1)``. Other head
    counts take the slopes of the nearest lower power of two and fill in with every other slope
    of the next power of two, as ALiBi does. With ``layer_idx`` and ``num_layers`` the slopes are
    scaled per layer as in TransNormerLLM / MiniMax: ``* (1 - layer_idx / (num_layers - 1) + 1e-5)``
    (strong decay in the first layer, almost none in the last).

    Returns a float32 tensor of shape ``[num_heads]``.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"slopes: num_heads must be a positive int, got {num_heads!r}")
    if (layer_idx is None) != (num_layers is None):
        raise ValueError("slopes: pass both layer_idx and num_layers, or neither")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    def geometric(n: int) -> list[float]:
        if math.log2(n).is_integer():
            return power_of_two(n)
        lower = 2 ** math.floor(math.log2(n))
        return power_of_two(lower) + geometric(2 * lower)[0::2][: n - lower]

    result = torch.tensor(geometric(num_heads), dtype=torch.float32)
    if layer_idx is not None:
        if not isinstance(num_layers, int) or num_layers < 2:
            raise ValueError(f"slopes: num_layers must be an int >= 2 for per-layer slopes, got {num_layers!r}")
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < num_layers:
            raise ValueError(f"slopes: layer_idx must be an int in [0, {num_layers}), got {layer_idx!r}")
        result = result * (1.0 - layer_idx / (num_layers - 1) + 1e-5)
    return result


def decay_powers(decay: Optional[Tensor], exponent: Tensor, like: Tensor) -> Tensor:
    """``lam_h ** exponent`` per head, shape ``[H, *exponent.shape]``; exponents must be >= 0.

    ``lam^0 = 1`` also for an infinite decay (lam = 0), where ``-decay * 0`` is NaN."""
    if decay is None:
        return torch.ones((1,) * (exponent.dim() + 1), dtype=like.dtype, device=like.device)
    exponent = exponent.to(like.dtype)
    log_power = -decay.to(like.dtype).reshape(-1, *([1] * exponent.dim())) * exponent
    return torch.exp(torch.where(exponent == 0, 0.0, log_power))


def decay_mask(decay: Optional[Tensor], n: int, *, dtype=torch.float64, device=None) -> Tensor:
    """``M[h, t, s] = lam_h ** (t - s)`` for ``t >= s``, else 0 (``[1, N, N]`` without decay)."""
    idx = torch.arange(n, device=device)
    diff = idx[:, None] - idx[None, :]
    like = torch.empty(0, dtype=dtype, device=device)
    return decay_powers(decay, diff.clamp(min=0), like) * (diff >= 0)


def _chunk_product(scores: Tensor, values: Tensor) -> Tensor:
    """``scores @ values`` for a chunk's causally masked scores ([..., rows, rows], zero above the
    diagonal) without the values of later rows reaching earlier rows through those zeros: ``0 *
    NaN`` is NaN, so garbage in a padding row would spoil the outputs before it. NaN and inf
    values are zeroed in the product, and the outputs they reach (their column, from their row
    on) are NaN. No branch on values: the scan form traces with it."""
    finite = torch.isfinite(values)
    out = scores @ torch.where(finite, values, 0.0)
    reached = (~finite).cumsum(-2) > 0
    return torch.where(reached, float("nan"), out)


def _sequences(cu_seqlens: Optional[Tensor], n: int) -> list[tuple[int, int]]:
    """``(start, end)`` rows of each packed sequence (one sequence of ``n`` rows without ``cu_seqlens``)."""
    if cu_seqlens is None:
        return [(0, n)]
    bounds = [int(x) for x in cu_seqlens.tolist()]
    return list(zip(bounds[:-1], bounds[1:]))


def state_heads(num_heads: int, num_kv_heads: int, decay: Optional[Tensor]) -> int:
    """Heads of the states: one per query head, except that grouped query heads (fewer kv heads)
    share one state per kv head unless the decay differs between the heads of a group (``[H]``)."""
    if num_kv_heads == num_heads or (decay is not None and decay.shape[0] == num_heads):
        return num_heads
    return num_kv_heads


def attention_quadratic(q, k, v, decay=None, scale=1.0, initial_state=None, cu_seqlens=None):
    """``o = scale * ((Q K^T) * M) V + scale * lam^(t+1) q_t S_{-1}``, computed in q's dtype.

    Grouped heads: k, v may have ``Hkv`` heads, a divisor of q's ``H``; query head h reads kv head
    ``h // (H // Hkv)``. With a decay ``[H]`` each query head has its own state (the result of
    repeating k and v); with ``[Hkv]`` or None the query heads of a group share one (see
    :func:`state_heads`). Packed sequences: with ``cu_seqlens`` (``[S + 1]``, from 0 to N) the
    batch is 1 and the N rows hold S sequences; no state crosses a boundary, and the initial and
    final states are ``[S, Hs, Dk, Dv]``.

    Returns ``(out, final_state)``. Differentiable in every tensor, the decay included. Memory is
    O(N^2): an oracle for tests, not for use.
    """
    h, hkv = q.shape[1], k.shape[1]
    group = h // hkv
    shared = state_heads(h, hkv, decay) < h
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        if decay is not None and decay.shape[0] == hkv:
            decay = decay.repeat_interleave(group)
        if initial_state is not None and shared:
            initial_state = initial_state.repeat_interleave(group, 1)
    outs, finals = [], []
    for index, (start, end) in enumerate(_sequences(cu_seqlens, q.shape[2])):
        init = None
        if initial_state is not None:
            init = initial_state[index:index + 1] if cu_seqlens is not None else initial_state
        out, final = _quadratic(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], decay, scale, init)
        outs.append(out)
        finals.append(final[:, ::group] if shared else final)  # a group's heads hold the same state
    return torch.cat(outs, 2), torch.cat(finals, 0)


def _quadratic(q, k, v, decay, scale, initial_state):
    n = q.shape[2]
    mask = decay_mask(decay, n, dtype=q.dtype, device=q.device)
    out = scale * (((q @ k.transpose(-1, -2)) * mask) @ v)
    positions = torch.arange(n, device=q.device)
    # weight of token s in the final state: lam^(N-1-s)
    key_weight = decay_powers(decay, (n - 1 - positions), q)[..., None]
    final = (k * key_weight).transpose(-1, -2) @ v
    if initial_state is not None:
        state = initial_state.to(q.dtype)
        out = out + scale * (q * decay_powers(decay, positions + 1, q)[..., None]) @ state
        final = final + decay_powers(decay, torch.tensor([n], device=q.device), q)[..., None] * state
    return out, final


def attention_recurrent(q, k, v, decay=None, scale=1.0, initial_state=None, cu_seqlens=None):
    """The recurrence ``S_t = lam S_{t-1} + k_t^T v_t, o_t = scale q_t S_t``, one token at a time,
    with the grouped heads and packed sequences of :func:`attention_quadratic` (written apart from
    it: query head h reads state ``h // (H // Hs)``)."""
    b, h, n, dk = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    hs = state_heads(h, hkv, decay)
    kv_of_state = torch.arange(hs, device=q.device) // (hs // hkv)  # the kv head each state accumulates
    state_of_query = torch.arange(h, device=q.device) // (h // hs)  # the state each query head reads
    lam = torch.ones(hs, dtype=q.dtype, device=q.device)
    if decay is not None:
        lam = torch.exp(-decay.to(q.dtype))[torch.arange(hs, device=q.device) * decay.shape[0] // hs]
    lam = lam.reshape(1, hs, 1, 1)
    outs, finals = [], []
    for index, (start, end) in enumerate(_sequences(cu_seqlens, n)):
        state = torch.zeros(b, hs, dk, dv, dtype=q.dtype, device=q.device)
        if initial_state is not None:
            state = (initial_state[index:index + 1] if cu_seqlens is not None else initial_state).to(q.dtype)
        for t in range(start, end):
            state = lam * state + k[:, kv_of_state, t, :, None] * v[:, kv_of_state, t, None, :]
            outs.append(scale * (q[:, :, t, None, :] @ state[:, state_of_query]))
        finals.append(state)
    out = torch.cat(outs, dim=2) if outs else q.new_empty(b, h, 0, dv)
    return out, torch.cat(finals, 0)


def _head_index(x: Tensor, heads: int, device) -> Optional[Tensor]:
    """Which of ``x``'s heads each of ``heads`` compute heads reads (None when they are the same)."""
    if x.shape[1] == heads:
        return None
    return torch.arange(heads, device=device) // (heads // x.shape[1])


def linear_attention_chunked(
    query: Tensor, key: Tensor, value: Tensor, decay: Optional[Tensor] = None, *, out_scale: float = 1.0,
    value_scale: float = 1.0, initial_state: Optional[Tensor] = None, reverse: bool = False, init_shift: int = 1,
    store_final: bool = True, chunk_size: int = 64, cu_seqlens: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """The general causal linear attention that both the op and its gradients are instances of.

    Visiting positions in order ``t = 0 .. N-1`` (or ``N-1 .. 0`` when ``reverse``)::

        S_first = lam^init_shift * initial_state + key^T (value_scale * value)   (first visited)
        S_t     = lam * S_prev + key_t^T (value_scale * value_t)                  (later ones)
        out_t   = out_scale * query_t S_t

    ``init_shift = 1`` is the op's convention (the initial state is the state *before* the first
    token); ``init_shift = 0`` is the gradients' (the state already sits at the first token).

    Grouped heads: query, key and value may have different head counts, each dividing the largest,
    H (the compute heads); compute head h reads head ``h // (H // X.shape[1])`` of tensor X, and
    of ``initial_state`` the same way. decay is ``[H]``; the output and final state have H heads.
    Packed sequences: with ``cu_seqlens`` (``[S + 1]``, from 0 to N, batch 1) each sequence runs
    on its own, from ``initial_state[s]``, and the final state is ``[S, H, Dk, Dv]``.

    Tiled as in Lightning Attention-2: within a chunk of ``chunk_size`` positions, masked
    attention ``((Q K^T) * M) V``; across chunks, the carried state. Every decay factor is a power
    ``lam^e`` with ``e >= 0``, so strong decays underflow to zero instead of overflowing.
    Computes in float32 (float64 for float64 inputs); returns ``(out, final_state)`` with out in
    query's dtype and the final state in the compute dtype (None unless ``store_final``; the
    kernels can then skip the write). The op's gradients are instances of it too
    (``backends.backward``).
    """
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    b, _, n, dk = query.shape
    h = max(query.shape[1], key.shape[1], value.shape[1])
    dv = value.shape[-1]
    device = query.device
    q, k, v = (x.to(compute) for x in (query, key, value))
    if reverse:
        q, k, v = (x.flip(2) for x in (q, k, v))
    heads = [_head_index(x, h, device) for x in (q, k, v)]
    init_heads = None if initial_state is None else _head_index(initial_state, h, device)
    out = torch.empty(b, h, n, dv, dtype=compute, device=device)
    zero = torch.zeros((), dtype=compute, device=device)
    factors: dict[tuple[int, int], tuple[Tensor, ...]] = {}  # every full chunk shares its decay factors

    def chunk_factors(length: int, shift: int) -> tuple[Tensor, ...]:
        if (length, shift) not in factors:
            idx = torch.arange(length, device=device)
            factors[length, shift] = (
                decay_mask(decay, length, dtype=compute, device=device),  # M[i, s] = lam^(i-s)
                decay_powers(decay, idx + shift, zero)[..., None],  # query weight lam^(i+shift)
                decay_powers(decay, length - 1 - idx, zero)[..., None],  # key weight lam^(length-1-s)
                decay_powers(decay, torch.tensor([length - 1 + shift], device=device), zero)[..., None],
            )
        return factors[length, shift]

    def rows_of(x: Tensor, index: Optional[Tensor], rows: slice) -> Tensor:
        return x[:, :, rows] if index is None else x[:, index, rows]  # a chunk's rows: a copy at most

    finals = []
    for seq_index, (seq_start, seq_end) in enumerate(_sequences(cu_seqlens, n)):
        if reverse:  # the sequences of the flipped rows: the last one first
            seq_start, seq_end = n - seq_end, n - seq_start
        state = torch.zeros(b, h, dk, dv, dtype=compute, device=device)
        if initial_state is not None:
            init = initial_state if cu_seqlens is None else initial_state[seq_index:seq_index + 1]
            init = init if init_heads is None else init[:, init_heads]
            state = init.to(compute).clone(memory_format=torch.contiguous_format)
        for start in range(seq_start, seq_end, chunk_size):
            length = min(chunk_size, seq_end - start)
            rows = slice(start, start + length)
            q_c, k_c, v_c = (rows_of(x, index, rows) for x, index in zip((q, k, v), heads))
            mask, query_weight, key_weight, carried = chunk_factors(length, init_shift if start == seq_start else 1)
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            scores = torch.where(causal, (q_c @ k_c.transpose(-1, -2)) * mask, 0.0)
            o = value_scale * _chunk_product(scores, v_c)
            o = o + (q_c * query_weight) @ state
            out[:, :, rows] = out_scale * o
            state = carried * state + value_scale * ((k_c * key_weight).transpose(-1, -2) @ v_c)
        finals.append(state)
    if reverse:
        out = out.flip(2)
    final = None
    if store_final:
        final = torch.cat(finals, 0) if cu_seqlens is not None else finals[0]
        if cu_seqlens is not None and not finals:
            final = torch.zeros(0, h, dk, dv, dtype=compute, device=device)
    return out.to(query.dtype), final


def decay_gradient_chunked(
    query: Tensor, key: Tensor, value: Tensor, grad_out: Tensor, decay: Tensor, *, scale: float = 1.0,
    initial_state: Optional[Tensor] = None, grad_final: Optional[Tensor] = None, chunk_size: int = 64,
    cu_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """``dL/d decay`` of the op per compute (query) head, from the moment of the state: no sum in
    it cancels. Returns ``[H]`` in the compute dtype (float32, float64 for float64 inputs).

    With ``a = -decay`` (``lam = e^a``) and ``S_t = lam S_{t-1} + k_t^T v_t`` (``S_{-1}`` the
    initial state, or zeros), the moment ``M_t = dS_t / da`` is::

        M_t = sum_{s <= t} (t - s) lam^(t-s) k_s^T v_s + (t + 1) lam^(t+1) S_{-1}
            = lam (M_{t-1} + S_{t-1}),   M_{-1} = 0

    and since ``o_t = scale q_t S_t`` and the final state is ``S_{N-1}``::

        dL/d decay = -( scale sum_t <do_t, q_t M_t> + <grad_final, M_{N-1}> )

    In chunks of C rows (row i of a chunk, 0-based; S', M' the pair before the chunk)::

        q_i M_(c+i) = sum_{j <= i} (i - j) lam^(i-j) (q_i . k_j) v_j + lam^(i+1) q_i ((i + 1) S' + M')
        M_end = lam^C M' + C lam^C S' + sum_j (C - 1 - j) lam^(C-1-j) k_j^T v_j
        S_end = lam^C S' + sum_j lam^(C-1-j) k_j^T v_j

    so the chunk's share is ``sum((Q K^T) * W * (dO V^T))`` with ``W[i, j] = (i - j) lam^(i-j)``
    for ``i >= j`` (else 0) plus the carried rows. Every weight is >= 0 and every exponent too.

    Heads and sequences as in :func:`linear_attention_chunked`: key, value and ``initial_state``
    are read per compute head (head ``h // (H // X.shape[1])``), ``decay`` and ``grad_final`` are
    per compute head (``[H]``, ``[B or S, H, Dk, Dv]``); with ``cu_seqlens`` each sequence starts
    from its own initial state, its rows counted from its start (an empty one adds nothing).
    O(N) memory: one chunk's scores at a time.
    """
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    b, h, n, dk = query.shape
    dv = value.shape[-1]
    device = query.device
    q, k, v, do = (x.to(compute) for x in (query, key, value, grad_out))
    heads = [_head_index(x, h, device) for x in (q, k, v, do)]
    init_heads = None if initial_state is None else _head_index(initial_state, h, device)
    zero = torch.zeros((), dtype=compute, device=device)
    outputs = torch.zeros(b, h, dtype=compute, device=device)  # scale sum_t <do_t, q_t M_t>, summed below
    finals = torch.zeros(b, h, dtype=compute, device=device)  # <grad_final, M_{N-1}>

    def rows_of(x: Tensor, index: Optional[Tensor], rows: slice) -> Tensor:
        return x[:, :, rows] if index is None else x[:, index, rows]

    for seq_index, (seq_start, seq_end) in enumerate(_sequences(cu_seqlens, n)):
        state = torch.zeros(b, h, dk, dv, dtype=compute, device=device)
        if initial_state is not None:
            init = initial_state if cu_seqlens is None else initial_state[seq_index:seq_index + 1]
            state = (init if init_heads is None else init[:, init_heads]).to(compute)
        moment = torch.zeros_like(state)
        for start in range(seq_start, seq_end, chunk_size):
            length = min(chunk_size, seq_end - start)
            rows = slice(start, start + length)
            q_c, k_c, v_c, do_c = (rows_of(x, index, rows) for x, index in zip((q, k, v, do), heads))
            idx = torch.arange(length, device=device)
            distance = idx[:, None] - idx[None, :]
            pair_weight = decay_mask(decay, length, dtype=compute, device=device) * distance.clamp(min=0)
            scores = (q_c @ k_c.transpose(-1, -2)) * pair_weight * (do_c @ v_c.transpose(-1, -2))
            row_weight = decay_powers(decay, idx + 1, zero)[..., None]  # lam^(i+1)
            carried = (q_c * ((idx + 1)[:, None] * row_weight)) @ state + (q_c * row_weight) @ moment
            outputs += scale * (scores.sum((-1, -2)) + (carried * do_c).sum((-1, -2)))
            chunk_decay = decay_powers(decay, torch.tensor([length], device=device), zero)[..., None]
            steps = (length - 1 - idx)[:, None]
            key_weight = decay_powers(decay, length - 1 - idx, zero)[..., None]  # lam^(C-1-j)
            moment = (chunk_decay * moment + length * chunk_decay * state
                      + (k_c * (steps * key_weight)).transpose(-1, -2) @ v_c)
            state = chunk_decay * state + (k_c * key_weight).transpose(-1, -2) @ v_c
        if grad_final is not None:
            grad = grad_final if cu_seqlens is None else grad_final[seq_index:seq_index + 1]
            finals += (grad.to(compute) * moment).sum((-1, -2))
    return -(outputs + finals).sum(0)


def attention_forward_chunked(q, k, v, decay=None, scale=1.0, initial_state=None, chunk_size=64):
    """The op's forward: ``(out, final_state)`` with a float32 (float64 for float64 input) state."""
    return linear_attention_chunked(
        q, k, v, decay, out_scale=scale, initial_state=initial_state, chunk_size=chunk_size
    )


#: Doubling steps of :func:`attention_forward_scan` when the chunk count is symbolic: enough for
#: 2**26 chunks (2**32 tokens at 64 per chunk); a step whose shift passes the last chunk adds zeros.
SCAN_STEPS_SYMBOLIC = 26


class _Pieces(NamedTuple):
    """Where :func:`attention_forward_scan` puts the rows: P pieces of C slots, each piece holding
    rows of one sequence only, every sequence ending at the last slot of its last piece (so it is
    zero-padded at the front of its first piece). All index tensors, sized by shapes alone."""

    count: Any  # P (an int, or a SymInt when traced)
    source: Tensor  # [P * C]: 1 + the row each slot holds, 0 for a padding slot (row 0 of the padded input)
    offset: Tensor  # [P, C]: each slot's position in its sequence (negative in the padding)
    slot_of_row: Tensor  # [N]: where each row sits
    sequence: Optional[Tensor]  # [P]: each piece's sequence (S for surplus pieces); None for one sequence
    last: Tensor  # [S']: the last piece of each sequence (S' = S, or 1 without cu_seqlens)
    length: Tensor  # [S']: each sequence's length
    has_rows: Optional[Tensor]  # [S']: whether each sequence has rows (None without cu_seqlens)


def _scan_pieces(cu_seqlens: Optional[Tensor], n, chunk_size: int, device) -> _Pieces:
    """The pieces of :func:`attention_forward_scan`. Without ``cu_seqlens``, the N rows (of every
    batch entry) are one sequence in ``ceil(max(N, 1) / C)`` pieces, the first padded at the front
    (as many pieces as chunks; one all-padding piece when N = 0, so the final state has a piece to
    be read from). With it, sequence s of ``n_s`` rows gets ``ceil(n_s / C)`` pieces of its own
    (none when empty), in order; P = ceil(N / C) + S bounds their sum from the shapes alone, and
    the surplus pieces hold padding only. Nothing is read on the host."""
    c = chunk_size
    if cu_seqlens is None:
        count = (torch.sym_max(n, 1) + c - 1) // c
        pad = count * c - n
        offset = torch.arange(count * c, device=device) - pad
        return _Pieces(count, torch.where(offset >= 0, offset + 1, 0), offset.view(count, c),
                       torch.arange(n, device=device) + pad, None, torch.full((1,), count - 1, device=device),
                       torch.full((1,), n, device=device), None)
    bounds = cu_seqlens.to(torch.int64)
    num_sequences = bounds.shape[0] - 1
    starts, lengths = bounds[:-1], bounds.diff()
    piece_ends = ((lengths + c - 1) // c).cumsum(0)  # one past each sequence's last piece
    shift = piece_ends * c - lengths  # the slot of each sequence's first row
    count = (n + c - 1) // c + num_sequences
    sequence = torch.searchsorted(piece_ends, torch.arange(count, device=device), right=True)  # S: surplus
    owner = sequence.clamp(max=num_sequences - 1)  # a sequence to index with (surplus pieces are masked)
    offset = torch.arange(count * c, device=device).view(count, c) - shift[owner][:, None]
    real = (offset >= 0) & (sequence < num_sequences)[:, None]
    source = torch.where(real, starts[owner][:, None] + offset + 1, 0).flatten()
    rows = torch.arange(n, device=device)
    row_sequence = torch.searchsorted(bounds, rows, right=True) - 1  # the non-empty sequence holding each row
    slot_of_row = rows - starts[row_sequence] + shift[row_sequence]
    return _Pieces(count, source, offset, slot_of_row, sequence, (piece_ends - 1).clamp(min=0), lengths, lengths > 0)


def attention_forward_scan(q, k, v, decay=None, scale=1.0, initial_state=None, chunk_size=64, cu_seqlens=None):
    """The op's forward with no Python control flow on N, so it traces with a symbolic length
    (torch.export, AOTInductor) into ATen ops: what ``lightning::attn_inference`` runs off the GPU.
    Grouped heads and packed sequences (``cu_seqlens``, then with a symbolic number of sequences
    too) as in :func:`attention_quadratic`.

    The same tiling as :func:`linear_attention_chunked`, with its loop over chunks replaced by a
    prefix scan. The rows go to pieces of C = ``chunk_size`` slots (:func:`_scan_pieces`): each
    sequence is zero-padded at the front to whole pieces (zero keys and values add nothing, and
    its last piece ends at its last row), so a piece never holds two sequences and needs no
    boundary mask. Per piece p, with U_p its own state ``sum_i lam^(C-1-i) k_i^T v_i``, the state
    after it is ``P_p = sum_{p' <= p, same sequence} lam^(C(p-p')) U_p'``, computed by doubling
    (``P_p += lam^(C s) P_(p-s)`` for s = 1, 2, 4, ..., where p - s is of p's sequence: the
    factor between pieces of two sequences is 0); a piece starts from ``P_(p-1)`` of its sequence.
    The initial state enters in closed form: ``scale * lam^(t+1) q_t S_(-1)`` for row t of its
    sequence and ``lam^n S_(-1)``. Every exponent is >= 0, as elsewhere.

    Grouped heads: a kv head's query heads are rows of one product with its keys, and states
    are computed once per state head (``state_heads``), not per query head. Memory is one state
    per piece (O((N / C + S) Dk Dv) per state head), more than the loop's, and the scan costs
    log2(pieces) passes over them. Returns ``(out in q's dtype, final state in the compute dtype)``.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, n, dk = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    hs = state_heads(h, hkv, decay)
    group, state_group = h // hkv, hs // hkv  # query heads and state heads per kv head
    reading = group // state_group  # query heads reading each state
    c = chunk_size
    device = q.device
    zero = torch.zeros((), dtype=compute, device=device)
    pieces = _scan_pieces(cu_seqlens, n, c, device)
    p = pieces.count
    # state-shaped tensors are [B, Hkv, P, state_group, Dk, Dv]; query rows [B, Hkv, P, state_group, reading * C, Dk]

    def powers(exponent):  # lam^exponent as [Hkv (or 1), state_group (or 1), *exponent.shape]
        weight = decay_powers(decay, exponent, zero)
        return weight.reshape(1, 1, *weight.shape[1:]) if decay is None else weight.unflatten(0, (hkv, state_group))

    def per_state(weight):  # [Hkv', Gs', X] -> [1, Hkv', X, Gs', 1, 1], to multiply states
        return weight.permute(0, 2, 1)[None, :, :, :, None, None]

    def in_pieces(x):  # [B, X, N, D] -> [B, X, P, C, D]: slot j holds row source[j] - 1, or zeros
        x = torch.nn.functional.pad(x.to(compute), (0, 0, 1, 0))
        return x.index_select(2, pieces.source).unflatten(2, (p, c))

    def of_sequences(state):  # [B or S, Hs, Dk, Dv] -> [B or 1, Hkv, 1 or S, Gs, Dk, Dv]
        state = state.to(compute).reshape(-1, hkv, state_group, dk, dv)
        return state[:, :, None] if cu_seqlens is None else state.transpose(0, 1)[None]

    def linked(source):  # [P] bool: piece source (< p) of the same sequence as p
        same = source >= 0
        if pieces.sequence is not None:
            same = same & (pieces.sequence.index_select(0, source.clamp(min=0)) == pieces.sequence)
        return same[:, None, None, None]

    q_p = in_pieces(q).unflatten(1, (hkv, state_group, reading)).permute(0, 1, 4, 2, 3, 5, 6).contiguous()
    k_p, v_p = in_pieces(k), in_pieces(v)  # [B, Hkv, P, C, D]
    idx = torch.arange(c, device=device)

    def weighted_rows(weight):  # q_p * weight ([Hkv', P or 1, Gs', C]) as [B, Hkv, P, Gs, reading * C, Dk]
        return (q_p * weight[None, :, :, :, None, :, None]).flatten(4, 5)

    mask = decay_mask(decay, c, dtype=compute, device=device)
    mask = mask.reshape(-1, 1 if decay is None else state_group, 1, c, c)[None, :, None]  # [1, Hkv', 1, Gs', 1, C, C]
    causal = idx[:, None] >= idx[None, :]
    scores = (q_p.flatten(3, 5) @ k_p.transpose(-1, -2)).view(b, hkv, p, state_group, reading, c, c)
    scores = torch.where(causal, scores * mask, 0.0).flatten(3, 4)  # [B, Hkv, P, group, C, C]
    out = _chunk_product(scores, v_p[:, :, :, None])  # [B, Hkv, P, group, C, Dv]
    key_weight = powers(c - 1 - idx)[None, :, None, :, :, None]  # [1, Hkv', 1, Gs', C, 1]
    own = (k_p[:, :, :, None] * key_weight).transpose(-1, -2) @ v_p[:, :, :, None]  # U_p

    piece_ids = torch.arange(p, device=device)
    steps = SCAN_STEPS_SYMBOLIC if isinstance(p, torch.SymInt) else max(0, p - 1).bit_length()
    after = own  # P_p
    for step in range(steps):
        shift = 1 << step
        source = piece_ids - shift
        weight = per_state(powers(torch.tensor([c * shift], device=device)))
        earlier = after.index_select(2, source.clamp(min=0))
        # where, not a zero weight: a NaN state must not reach pieces it does not precede
        after = after + torch.where(linked(source), weight * earlier, 0.0)
    source = piece_ids - 1
    before = torch.where(linked(source), after.index_select(2, source.clamp(min=0)), 0.0)
    query_weight = powers(idx + 1)[:, None]  # [Hkv', 1, Gs', C]
    out = out + (weighted_rows(query_weight) @ before).unflatten(4, (reading, c)).flatten(3, 4)

    final = after.index_select(2, pieces.last)  # [B, Hkv, S', Gs, Dk, Dv]
    if pieces.has_rows is not None:  # an empty sequence's last piece is another sequence's
        final = torch.where(pieces.has_rows[:, None, None, None], final, 0.0)
    if initial_state is not None:
        state = of_sequences(initial_state)
        if cu_seqlens is not None:  # each piece reads its sequence's (surplus pieces: the last one's, unused)
            state = state.index_select(2, pieces.sequence.clamp(max=state.shape[2] - 1))
        # [Hkv', P, Gs', C]: lam^(t+1) for row t of its sequence; padding slots (zero q) clamped to lam^0
        row_weight = powers((pieces.offset + 1).clamp(min=0)).transpose(1, 2)
        out = out + (weighted_rows(row_weight) @ state).unflatten(4, (reading, c)).flatten(3, 4)
        final = final + per_state(powers(pieces.length)) * of_sequences(initial_state)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, h, p * c, dv).index_select(2, pieces.slot_of_row)
    return (scale * out).to(q.dtype), final.transpose(1, 2).reshape(-1, hs, dk, dv).contiguous()


def attention_step(q, k, v, state, decay=None, scale=1.0):
    """The decode step: the recurrence over the T given tokens from ``state``, which is updated in
    place to the state after the last token. Computes in ``state``'s dtype (float32); returns
    ``[B, H, T, Dv]`` in q's dtype. Same result as the op with ``initial_state=state``."""
    h = q.shape[1]
    lam = None if decay is None else torch.exp(-decay.to(state.dtype)).reshape(1, h, 1, 1)
    outs = []
    for t in range(q.shape[2]):
        if lam is not None:
            state.mul_(lam)
        state.add_(k[:, :, t, :, None].to(state.dtype) * v[:, :, t, None, :].to(state.dtype))
        outs.append(scale * (q[:, :, t, None, :].to(state.dtype) @ state))
    if not outs:
        return q.new_empty(q.shape[0], h, 0, v.shape[-1])
    return torch.cat(outs, dim=2).to(q.dtype)
