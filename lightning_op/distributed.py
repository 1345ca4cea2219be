"""Context parallelism (one sequence split across the ranks of a process group) and the op's
DTensor sharding rules (batch- and head-sharded DTensors run the local op).

Rank r holds the tokens ``[P_r, P_r + n_r)`` of one sequence of N tokens, ``P_r = n_0 + ... + n_{r-1}``.
With ``L_j`` the state rank j's tokens leave from a zero start (a state-only pass over its k, v)
and ``S_0`` the sequence's initial state, the state entering rank r and the final state are::

    S_r     = lam^P_r S_0 + sum_{j<r} lam^(P_r - P_{j+1}) L_j
    S_final = lam^N   S_0 + sum_j     lam^(N - P_{j+1})   L_j

so one all-gather of every ``L_j`` and ``n_j`` gives each rank its start, and the op runs on the
rank's tokens from ``S_r``. The backward mirrors it. ``G_r``, the gradient reaching ``S_r`` from
rank r's outputs, is ``scale * sum_t lam^(t+1) q_t^T do_t`` (a state-only pass over q and the
output's gradient); with ``g_j`` each rank's share of the final state's gradient, one all-gather
of ``(G_j, g_j)`` gives rank r the gradient reaching ``L_r``::

    dL_r = sum_{j>r} lam^(P_j - P_{r+1}) G_j + lam^(N - P_{r+1}) sum_j g_j

The op's final state from ``S_r`` is ``lam^n_r S_r + L_r``, so its backward with ``dL_r`` as the
final state's gradient gives rank r's exact dq, dk and dv. Replicated inputs (decay, S_0) get each
rank's share: the terms of ``S_r`` and of its share of ``S_final``, whose decay derivatives
(``d lam^e / d decay = -e lam^e``) are written out here.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from ._layout import stored_bnhd
from .reference import decay_powers

__all__ = ["context_parallel_attn"]

#: Lengths travel in the float state buffer as two floats, ``n // 2^24`` and ``n % 2^24``: exact in
#: float32 up to 2^48 tokens a rank.
_LENGTH_BASE = 2 ** 24


def context_parallel_attn(
    q: Tensor, k: Tensor, v: Tensor, decay: Optional[Tensor] = None, *, scale: float = 1.0,
    group: Optional[dist.ProcessGroup] = None, initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``lightning_attn`` over one sequence whose tokens are split across the ranks of ``group``.

    Each rank passes its own contiguous slice ``[B, H, N_r, D]`` of q, k and v; rank r of ``group``
    (default: the world) holds the slice after rank r-1's, and the ``N_r`` may differ (one token, or
    none). ``decay``, ``scale`` and ``initial_state`` (the whole sequence's) are the same on every
    rank. Returns this rank's output, and with ``output_final_state`` the whole sequence's float32
    final state, identical on every rank.

    Gradients: q, k and v get their exact gradients (the later ranks' losses included); replicated
    inputs (initial_state, and decay once the op differentiates it) get this rank's share, so their
    sum over the group is the full gradient, which is what DDP and FSDP over the group expect.

    Communication: one all-gather of float32 states forward and one of state gradients backward,
    ``W * (B * H * Dk * Dv + 2)`` and ``W * 2 * B * H * Dk * Dv`` numbers whatever the length.
    Every rank of the group must call it in the same order, and run its backward when one does.
    Written with functional collectives, so ``torch.compile(fullgraph=True)`` traces it.
    """
    ops.validate(q, k, v, decay, scale, initial_state)
    if not dist.is_initialized():
        raise RuntimeError("context_parallel_attn: torch.distributed is not initialised (init_process_group)")
    group = dist.group.WORLD if group is None else group
    out, final = _attention(q, k, v, decay, scale, initial_state, GroupExchange(group), OP_ATTENTION)
    return (out, final) if output_final_state else out


class OpAttention:
    """The per-rank pieces of context parallelism, from ``torch.ops.lightning.attn`` and ``attn_bwd``.

    ``forward`` and ``backward`` are the op's; ``state`` and ``state_gradient`` are the state-only
    passes, run here through the op forward with its output discarded. Another object with these
    four methods (tests pass a float64 reference) can stand in for it.
    """

    #: whether ``backward`` returns the decay's gradient (the op's backward does not yet)
    differentiates_decay = False

    def forward(self, q, k, v, decay, scale, initial_state) -> tuple[Tensor, Tensor]:
        return ops.attn_eager(q, k, v, decay, scale, initial_state)

    def state(self, q, k, v, decay) -> Tensor:
        """The state the tokens leave from a zero start (float32, the final state's shape)."""
        return ops.attn_eager(q, k, v, decay, 1.0, None)[1]

    def state_gradient(self, q, grad_out, decay, scale, state_heads) -> Tensor:
        """``scale * sum_t lam^(t+1) q_t^T do_t``, the gradient reaching the initial state: ``lam``
        times the final state of the tokens in reverse order with q as keys and do as values,
        summed over the query heads that share a state (grouped heads)."""
        h = q.shape[1]
        if decay is not None and decay.shape[0] != h:  # one slope per state head
            decay = decay.repeat_interleave(h // decay.shape[0])
        keys, values = q.flip(2), grad_out.flip(2)
        state = ops.attn_eager(keys, keys, values, decay, 1.0, None)[1]
        lam = decay_powers(decay, torch.ones(1, device=q.device), state).reshape(1, -1, 1, 1)
        return (scale * lam * state).unflatten(1, (state_heads, -1)).sum(2)

    def backward(self, grad_out, grad_final_state, q, k, v, decay, scale, initial_state):
        """``(dq, dk, dv, d_decay or None)`` with the initial state held fixed."""
        dq, dk, dv, _ = torch.ops.lightning.attn_bwd(
            grad_out, grad_final_state, q, k, v, decay, scale, initial_state, bnhd_grads=stored_bnhd(q)
        )
        return dq, dk, dv, None


OP_ATTENTION = OpAttention()


class GroupExchange:
    """How the ranks of a process group exchange states: this rank's index, their number, and an
    all-gather of flat buffers (a functional collective, which ``torch.compile`` traces)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group, self.rank, self.world = group, dist.get_rank(group), dist.get_world_size(group)

    def gather(self, parts: list[Tensor]) -> Tensor:
        """Every rank's ``parts``, flattened and concatenated: ``[W, sum of numels]`` in rank order."""
        from torch.distributed import _functional_collectives as funcol

        flat = torch.cat([x.reshape(-1) for x in parts])
        return funcol.all_gather_single(flat, 0, self.group).view(self.world, -1)


def _attention(q, k, v, decay, scale, initial_state, exchange, local):
    """The context-parallel attention of ``local``'s per-rank pieces over ``exchange``: ``(out, final_state)``."""
    if decay is not None and decay.requires_grad and torch.is_grad_enabled() and not local.differentiates_decay:
        raise ValueError(
            "context_parallel_attn: decay requires grad, but the op's backward gives no decay gradient yet; pass "
            "decay.detach() (or keep it in a buffer) to train with a fixed decay"
        )
    return _ContextParallelAttention.apply(q, k, v, decay, initial_state, scale, exchange, local)


def _powers(decay: Optional[Tensor], exponents: Tensor, valid: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """``lam_h ** exponents[j]`` where ``valid[j]``, else 0, and its derivative in the decay
    ``-exponents[j] * lam_h ** exponents[j]``: two ``[Hd, W]`` tensors in ``like``'s dtype (Hd = 1
    without a decay). Exponents are float64 token counts."""
    exponents = torch.where(valid, exponents, 0.0)
    weights = decay_powers(None if decay is None else decay.detach(), exponents, exponents) * valid
    return weights.to(like.dtype), (-exponents * weights).to(like.dtype)


def _weighted_sum(weights: Tensor, states: Tensor) -> Tensor:
    """``sum_j weights[h, j] * states[j, :, h]``: weights ``[Hd, W]``, states ``[W, B, Hs, Dk, Dv]``."""
    return (weights.t()[:, None, :, None, None] * states).sum(0)


def _per_head(weights: Tensor) -> Tensor:
    """``[Hd]`` weights shaped to scale ``[B, Hs, Dk, Dv]`` states."""
    return weights.reshape(1, -1, 1, 1)


def _head_products(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` per head over batch and the state's two dims: ``[..., B, Hs, Dk, Dv]`` -> ``[..., Hs]``."""
    return (a * b).sum((-4, -2, -1))


class _Layout:
    """Where rank ``rank``'s tokens sit, from every rank's length (float64 ``[W]``)."""

    def __init__(self, lengths: Tensor, rank: int) -> None:
        self.ends = torch.cumsum(lengths, 0)  # P_{j+1}
        self.starts = self.ends - lengths  # P_j
        self.total = self.ends[-1:]  # N
        self.length = lengths[rank:rank + 1]
        ranks = torch.arange(lengths.shape[0], device=lengths.device)
        self.before, self.after, self.every = ranks < rank, ranks > rank, ranks >= 0
        self.rank = rank


class _ContextParallelAttention(torch.autograd.Function):
    """One autograd node for the whole exchange, so that every rank enters the backward's
    collective (rank 0's outputs depend on no other rank's: a graph of smaller pieces would skip
    the collective there and leave the others waiting)."""

    @staticmethod
    def forward(ctx, q, k, v, decay, initial_state, scale, exchange, local):
        rank = exchange.rank
        own = local.state(q, k, v, decay)
        n = q.shape[2]
        length = torch.tensor([n // _LENGTH_BASE, n % _LENGTH_BASE], dtype=own.dtype, device=own.device)
        gathered = exchange.gather([own, length])
        states = gathered[:, :-2].view(-1, *own.shape)
        codes = gathered[:, -2:].to(torch.float64)
        layout = _Layout(codes[:, 0] * _LENGTH_BASE + codes[:, 1], rank)

        into, _ = _powers(decay, layout.starts[rank] - layout.ends, layout.before, own)
        out_of, _ = _powers(decay, layout.total - layout.ends, layout.every, own)
        start, final = _weighted_sum(into, states), _weighted_sum(out_of, states)
        init = None if initial_state is None else initial_state.to(own.dtype)
        if init is not None:
            start = start + _per_head(_powers(decay, layout.starts[rank:rank + 1], layout.every[:1], own)[0]) * init
            final = final + _per_head(_powers(decay, layout.total, layout.every[:1], own)[0]) * init
        out, _ = local.forward(q, k, v, decay, scale, start)

        ctx.scale, ctx.exchange, ctx.local, ctx.layout = scale, exchange, local, layout
        ctx.init_dtype = None if initial_state is None else initial_state.dtype
        decay_grad = decay is not None and ctx.needs_input_grad[3]
        # the gathered states enter only the decay's gradient
        ctx.save_for_backward(q, k, v, decay, init, start, states if decay_grad else None)
        return out, final

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        q, k, v, decay, init, start, states = ctx.saved_tensors
        local, layout = ctx.local, ctx.layout
        rank = layout.rank
        # every rank enters the collective, whichever of its outputs its loss used
        grad_out = grad_out.contiguous()  # autograd may hand in an expanded (stride 0) gradient
        own = local.state_gradient(q, grad_out, decay, ctx.scale, start.shape[1]).to(start.dtype)
        grad_final = grad_final.to(start.dtype)
        gathered = ctx.exchange.gather([own, grad_final]).view(-1, 2, *start.shape)
        into_starts, final_shares = gathered[:, 0], gathered[:, 1]

        back, _ = _powers(decay, layout.starts - layout.ends[rank], layout.after, start)
        out_of, d_out_of = _powers(decay, layout.total - layout.ends, layout.every, start)
        grad_leaving = _weighted_sum(back, into_starts) + _per_head(out_of[:, rank]) * final_shares.sum(0)
        dq, dk, dv, d_decay = local.backward(grad_out, grad_leaving, q, k, v, decay, ctx.scale, start)

        one = layout.every[:1]
        at_start, d_at_start = _powers(decay, layout.starts[rank:rank + 1], one, start)
        at_end, d_at_end = _powers(decay, layout.total, one, start)
        d_init = None
        if init is not None and ctx.needs_input_grad[4]:
            d_init = (_per_head(at_start[:, 0]) * own + _per_head(at_end[:, 0]) * grad_final).to(ctx.init_dtype)
        if decay is not None and ctx.needs_input_grad[3]:
            # the op's decay gradient holds its initial state fixed and counts lam^n_r S_r in its
            # final state, whose gradient here is L_r's alone: take that term out
            _, d_length = _powers(decay, layout.length, one, start)
            d_decay = d_decay - d_length[:, 0] * _head_products(start, grad_leaving)
            _, d_into = _powers(decay, layout.starts[rank] - layout.ends, layout.before, start)
            d_decay = d_decay + (d_into * _head_products(states, own).t()).sum(1)
            d_decay = d_decay + (d_out_of * _head_products(states, grad_final).t()).sum(1)
            if init is not None:
                d_decay = d_decay + d_at_start[:, 0] * _head_products(init, own)
                d_decay = d_decay + d_at_end[:, 0] * _head_products(init, grad_final)
            d_decay = d_decay.to(decay.dtype)
        return dq, dk, dv, d_decay, d_init, None, None, None


# ----------------------------------------------------------------------------- DTensor sharding rules
#
# Batch entries and heads are independent: DTensors sharded over either run the local op on their
# shards with no communication (with grouped heads, query and kv heads shard in the same
# proportion). The decay is per head: replicated beside a batch sharding, sharded beside a head one.


def _sharded_over_sequence(*specs) -> bool:
    from torch.distributed.tensor import Shard

    return any(isinstance(p, Shard) and p.dim in (2, -2) for spec in specs for p in spec.placements)


def _refuse_sequence_sharding(q, k, v) -> None:
    if _sharded_over_sequence(q, k, v):
        raise NotImplementedError(
            "lightning attn: a DTensor sharded over the sequence (Shard(2) of [B, H, N, D]) would be gathered "
            "whole on every rank; split the sequence across ranks with "
            "lightning_op.distributed.context_parallel_attn(q.to_local(), k.to_local(), v.to_local(), decay, "
            "group=mesh.get_group()) instead"
        )


def _register_sharding_rules() -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    layouts = ((Replicate(), Replicate()), (Shard(0), Replicate()), (Shard(1), Shard(0)))

    @register_sharding(torch.ops.lightning.attn.default)
    def _attn(q, k, v, decay=None, scale=1.0, initial_state=None):
        _refuse_sequence_sharding(q, k, v)
        return [
            ([tensors, tensors], [tensors] * 3 + [decay_ if decay is not None else None, None,
                                                  tensors if initial_state is not None else None])
            for tensors, decay_ in layouts
        ]

    @register_sharding(torch.ops.lightning.attn_bwd.default)
    def _attn_bwd(grad_out, grad_final_state, q, k, v, decay=None, scale=1.0, initial_state=None, bnhd_grads=False):
        _refuse_sequence_sharding(q, k, v)
        # d_initial_state is an empty placeholder without an initial state: replicated
        return [
            ([tensors] * 3 + [tensors if initial_state is not None else Replicate()],
             [tensors, tensors if grad_final_state is not None else None] + [tensors] * 3
             + [decay_ if decay is not None else None, None, tensors if initial_state is not None else None, None])
            for tensors, decay_ in layouts
        ]


if dist.is_available():
    _register_sharding_rules()
