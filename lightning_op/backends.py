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
from typing import Callable, Optional

import torch
from torch import Tensor

from . import reference

__all__ = ["Backend", "chunked", "triton", "forward", "key_value_gradients", "backward"]


@dataclasses.dataclass(frozen=True)
class Backend:
    """``linear_attention(query, key, value, decay, *, out_scale, value_scale, initial_state,
    reverse, init_shift, store_final, out_bnhd, start_states, keep_start_states)`` returns
    ``(out, final state or None)``; the last three are the kernels' layout and segment-state
    options, which a backend may ignore. ``step`` is the decode step. ``fused_key_value_gradients`` (or None) computes
    :func:`key_value_gradients` in one pass where ``fused_fits(dk, dv, itemsize)``."""

    name: str
    linear_attention: Callable
    step: Callable  # reference.attention_step's arguments: the decode step, updating the state in place
    fused_key_value_gradients: Optional[Callable] = None
    fused_fits: Callable[[int, int, int], bool] = lambda dk, dv, itemsize: False


@functools.lru_cache(maxsize=None)
def chunked(chunk_size: int = 64) -> Backend:
    """The chunked PyTorch form, in chunks of ``chunk_size`` positions."""

    def linear_attention(query, key, value, decay=None, *, out_bnhd=False, start_states=None, keep_start_states=None,
                         **arguments):
        return reference.linear_attention_chunked(query, key, value, decay, chunk_size=chunk_size, **arguments)

    return Backend(f"chunked({chunk_size})", linear_attention, reference.attention_step)


@functools.lru_cache(maxsize=None)
def triton() -> Backend:
    """The Triton kernels (imported on first use: they need triton installed)."""
    from . import kernels

    return Backend("triton", kernels.linear_attention, kernels.decode_step, kernels.key_value_gradients,
                   kernels.fused_backward_fits)


def forward(backend: Backend, q: Tensor, k: Tensor, v: Tensor, decay: Optional[Tensor], scale: float,
            initial_state: Optional[Tensor], *, keep_start_states: Optional[list] = None) -> tuple[Tensor, Tensor]:
    """The op: ``(out in q's dtype, final state)``, the state float32 (float64 for float64 inputs).
    ``keep_start_states``: see ``kernels.linear_attention``."""
    return backend.linear_attention(q, k, v, decay, out_scale=scale, initial_state=initial_state,
                                    keep_start_states=keep_start_states)


def key_value_gradients(
    backend: Backend, grad_out: Tensor, grad_final_state: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
    decay: Optional[Tensor] = None, scale: float = 1.0, *, store_final: bool = False, out_bnhd: bool = False,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(dk, dv, dS_0 or None)``: the two gradients that run backward in time, both driven by
    ``dS_t = lam dS_{t+1} + scale q_t^T do_t`` (``dS_{N-1}`` also receiving ``grad_final_state``)::

        dk_t = dS_t^T v_t   -> query v, key do, value scale*q, state dS^T
        dv_t = k_t dS_t     -> query k, key q, value scale*do, state dS

    In one fused pass where the backend has one that takes these head dims, else as two linear
    attentions. ``dS_0`` (the gradient reaching the first token's state) when ``store_final``.
    """
    if backend.fused_key_value_gradients is not None and backend.fused_fits(q.shape[-1], v.shape[-1],
                                                                            q.element_size()):
        return backend.fused_key_value_gradients(grad_out, grad_final_state, q, k, v, decay, scale,
                                                 store_final=store_final, out_bnhd=out_bnhd)
    gfin_t = None if grad_final_state is None else grad_final_state.transpose(-1, -2)
    dk, _ = backend.linear_attention(
        v, grad_out, q, decay, value_scale=scale, initial_state=gfin_t, reverse=True, init_shift=0,
        store_final=False, out_bnhd=out_bnhd,
    )
    dv, ds0 = backend.linear_attention(
        k, q, grad_out, decay, value_scale=scale, initial_state=grad_final_state, reverse=True, init_shift=0,
        store_final=store_final, out_bnhd=out_bnhd,
    )
    return dk, dv, ds0


def backward(
    backend: Backend, grad_out: Tensor, grad_final_state: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
    decay: Optional[Tensor] = None, scale: float = 1.0, initial_state: Optional[Tensor] = None, *,
    out_bnhd: bool = False, forward_states=None,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients ``(dq, dk, dv, d_initial_state)`` of the op, each a linear attention itself.

    With ``dS_t`` the gradient reaching state ``S_t`` (see :func:`key_value_gradients`)::

        dq_t = scale * do_t S_t^T      -> forward in time: query do, key v, value k, state S_{-1}^T
        dk_t, dv_t                     -> backward in time (key_value_gradients)
        d S_{-1} = lam * dS_0

    ``d_initial_state`` is None when ``initial_state`` is None. ``out_bnhd`` asks for gradients
    stored as [B, N, H, D] (see ``kernels.linear_attention``). ``forward_states``: the forward's
    ``kernels.SegmentStates``: dq's state is the transpose of the forward's, so its pass may start
    its segments from them.
    """
    init_t = None if initial_state is None else initial_state.transpose(-1, -2)
    reuse = {} if forward_states is None else dict(start_states=forward_states.t())
    dq, _ = backend.linear_attention(
        grad_out, v, k, decay, out_scale=scale, initial_state=init_t, store_final=False, out_bnhd=out_bnhd, **reuse
    )
    dk, dv, ds0 = key_value_gradients(
        backend, grad_out, grad_final_state, q, k, v, decay, scale, store_final=initial_state is not None,
        out_bnhd=out_bnhd,
    )
    d_init = None
    if initial_state is not None:
        if q.shape[2] == 0:
            d_init = ds0  # no tokens: the final state is the initial state itself
        else:
            lam = reference.decay_powers(decay, torch.tensor([1], device=q.device), ds0)[..., None]
            d_init = lam * ds0
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_init
