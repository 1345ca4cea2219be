"""The public functions: the op with its arguments named and checked, the decode step, autotuning.

``lightning_op`` re-exports them; ``nn`` builds its modules on them.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import ops

__all__ = ["lightning_attn", "attn_step", "enable_autotune", "disable_autotune"]


def lightning_attn(
    q: Tensor, k: Tensor, v: Tensor, decay: Optional[Tensor] = None, *, scale: float = 1.0,
    initial_state: Optional[Tensor] = None, output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Causal linear attention with a per-head decay, tiled as in Lightning Attention-2.

    For each batch b and head h, with ``lam = exp(-decay[h])`` (``lam = 1`` when decay is None)::

        S_t = lam * S_{t-1} + k_t^T v_t,     S_{-1} = initial_state (or zeros)
        o_t = scale * q_t S_t

    Args:
        q: ``[B, H, N, Dk]``; k: ``[B, Hkv, N, Dk]``; v: ``[B, Hkv, N, Dv]`` (the
            ``scaled_dot_product_attention`` layout; ``[B, N, H, D]`` tensors passed as
            ``x.transpose(1, 2)`` are read in place). float16, bfloat16 or float32, one dtype;
            16 <= Dk, Dv <= 256; any N >= 0. Grouped-query heads: Hkv divides H and query head h
            reads kv head ``h // (H // Hkv)`` (``repeat_interleave``'s order); k and v are never
            copied to H heads.
        decay: slopes >= 0, e.g. :func:`lightning_op.slopes`: ``[H]`` (one state per query head:
            the result of repeating k and v) or ``[Hkv]`` (the query heads of a group share one
            state, its decay). Learnable: a decay that requires grad gets its gradient.
        scale: multiplies the output (1.0 as in Lightning Attention; ``Dk ** -0.5`` is common too).
        initial_state: ``[B, Hs, Dk, Dv]`` state carried in from an earlier piece of the sequence,
            with Hs = H, or Hkv where a group shares its state (decay ``[Hkv]`` or None with Hkv < H).
        output_final_state: also return the ``[B, Hs, Dk, Dv]`` float32 state after the last token.
        cu_seqlens: packed sequences: int32 or int64 ``[S + 1]`` rising from 0 to N; the batch is
            then 1 and rows ``cu[s] .. cu[s+1] - 1`` hold sequence s, which starts from
            ``initial_state[s]`` (or zeros); no state crosses a boundary; states are ``[S, Hs, Dk, Dv]``.

    Returns:
        ``out`` ``[B, H, N, Dv]`` in q's dtype, or ``(out, final_state)``. For a q stored as
        ``[B, N, H, Dk]`` (a ``transpose(1, 2)`` view) the output is stored as ``[B, N, H, Dv]``
        too, so ``out.transpose(1, 2)`` is contiguous.

    Differentiable in q, k, v, decay and initial_state; works under ``torch.compile`` and ``torch.export``.
    """
    ops.validate(q, k, v, decay, scale, initial_state, cu_seqlens)  # before the dispatcher's own, terser checks
    out, final_state = ops.attn_eager(q, k, v, decay, scale, initial_state, cu_seqlens, final=output_final_state)
    return (out, final_state) if output_final_state else out


def attn_step(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor, decay: Optional[Tensor] = None, *, scale: float = 1.0,
    cu_seqlens: Optional[Tensor] = None, state_indices: Optional[Tensor] = None,
) -> Tensor:
    """One decode step (or a few tokens) against a carried state, updating ``state`` in place.

    q: ``[B, H, T, Dk]``, k: ``[B, Hkv, T, Dk]``, v: ``[B, Hkv, T, Dv]`` with small T (1 when
    generating); ``state``: float32 ``[B, Hs, Dk, Dv]`` (Hs as in :func:`lightning_attn`). Returns
    ``[B, H, T, Dv]`` in q's dtype. The same result as ``lightning_attn(q, k, v, decay,
    scale=scale, initial_state=state, output_final_state=True)``, after which ``state`` holds that
    final state; nothing is allocated but the output. Inference only (no gradients); works under
    ``torch.compile`` and CUDA graphs.

    Serving: with ``state_indices`` (int32/int64 ``[B]``) the state is a pool ``[P, Hs, Dk, Dv]``
    and row b continues slot ``state_indices[b]``; a negative index marks a padding row (zeros
    out, no slot touched); slots not named are never written. With ``cu_seqlens`` (``[S + 1]``,
    batch 1) the rows are packed sequences, prefill chunks and single decode tokens mixed, and
    sequence i continues ``state[state_indices[i]]`` (``state[i]`` without indices).

    Where the Triton kernels run (CUDA tensors), every call without ``cu_seqlens`` is one launch
    of the decode kernel, pooled rows and grouped heads included: each state is read and written
    once, a padding row reads nothing, and the slots are read on the device. Packed calls run the
    tiled kernels, which read each sequence's state from its slot and write it back in place.
    On the chunked CPU path pooled, grouped and packed steps gather the slots, run the tiled op
    and write the final states back (same results).
    """
    return ops.attn_step_eager(q, k, v, state, decay, scale, cu_seqlens, state_indices)


def enable_autotune(cache_path=None) -> str:
    """Time launch configurations on the GPU and keep the fastest, per shape class (off by default).

    The first eager call of each shape class (GPU, Triton version, forward or fused backward, dtype,
    head dims, batch*heads and N rounded up to powers of two, decay, direction) times the built-in
    choice — heuristics fitted on one H200 — and a few variations of it, on the call's own inputs,
    and keeps the fastest; later calls look it up. Choices are also saved to ``cache_path`` (else
    ``$LIGHTNING_OP_CACHE_DIR/autotune.json``, else ``~/.cache/lightning_op/autotune.json``), so
    later processes time nothing. ``LIGHTNING_OP_AUTOTUNE=1`` enables it too (read when the
    kernels are first imported: the first GPU call, or this function).

    Nothing is timed under ``torch.compile`` / ``torch.export`` tracing, during CUDA-graph capture,
    or off CUDA (cached choices still apply); ``kernels.config_override`` disables it inside its
    block. The decode step is never tuned. Returns the cache file's path.
    """
    from .kernels import autotune

    return autotune.enable(cache_path)


def disable_autotune() -> None:
    """Turn autotuning off: every launch takes the built-in heuristics again (the file is kept)."""
    from .kernels import autotune

    autotune.disable()
