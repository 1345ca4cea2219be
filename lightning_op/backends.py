"""The two backends the op runs on, behind one interface, and the backward composed once from them.

A backend is a general causal linear attention (``reference.linear_attention_chunked``'s
arguments) and, optionally, a fused pass for the two gradients that run backward in time:

- :func:`chunked`: the chunked PyTorch form of ``reference.py`` (CPU tensors);
- :func:`triton`: the Triton kernels (CUDA tensors, or CPU tensors through Triton's interpreter).

Every gradient of the op is itself such a linear attention (:func:`backward`); this module is the
one place that composes them, and chooses between the fused dk / dv pass and two linear attentions.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Optional

import torch
from torch import Tensor

from . import reference
from ._layout import empty_bhnd

__all__ = ["Backend", "chunked", "triton", "forward", "key_value_gradients", "backward"]


@dataclasses.dataclass(frozen=True)
class Backend:
    """``linear_attention(query, key, value, decay, *, out_scale, value_scale, initial_state,
    reverse, init_shift, store_final, out_bnhd, start_states, keep_start_states)`` returns
    ``(out, final state or None)``; the last three are the kernels' layout and segment-state
    options, which a backend may ignore. ``step`` is the decode step. ``fused_key_value_gradients`` (or None) computes
    :func:`key_value_gradients` in one pass where ``fused_fits(dk, dv, itemsize)``. ``row_dots``:
    ``linear_attention`` also takes ``row_dot_with`` and ``row_dots`` (``kernels.linear_attention``:
    each output row's dot product with a second tensor, from the unrounded row), and the fused
    pass ``key_row_dots`` (``kernels.key_value_gradients``: each dk row's with k's).
    ``boundary_states`` (or None): ``kernels.boundary_states``'s arguments and result."""

    name: str
    linear_attention: Callable
    step: Callable  # reference.attention_step's arguments: the decode step, updating the state in place
    fused_key_value_gradients: Optional[Callable] = None
    fused_fits: Callable[[int, int, int], bool] = lambda dk, dv, itemsize: False
    fused_forms: bool = False  # whether the fused pass takes grouped heads and packed sequences
    row_dots: bool = False
    boundary_states: Optional[Callable] = None


@functools.lru_cache(maxsize=None)
def chunked(chunk_size: int = 64) -> Backend:
    """The chunked PyTorch form, in chunks of ``chunk_size`` positions."""

    def linear_attention(query, key, value, decay=None, *, out_bnhd=False, start_states=None, keep_start_states=None,
                         **arguments):
        out, final = reference.linear_attention_chunked(query, key, value, decay, chunk_size=chunk_size, **arguments)
        if out_bnhd:  # the layout asked for, as the kernels store it (the op's fake reports it)
            out = empty_bhnd(out.shape, out.dtype, out.device, True).copy_(out)
        return out, final

    return Backend(f"chunked({chunk_size})", linear_attention, reference.attention_step)


@functools.lru_cache(maxsize=None)
def triton() -> Backend:
    """The Triton kernels (imported on first use: they need triton installed)."""
    from . import kernels

    native = "cu_seqlens" in inspect.signature(kernels.linear_attention).parameters
    linear_attention = kernels.linear_attention if native else _per_sequence(kernels.linear_attention)
    return Backend("triton", linear_attention, kernels.decode_step, kernels.key_value_gradients,
                   kernels.fused_backward_fits, fused_forms=native, row_dots=native,
                   boundary_states=kernels.boundary_states)


def _per_sequence(linear_attention: Callable) -> Callable:
    """Grouped heads and packed sequences for a ``linear_attention`` without them: k and v (and
    any tensor with fewer heads) repeated over the groups, one call per sequence (reading
    ``cu_seqlens`` on the host)."""

    def call(query, key, value, decay=None, *, initial_state=None, cu_seqlens=None, out_bnhd=False,
             store_final=True, start_states=None, keep_start_states=None, **arguments):
        h = max(query.shape[1], key.shape[1], value.shape[1])

        def widen(x):
            return x if x is None or x.shape[1] == h else x.repeat_interleave(h // x.shape[1], 1)

        query, key, value, initial_state = (widen(x) for x in (query, key, value, initial_state))
        if cu_seqlens is None:
            return linear_attention(query, key, value, decay, initial_state=initial_state, out_bnhd=out_bnhd,
                                    store_final=store_final, start_states=start_states,
                                    keep_start_states=keep_start_states, **arguments)
        out = empty_bhnd((1, h, query.shape[2], value.shape[3]), query.dtype, query.device, out_bnhd)
        finals = []
        bounds = cu_seqlens.tolist()
        for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            init = None if initial_state is None else initial_state[index:index + 1]
            piece, final = linear_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], decay,
                                            initial_state=init, store_final=store_final, **arguments)
            out[:, :, start:end] = piece
            finals.append(final)
        if not store_final:
            return out, None
        if not finals:
            return out, torch.zeros(0, h, key.shape[3], value.shape[3], dtype=torch.float32, device=query.device)
        return out, torch.cat(finals, 0)

    return call


def compute_decay(decay: Optional[Tensor], num_heads: int) -> Optional[Tensor]:
    """The decay per compute (query) head: a ``[Hkv]`` decay repeated over each group's heads."""
    if decay is None or decay.shape[0] == num_heads:
        return decay
    return decay.repeat_interleave(num_heads // decay.shape[0])


def forward(backend: Backend, q: Tensor, k: Tensor, v: Tensor, decay: Optional[Tensor], scale: float,
            initial_state: Optional[Tensor], *, keep_start_states: Optional[list] = None,
            cu_seqlens: Optional[Tensor] = None, out_bnhd: bool = False) -> tuple[Tensor, Tensor]:
    """The op: ``(out in q's dtype, final state)``, the state float32 (float64 for float64 inputs).
    ``keep_start_states``: see ``kernels.linear_attention``; ``out_bnhd`` stores out as [B, N, H, Dv].

    Grouped heads run per query head (the backends read a kv head for each, no copy of k or v);
    where a group shares its state (``reference.state_heads``) its heads compute the same state,
    and the group's first one is returned."""
    h = q.shape[1]
    extra = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens)
    out, final = backend.linear_attention(q, k, v, compute_decay(decay, h), out_scale=scale,
                                          initial_state=initial_state, keep_start_states=keep_start_states,
                                          out_bnhd=out_bnhd, **extra)
    state_heads = reference.state_heads(h, k.shape[1], decay)
    if state_heads < h:
        final = final[:, :: h // state_heads].contiguous()
    return out, final
def key_value_gradients(
    backend: Backend, grad_out: Tensor, grad_final_state: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
    decay: Optional[Tensor] = None, scale: float = 1.0, *, store_final: bool = False, out_bnhd: bool = False,
    cu_seqlens: Optional[Tensor] = None, key_row_dots: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(dk, dv, dS_0 or None)``: the two gradients that run backward in time, both driven by
    ``dS_t = lam dS_{t+1} + scale q_t^T do_t`` (``dS_{N-1}`` also receiving ``grad_final_state``)::

        dk_t = dS_t^T v_t   -> query v, key do, value scale*q, state dS^T
        dv_t = k_t dS_t     -> query k, key q, value scale*do, state dS

    In one fused pass where the backend has one that takes these head dims (and these forms),
    else as two linear attentions. ``dS_0`` (the gradient reaching the first token's state, per
    sequence) when ``store_final``. Grouped heads: dk and dv per query head (``decay`` is too).

    ``key_row_dots`` (float32 [B, H, N], on a backend with ``row_dots``): receives ``<k_t, dk_t>``
    per query head, from dk's rows before they are rounded, in the fused pass or in dk's linear
    attention.
    """
    extra = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens)
    if backend.fused_key_value_gradients is not None and backend.fused_fits(
            q.shape[-1], v.shape[-1], q.element_size()) and (
            backend.fused_forms or (cu_seqlens is None and k.shape[1] == q.shape[1])):
        if key_row_dots is not None:
            extra["key_row_dots"] = key_row_dots
        return backend.fused_key_value_gradients(grad_out, grad_final_state, q, k, v, decay, scale,
                                                 store_final=store_final, out_bnhd=out_bnhd, **extra)
    gfin_t = None if grad_final_state is None else grad_final_state.transpose(-1, -2)
    dots = {} if key_row_dots is None else dict(row_dot_with=k, row_dots=key_row_dots)
    dk, _ = backend.linear_attention(
        v, grad_out, q, decay, value_scale=scale, initial_state=gfin_t, reverse=True, init_shift=0,
        store_final=False, out_bnhd=out_bnhd, **dots, **extra,
    )
    dv, ds0 = backend.linear_attention(
        k, q, grad_out, decay, value_scale=scale, initial_state=grad_final_state, reverse=True, init_shift=0,
        store_final=store_final, out_bnhd=out_bnhd, **extra,
    )
    return dk, dv, ds0


def backward(
    backend: Backend, grad_out: Tensor, grad_final_state: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
    decay: Optional[Tensor] = None, scale: float = 1.0, initial_state: Optional[Tensor] = None, *,
    out_bnhd: bool = False, forward_states=None, cu_seqlens: Optional[Tensor] = None, decay_grad: bool = False,
    decay_block: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(dq, dk, dv, d_initial_state, d_decay)`` of the op, each but the last a linear
    attention itself.

    With ``dS_t`` the gradient reaching state ``S_t`` (see :func:`key_value_gradients`)::

        dq_t = scale * do_t S_t^T      -> forward in time: query do, key v, value k, state S_{-1}^T
        dk_t, dv_t                     -> backward in time (key_value_gradients)
        d S_{-1} = lam * dS_0

    ``d_initial_state`` is None when ``initial_state`` is None, ``d_decay`` (float32, the decay's
    shape: :func:`decay_gradient`) unless ``decay_grad``. ``out_bnhd`` asks for gradients
    stored as [B, N, H, D] (see ``kernels.linear_attention``). ``forward_states``: the forward's
    ``kernels.SegmentStates``: dq's state is the transpose of the forward's, so its pass may start
    its segments from them. ``decay_block``: :func:`decay_gradient`'s ``block``.

    The decay's gradient sums products of q, k with dq, dk: rounded to 16 bits first, the sum
    loses about 2% at long N. On a backend with ``row_dots`` the dq and dk passes compute those
    products from their float32 rows, and the passes keep the inputs' type; on another, 16-bit
    inputs run all passes in float32 (within 1e-3 of float64).

    Grouped heads: the passes run per query head; dk and dv sum over each group's heads, and so do
    the initial state's and the decay's gradients where the group shares them. A shared final
    state is the group's first head's, so its gradient enters that head alone.
    """
    h, hkv = q.shape[1], k.shape[1]
    group = h // hkv
    state_heads = reference.state_heads(h, hkv, decay)
    heads_decay = compute_decay(decay, h)
    extra = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens)
    grad_final = grad_final_state
    if grad_final is not None and state_heads < h:
        grad_final = grad_final.new_zeros(grad_final.shape[0], h, *grad_final.shape[2:])
        grad_final[:, ::group] = grad_final_state
    init_t = None if initial_state is None else initial_state.transpose(-1, -2)
    reuse = {} if forward_states is None else dict(start_states=forward_states.t())
    dtype = q.dtype
    row_dots = decay_grad and backend.row_dots
    if decay_grad and not row_dots and q.element_size() < 4:
        grad_out, q, k, v = (x.to(torch.float32) for x in (grad_out, q, k, v))
        reuse = {}
    # <q_t, dq_t> and <k_t, dk_t> per query head, from the passes' float32 rows
    sums = q.new_empty((2, q.shape[0], h, q.shape[2]), dtype=torch.float32) if row_dots else None
    dots = {} if sums is None else dict(row_dot_with=q, row_dots=sums[0])
    grouped_bnhd = out_bnhd and group == 1  # grouped gradients are summed into that layout below
    dq, dq_final = backend.linear_attention(
        grad_out, v, k, heads_decay, out_scale=scale, initial_state=init_t, store_final=decay_grad,
        out_bnhd=out_bnhd, **dots, **reuse, **extra,
    )
    dk, dv, ds0 = key_value_gradients(
        backend, grad_out, grad_final, q, k, v, heads_decay, scale, store_final=initial_state is not None,
        out_bnhd=grouped_bnhd, cu_seqlens=cu_seqlens, key_row_dots=None if sums is None else sums[1],
    )
    d_init = None
    if ds0 is not None:
        lam = reference.decay_powers(heads_decay, torch.tensor([1], device=q.device), ds0)[..., None]
        d_init = ds0 if q.shape[2] == 0 else lam * ds0  # no tokens: the final state is the initial state
        if cu_seqlens is not None and q.shape[2] > 0:
            d_init = torch.where(_empty_sequences(cu_seqlens)[:, None, None, None], ds0, d_init)
    d_decay = None
    if decay_grad:
        # dq's state is S^T: its final state is each sequence's last S, transposed
        d_decay = decay_gradient(backend, q, k, v, grad_out, grad_final, dq, dk, heads_decay, scale, initial_state,
                                 d_init, dq_final.transpose(-1, -2), cu_seqlens=cu_seqlens, block=decay_block,
                                 row_terms=None if sums is None else sums[0] - sums[1])
        if decay.shape[0] < h:
            d_decay = d_decay.reshape(-1, group).sum(1)
    if initial_state is None:
        d_init = None
    elif state_heads < h:
        d_init = d_init.reshape(d_init.shape[0], state_heads, group, *d_init.shape[2:]).sum(2)
    if group > 1:
        dk, dv = (_group_sum(x, group, out_bnhd) for x in (dk, dv))
    return dq.to(dtype), dk.to(dtype), dv.to(dtype), d_init, d_decay


def _group_sum(x: Tensor, group: int, out_bnhd: bool) -> Tensor:
    """``[B, H, N, D]`` per query head to ``[B, H / group, N, D]``, summed in float32 and stored as
    [B, N, H / group, D] when ``out_bnhd``."""
    b, h, n, d = x.shape
    total = x.reshape(b, h // group, group, n, d).sum(2, dtype=torch.float32)
    out = empty_bhnd((b, h // group, n, d), x.dtype, x.device, out_bnhd)
    return out.copy_(total)


def _empty_sequences(cu_seqlens: Tensor) -> Tensor:
    return cu_seqlens[1:] == cu_seqlens[:-1]


#: Rows per block of :func:`decay_gradient`'s position weights: they stay below it, so the row
#: sums do not cancel as sums weighted by absolute positions would at long N. Per device type:
#: the boundary terms hold two float32 states per block of each head and sequence
#: (``kernels.boundary_states``: 64 KiB each at D = 128), which larger blocks keep few on a GPU
#: (float32 at N = 64K: 3e-6 of float64 with blocks of 64, 6e-5 with 1024).
DECAY_BLOCK = {"cpu": 64}
DECAY_BLOCK_DEFAULT = 1024


def decay_gradient(
    backend: Backend, q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, grad_final: Optional[Tensor], dq: Tensor,
    dk: Tensor, decay: Tensor, scale: float, initial_state: Optional[Tensor], d_init: Optional[Tensor],
    final: Tensor, *, cu_seqlens: Optional[Tensor] = None, block: Optional[int] = None,
    row_terms: Optional[Tensor] = None,
) -> Tensor:
    """``dL/d decay`` per compute head (float32 ``[H]``), from the other gradients.

    With ``a = -decay`` (``lam = e^a``), each step ``S_t = lam S_{t-1} + k_t^T v_t`` contributes
    ``<lam S_{t-1}, dS_t>``. Summed over a block of L rows from state X (before it) to X' (after
    it), with Y and Y' the gradients reaching X and X' from the rows after them, that is::

        sum_t i_t (<q_t, dq_t> - <k_t, dk_t>)  +  <X, Y>  +  (L - 1) <X', Y'>

    with ``i_t`` a row's place in the block (0 .. L-1). Blocks of ``block`` rows from each
    sequence's start chain their boundary terms; the first block's X, Y are the initial state and
    its gradient, the last one's X', Y' the final state and its gradient; a boundary between two
    blocks is counted with weight L. Every weight is below ``block``: the sum does not cancel the
    way one weighted by absolute positions would. ``dk`` is per query head (before the groups are
    summed), ``grad_final`` per query head too; ``final`` is each sequence's final state per query
    head (``[B or S, H, Dk, Dv]``).

    ``row_terms``: ``<q_t, dq_t> - <k_t, dk_t>`` (float32 ``[B, H, N]``) where the passes computed
    them, else they are computed here from dq and dk. The boundary states come from the backend's
    ``boundary_states`` where it has them (every block at once, nothing read on the host), else
    from ``reference.block_states`` (a loop over blocks and sequences).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    h, n = q.shape[1], q.shape[2]
    block = block or DECAY_BLOCK.get(q.device.type, DECAY_BLOCK_DEFAULT)
    extra = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens)
    rows = torch.arange(n, device=q.device)
    if cu_seqlens is None:
        place = rows % block
        lengths = torch.full((1,), n, device=q.device)
    else:
        starts = cu_seqlens[:-1].long()
        place = (rows - starts[torch.searchsorted(cu_seqlens[1:].long(), rows, right=True)]) % block
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if row_terms is None:
        kv = k if k.shape[1] == h else k.repeat_interleave(h // k.shape[1], 1)
        row_terms = (q.to(compute) * dq.to(compute)).sum(-1) - (kv.to(compute) * dk.to(compute)).sum(-1)  # [B, H, N]
    total = (row_terms.to(compute) * place.to(compute)).sum(-1)  # [B, H]
    has_rows = (lengths > 0).to(compute)[:, None]  # [S, 1]; an empty sequence has no blocks

    if backend.boundary_states is not None:
        # entry m of a sequence pairs lam * S_(m*block - 1) with dS_(m*block); entry 0 pairs
        # lam * initial state with dS_0, i.e. the initial state with its gradient
        forward = backend.boundary_states(k, v, decay, initial_state, block, **extra)
        after = backend.boundary_states(q, grad_out, decay, grad_final, block, value_scale=scale, reverse=True,
                                        init_shift=0, **extra)
        pairs = torch.einsum("bhekv,bhekv->bhe", forward, after)
        total = total + pairs.to(compute) @ _entry_weights(lengths, block, pairs.shape[-1]).to(compute)
    else:
        # boundaries inside sequences: the forward's state before the row, lam * dS_row after it
        before, _ = reference.block_states(k, v, decay, initial_state, block=block, heads=h, **extra)
        if before.shape[2] > 0:
            after, _ = reference.block_states(q, grad_out, decay, grad_final, block=block, value_scale=scale,
                                              reverse=True, init_shift=0, heads=h, **extra)
            lam = reference.decay_powers(decay, torch.tensor([1], device=q.device), before)[..., None, None]
            total = total + block * (before * lam * after).sum((-1, -2, -3))
        # each sequence's first block starts from the initial state
        if initial_state is not None:
            init = initial_state if initial_state.shape[1] == h else initial_state.repeat_interleave(
                h // initial_state.shape[1], 1)
            total = total + _per_batch((init.to(compute) * d_init.to(compute)).sum((-1, -2)) * has_rows, cu_seqlens)

    # each sequence's last block ends in the final state
    if grad_final is not None:
        last_block = ((lengths - 1) % block).to(compute)[:, None]  # L - 1 of each sequence's last block
        terms = (final.to(compute) * grad_final.to(compute)).sum((-1, -2)) * last_block * has_rows
        total = total + _per_batch(terms, cu_seqlens)
    return -total.sum(0).to(torch.float32)


def _entry_weights(lengths: Tensor, block: int, num_entries: int) -> Tensor:
    """The weight of each of ``kernels.boundary_states``' entries (sequence by sequence, ``max(1,
    ceil(n_s / block))`` each, then unused ones) in :func:`decay_gradient`: 1 for a sequence's
    first (its initial state), ``block`` for a boundary between two blocks, 0 for the entry of a
    sequence without rows and for unused entries. Computed on the device."""
    counts = torch.clamp((lengths + block - 1) // block, min=1)
    ends = counts.cumsum(0)
    entries = torch.arange(num_entries, device=lengths.device)
    sequence = torch.searchsorted(ends, entries, right=True).clamp(max=lengths.shape[0] - 1)
    first = entries == (ends - counts)[sequence]
    used = (entries < ends[-1]) & (lengths[sequence] > 0)
    return torch.where(first, 1, block) * used


def _per_batch(per_sequence: Tensor, cu_seqlens: Optional[Tensor]) -> Tensor:
    """``[S, H]`` terms as ``[B, H]`` rows to add to the per-batch total (packed: one row, their sum)."""
    return per_sequence if cu_seqlens is None else per_sequence.sum(0, keepdim=True)
