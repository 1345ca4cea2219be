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
    options, which a backend may ignore. ``step`` is the decode step. ``decay_gradient(query, key,
    value, grad_out, decay, scale, initial_state, grad_final, *, cu_seqlens)``: the decay's
    gradient per compute head (``reference.decay_gradient_chunked``'s arguments, float32 or float64
    ``[H]``). ``fused_key_value_gradients`` (or None) computes :func:`key_value_gradients` in one
    pass where ``fused_fits(dk, dv, itemsize)``."""

    name: str
    linear_attention: Callable
    step: Callable  # reference.attention_step's arguments: the decode step, updating the state in place
    decay_gradient: Callable
    fused_key_value_gradients: Optional[Callable] = None
    fused_fits: Callable[[int, int, int], bool] = lambda dk, dv, itemsize: False
    fused_forms: bool = False  # whether the fused pass takes grouped heads and packed sequences
    # for a backend whose forward keeps its segment start states (``keep_start_states``) and takes a
    # cut fixed in advance: (query, key, value) -> the layout of those a forward call keeps, or None
    # (``kernels.start_states_layout``); None for a backend that keeps none
    start_states_layout: Optional[Callable] = None


@functools.lru_cache(maxsize=None)
def chunked(chunk_size: int = 64) -> Backend:
    """The chunked PyTorch form, in chunks of ``chunk_size`` positions."""

    def linear_attention(query, key, value, decay=None, *, out_bnhd=False, start_states=None, keep_start_states=None,
                         **arguments):
        out, final = reference.linear_attention_chunked(query, key, value, decay, chunk_size=chunk_size, **arguments)
        if out_bnhd:  # the layout asked for, as the kernels store it (the op's fake reports it)
            out = empty_bhnd(out.shape, out.dtype, out.device, True).copy_(out)
        return out, final

    def decay_gradient(query, key, value, grad_out, decay, scale, initial_state, grad_final, *, cu_seqlens=None):
        return reference.decay_gradient_chunked(query, key, value, grad_out, decay, scale=scale,
                                                initial_state=initial_state, grad_final=grad_final,
                                                chunk_size=chunk_size, cu_seqlens=cu_seqlens)

    return Backend(f"chunked({chunk_size})", linear_attention, reference.attention_step, decay_gradient)


@functools.lru_cache(maxsize=None)
def triton() -> Backend:
    """The Triton kernels (imported on first use: they need triton installed)."""
    from . import kernels

    native = "cu_seqlens" in inspect.signature(kernels.linear_attention).parameters
    linear_attention = kernels.linear_attention if native else _per_sequence(kernels.linear_attention)
    return Backend("triton", linear_attention, kernels.decode_step, kernels.decay_gradient,
                   kernels.key_value_gradients, kernels.fused_backward_fits, fused_forms=native,
                   start_states_layout=kernels.start_states_layout if native else None)


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
            cu_seqlens: Optional[Tensor] = None, out_bnhd: bool = False,
            cut: Optional[tuple[int, int]] = None, store_final: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """The op: ``(out in q's dtype, final state)``, the state float32 (float64 for float64 inputs;
    None without ``store_final``).
    ``keep_start_states``: see ``kernels.linear_attention``; ``out_bnhd`` stores out as [B, N, H, Dv];
    ``cut``: ``(segment_len, state_split)`` fixed in advance (``Backend.start_states_layout``'s), for
    a backend that keeps start states; the slots they leave unused then hold zeros.

    Grouped heads run per query head (the backends read a kv head for each, no copy of k or v);
    where a group shares its state (``reference.state_heads``) its heads compute the same state,
    and the group's first one is returned."""
    h = q.shape[1]
    extra = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens)
    if cut is not None:
        extra.update(segment_len=cut[0], state_split=cut[1], zero_unused_slots=True)
    out, final = backend.linear_attention(q, k, v, compute_decay(decay, h), out_scale=scale,
                                          initial_state=initial_state, keep_start_states=keep_start_states,
                                          out_bnhd=out_bnhd, store_final=store_final, **extra)
    state_heads = reference.state_heads(h, k.shape[1], decay)
    if state_heads < h and final is not None:
        final = final[:, :: h // state_heads].contiguous()
    return out, final
def fuses_key_value_gradients(backend: Backend, q: Tensor, k: Tensor, v: Tensor,
                              cu_seqlens: Optional[Tensor] = None) -> bool:
    """Whether :func:`key_value_gradients` runs the backend's fused pass for these inputs."""
    return backend.fused_key_value_gradients is not None and backend.fused_fits(
        q.shape[-1], v.shape[-1], q.element_size()) and (
        backend.fused_forms or (cu_seqlens is None and k.shape[1] == q.shape[1]))


def key_value_gradients(
    backend: Backend, grad_out: Tensor, grad_final_state: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
    decay: Optional[Tensor] = None, scale: float = 1.0, *, store_final: bool = False, out_bnhd: bool = False,
    cu_seqlens: Optional[Tensor] = None, grad_final_of: Optional[Callable[[Tensor], Tensor]] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(dk, dv, dS_0 or None)``: the two gradients that run backward in time, both driven by
    ``dS_t = lam dS_{t+1} + scale q_t^T do_t`` (``dS_{N-1}`` also receiving ``grad_final_state``)::

        dk_t = dS_t^T v_t   -> query v, key do, value scale*q, state dS^T
        dv_t = k_t dS_t     -> query k, key q, value scale*do, state dS

    In one fused pass where the backend has one that takes these head dims (and these forms),
    else as two linear attentions. ``dS_0`` (the gradient reaching the first token's state, per
    sequence) when ``store_final``. Grouped heads: dk and dv per query head (``decay`` is too).
    ``grad_final_of`` (only where :func:`fuses_key_value_gradients`): ``grad_final_state`` is its
    answer, given the state the walk from the end leaves from a zero start (the fused pass's
    ``start_of``).
    """
    extra = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens)
    if fuses_key_value_gradients(backend, q, k, v, cu_seqlens):
        if grad_final_of is not None:
            extra["start_of"] = grad_final_of
        return backend.fused_key_value_gradients(grad_out, grad_final_state, q, k, v, decay, scale,
                                                 store_final=store_final, out_bnhd=out_bnhd, **extra)
    if grad_final_of is not None:
        raise ValueError("key_value_gradients: grad_final_of needs the fused pass (fuses_key_value_gradients)")
    gfin_t = None if grad_final_state is None else grad_final_state.transpose(-1, -2)
    dk, _ = backend.linear_attention(
        v, grad_out, q, decay, value_scale=scale, initial_state=gfin_t, reverse=True, init_shift=0,
        store_final=False, out_bnhd=out_bnhd, **extra,
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
    grad_final_of: Optional[Callable[[Tensor], Tensor]] = None,
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
    its segments from them.

    The decay's gradient is a pass of its own over q, k, v and do (the backend's
    ``decay_gradient``: the moment of the state, ``reference.decay_gradient_chunked``), in float32
    from the inputs as they are; the other passes do not change with it.

    Grouped heads: the passes run per query head; dk and dv sum over each group's heads, and so do
    the initial state's and the decay's gradients where the group shares them. A shared final
    state is the group's first head's, so its gradient enters that head alone.

    ``grad_final_of`` (context parallelism; ``grad_final_state`` None, and only where
    :func:`fuses_key_value_gradients`): the final state's gradient is its answer, given ``G =
    scale * sum_t lam^(t+1) q_t^T do_t`` (float32 [B, Hs, Dk, Dv]: the gradient reaching the
    initial state from the outputs), which the dk / dv pass sums from its own segment states.
    """
    h, hkv = q.shape[1], k.shape[1]
    group = h // hkv
    state_heads = reference.state_heads(h, hkv, decay)
    heads_decay = compute_decay(decay, h)
    extra = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens)
    grad_final = grad_final_state
    if grad_final is not None and state_heads < h:
        grad_final = _on_first_heads(grad_final_state, h)
    init_t = None if initial_state is None else initial_state.transpose(-1, -2)
    reuse = {} if forward_states is None else dict(start_states=forward_states.t())
    dtype = q.dtype
    grouped_bnhd = out_bnhd and group == 1  # grouped gradients are summed into that layout below
    dq, _ = backend.linear_attention(
        grad_out, v, k, heads_decay, out_scale=scale, initial_state=init_t, store_final=False,
        out_bnhd=out_bnhd, **reuse, **extra,
    )
    hook = {}
    if grad_final_of is not None:
        def final_from(leaving: Tensor) -> Tensor:  # scale * sum_t lam^t q_t^T do_t per compute head
            nonlocal grad_final
            given = grad_final_of(into_initial_state(leaving, heads_decay, state_heads))
            grad_final = _on_first_heads(given, h) if state_heads < h else given
            return grad_final

        hook = dict(grad_final_of=final_from)
    dk, dv, ds0 = key_value_gradients(
        backend, grad_out, grad_final, q, k, v, heads_decay, scale, store_final=initial_state is not None,
        out_bnhd=grouped_bnhd, cu_seqlens=cu_seqlens, **hook,
    )
    d_init = None
    if ds0 is not None:
        # no tokens: the final state is the initial state. (lam from the rates on the device: a
        # torch.tensor exponent would be a copy from the host, which waits for the stream.)
        d_init = ds0
        if q.shape[2] > 0 and heads_decay is not None:
            d_init = torch.exp(-heads_decay.to(ds0.dtype))[:, None, None] * ds0
        if cu_seqlens is not None and q.shape[2] > 0:
            d_init = torch.where(_empty_sequences(cu_seqlens)[:, None, None, None], ds0, d_init)
    d_decay = None
    if decay_grad:
        d_decay = backend.decay_gradient(q, k, v, grad_out, heads_decay, scale, initial_state, grad_final,
                                         **extra).to(torch.float32)
        if decay.shape[0] < h:
            d_decay = d_decay.reshape(-1, group).sum(1)
    if initial_state is None:
        d_init = None
    elif state_heads < h:
        d_init = d_init.reshape(d_init.shape[0], state_heads, group, *d_init.shape[2:]).sum(2)
    if group > 1:
        dk, dv = (_group_sum(x, group, out_bnhd) for x in (dk, dv))
    return dq.to(dtype), dk.to(dtype), dv.to(dtype), d_init, d_decay


def into_initial_state(walked: Tensor, heads_decay: Optional[Tensor], state_heads: int) -> Tensor:
    """The gradient reaching the initial state from the state a walk from the end leaves
    (``walked``, [B, H, Dk, Dv] per compute head, ``sum_t lam^t value_t``): ``lam`` times it, summed
    over the compute heads that share a state (``[B, state_heads, Dk, Dv]``)."""
    if heads_decay is not None:
        walked = torch.exp(-heads_decay.detach().to(walked.dtype))[:, None, None] * walked
    return walked.unflatten(1, (state_heads, -1)).sum(2) if state_heads < walked.shape[1] else walked


def _on_first_heads(shared: Tensor, heads: int) -> Tensor:
    """A shared state's gradient ``[B, Hs, Dk, Dv]`` on the first compute head of each group of
    ``heads // Hs`` (a shared final state is its group's first head's), zeros on the others."""
    wide = shared.new_zeros(shared.shape[0], heads, *shared.shape[2:])
    wide[:, :: heads // shared.shape[1]] = shared
    return wide


def _group_sum(x: Tensor, group: int, out_bnhd: bool) -> Tensor:
    """``[B, H, N, D]`` per query head to ``[B, H / group, N, D]``, summed in float32 and stored as
    [B, N, H / group, D] when ``out_bnhd``."""
    b, h, n, d = x.shape
    total = x.reshape(b, h // group, group, n, d).sum(2, dtype=torch.float32)
    out = empty_bhnd((b, h // group, n, d), x.dtype, x.device, out_bnhd)
    return out.copy_(total)


def _empty_sequences(cu_seqlens: Tensor) -> Tensor:
    return cu_seqlens[1:] == cu_seqlens[:-1]
