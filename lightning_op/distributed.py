"""Context parallelism (one sequence split across the ranks of a process group) and the op's
DTensor sharding rules (batch- and head-sharded DTensors run the local op).

Rank r holds the tokens ``[P_r, P_r + n_r)`` of one sequence of N tokens, ``P_r = n_0 + ... + n_{r-1}``.
With ``L_j`` the state rank j's tokens leave from a zero start (on the Triton kernels summed from
the op's own segment-state pass, elsewhere a state-only pass over its k, v)
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

import importlib.abc
import importlib.util
import sys
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from ._layout import output_bnhd, stored_bnhd
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
    passes: on the Triton kernels ``kernels.final_state`` (k and v, or q and the output's gradient,
    read once; nothing of N rows written), elsewhere the op forward with its output discarded.
    ``forward_from`` joins the rank's forward pieces: the state its tokens leave, the initial state
    made of it (a collective), the output from that state. Another object with the four methods
    (tests pass a float64 reference) can stand in for it; without ``forward_from``, ``state`` then
    ``forward`` run.
    """

    #: whether ``backward`` returns the decay's gradient
    differentiates_decay = True

    def forward(self, q, k, v, decay, scale, initial_state) -> tuple[Tensor, Tensor]:
        return ops.attn_eager(q, k, v, decay, scale, initial_state)

    def forward_from(self, q, k, v, decay, scale, start_of) -> Tensor:
        """The output from the initial state ``start_of(L)``, L the state the tokens leave from a zero
        start (``state``'s): on the Triton kernels one op forward whose segment-state pass also
        gives L (``kernels.linear_attention``'s ``start_of``), so k and v are read for the states
        once; elsewhere ``state``, then ``forward``."""
        if not _state_only_kernels(q):
            return self.forward(q, k, v, decay, scale, start_of(self.state(q, k, v, decay)))[0]
        from . import backends
        from .kernels import linear_attention
        from .reference import state_heads

        h = q.shape[1]
        heads = state_heads(h, k.shape[1], decay)

        def start_from_leaving(leaving: Tensor) -> Tensor:  # compute heads -> the heads that hold states
            return start_of(leaving[:, :: h // heads] if heads < h else leaving)

        out, _ = linear_attention(q, k, v, backends.compute_decay(ops.prepare_decay(decay), h), out_scale=scale,
                                  store_final=False, out_bnhd=output_bnhd(q), start_of=start_from_leaving)
        return out

    def state(self, q, k, v, decay) -> Tensor:
        """The state the tokens leave from a zero start (float32, the final state's shape)."""
        if _state_only_kernels(q):
            from .kernels import final_state
            from .kernels.launch import state_only_block

            # compute heads: H with a decay [H], else k's (the heads that share a state compute it once)
            return final_state(k, v, ops.prepare_decay(decay), state_only_block(q.shape[2]))
        return ops.attn_eager(q, k, v, decay, 1.0, None)[1]

    def state_gradient(self, q, grad_out, decay, scale, state_heads) -> Tensor:
        """``scale * sum_t lam^(t+1) q_t^T do_t``, the gradient reaching the initial state: ``lam``
        times the final state of the tokens in reverse order with q as keys and do as values,
        summed over the query heads that share a state (grouped heads)."""
        from .backends import compute_decay, into_initial_state

        decay = compute_decay(decay, q.shape[1])  # one slope per query head
        if _state_only_kernels(q):
            from .kernels import final_state
            from .kernels.launch import state_only_block

            state = final_state(q, grad_out, ops.prepare_decay(decay), state_only_block(q.shape[2]), reverse=True)
        else:
            keys, values = q.flip(2), grad_out.flip(2)
            state = ops.attn_eager(keys, keys, values, decay, 1.0, None)[1]
        return into_initial_state(scale * state, decay, state_heads)

    def backward_from(self, grad_out, q, k, v, decay, scale, initial_state, grad_final_of):
        """:meth:`backward` with the final state's gradient ``grad_final_of(G)``, G the gradient
        reaching the initial state from the outputs (``state_gradient``'s): on the Triton kernels'
        fused dk / dv pass one op backward, whose segment-state pass also gives G, so q and the
        output's gradient are read for states once; elsewhere ``state_gradient``, then ``backward``."""
        from . import backends
        from .reference import state_heads

        if not _state_only_kernels(q) or not backends.fuses_key_value_gradients(ops._backend(q), q, k, v):
            heads = state_heads(q.shape[1], k.shape[1], decay)
            grad_final = grad_final_of(self.state_gradient(q, grad_out, decay, scale, heads))
            return self.backward(grad_out, grad_final, q, k, v, decay, scale, initial_state)
        decay_grad = decay is not None and decay.requires_grad
        dq, dk, dv, _, d_decay = ops._attn_bwd_impl(grad_out, None, q, k, v, decay, scale, initial_state,
                                                    stored_bnhd(q), None, decay_grad, grad_final_of=grad_final_of)
        return dq, dk, dv, d_decay if decay_grad else None

    def backward(self, grad_out, grad_final_state, q, k, v, decay, scale, initial_state):
        """``(dq, dk, dv, d_decay or None)`` with the initial state held fixed: the op's backward,
        its body called directly where nothing traces the call (the forward validated the
        inputs; the dispatcher's way in costs host time the rank's path cannot spare)."""
        decay_grad = decay is not None and decay.requires_grad
        arguments = (grad_out, grad_final_state, q, k, v, decay, scale, initial_state, stored_bnhd(q), None, decay_grad)
        if ops._dispatcher_observed(grad_out, grad_final_state, q, k, v, decay, initial_state):
            dq, dk, dv, _, d_decay = torch.ops.lightning.attn_bwd(*arguments)
        else:
            dq, dk, dv, _, d_decay = ops._attn_bwd_impl(*arguments)
        return dq, dk, dv, d_decay if decay_grad else None


OP_ATTENTION = OpAttention()


def _state_only_kernels(x: Tensor) -> bool:
    """Whether the state-only passes launch the Triton kernels directly: where the op runs on them
    and nothing traces the call (compiled and traced calls go through the op, which graphs hold)."""
    return not ops._dispatcher_observed(x) and ops._backend(x).name == "triton"


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
            f"context_parallel_attn: decay requires grad, but the local attention {type(local).__name__} gives no "
            "decay gradient; pass decay.detach() (or keep it in a buffer) to train with a fixed decay"
        )
    return _ContextParallelAttention.apply(q, k, v, decay, initial_state, scale, exchange, local)


class _Weights:
    """The decay weights of rank ``rank``'s sums, ``lam_h ** e`` for exponents ``e`` counted in
    tokens from every rank's length (float64 ``[W]``), each ``[Hd, count]`` (``Hd = 1`` without a
    decay) in ``like``'s dtype. All are computed at once (one chain of small kernels, which eager
    launches one by one); their derivatives in the decay, ``-e lam^e``, only when ``derivatives``.

    into    ``[Hd, r]``          L_j (j < r) into S_r
    out_of  ``[Hd, W]``          L_j into S_final (column r: dL_r's weight of the final state's gradient)
    start   ``[Hd, 1]``          S_0 into S_r
    end     ``[Hd, 1]``          S_0 into S_final
    own     ``[Hd, 1]``          lam^N_r, S_r into the op's final state on this rank
    back    ``[Hd, W - r - 1]``  G_j (j > r) into dL_r
    """

    def __init__(self, decay: Optional[Tensor], lengths: Tensor, rank: int, like: Tensor, derivatives: bool) -> None:
        world = lengths.shape[0]
        ends = torch.cumsum(lengths, 0)  # P_{j+1}
        starts = ends - lengths  # P_j
        total = ends[-1:]
        exponents = torch.cat([starts[rank] - ends[:rank], total - ends, starts[rank:rank + 1], total,
                               lengths[rank:rank + 1], starts[rank + 1:] - ends[rank]])
        powers = decay_powers(None if decay is None else decay.detach(), exponents, exponents)
        powers = powers.expand(-1, exponents.shape[0])
        sizes = [rank, world, 1, 1, 1, world - rank - 1]
        self.into, self.out_of, self.start, self.end, self.own, self.back = powers.to(like.dtype).split(sizes, 1)
        if derivatives:
            (self.d_into, self.d_out_of, self.d_start, self.d_end, self.d_own,
             _) = (-exponents * powers).to(like.dtype).split(sizes, 1)


def _weighted_sum(weights: Tensor, states: Tensor) -> Tensor:
    """``sum_j weights[h, j] * states[j, :, h]``: weights ``[Hd, J]``, states ``[J, B, Hs, Dk, Dv]``."""
    return torch.einsum("hj,jbhkv->bhkv", weights.expand(states.shape[2], -1), states)


def _per_head(weights: Tensor) -> Tensor:
    """``[Hd, 1]`` weights shaped to scale ``[B, Hs, Dk, Dv]`` states."""
    return weights.reshape(1, -1, 1, 1)


def _head_products(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` per head over batch and the state's two dims, as ``[Hs, J]`` for ``[J, B, Hs, Dk, Dv]``
    and ``[B, Hs, Dk, Dv]`` operands (``[Hs, 1]`` for two states)."""
    return torch.einsum("jbhkv,bhkv->hj", a.reshape(-1, *b.shape), b)


def _unpack(gathered: Tensor, like: Tensor, with_states: bool = True) -> tuple[Optional[Tensor], Tensor]:
    """The gathered states ``[W, *like.shape]`` (None without ``with_states``: rows that hold the
    lengths alone) and the lengths (float64 ``[W]``) of an all-gather's rows."""
    states = gathered[:, :-2].view(-1, *like.shape) if with_states else None
    lengths = gathered[:, -2].to(torch.float64) * _LENGTH_BASE + gathered[:, -1].to(torch.float64)
    return states, lengths


def _combine(gathered: Tensor, decay: Optional[Tensor], initial_state: Optional[Tensor], rank: int,
             like: Tensor) -> tuple[Tensor, Tensor]:
    """``(S_r, S_final)`` (the module's docstring) from the all-gather's rows, composed from PyTorch ops."""
    states, lengths = _unpack(gathered, like)
    weights = _Weights(decay, lengths, rank, like, derivatives=False)
    start, final = _weighted_sum(weights.into, states[:rank]), _weighted_sum(weights.out_of, states)
    if initial_state is not None:
        init = initial_state.to(like.dtype)
        start, final = start + _per_head(weights.start) * init, final + _per_head(weights.end) * init
    return start, final


def _combine_on_the_kernels(gathered: Tensor, decay: Optional[Tensor], initial_state: Optional[Tensor], rank: int,
                            like: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_combine` in one Triton launch (``kernels.context``), where the host would otherwise
    launch some twenty small kernels."""
    from .kernels.context import rank_states

    return rank_states(gathered, _rates(decay), initial_state, rank, tuple(like.shape), _LENGTH_BASE)


def _rates(decay: Optional[Tensor]) -> Optional[Tensor]:
    """The decay as the combine kernels read it: float32 rates, outside autograd."""
    return None if decay is None else decay.detach().to(torch.float32)


class _ContextParallelAttention(torch.autograd.Function):
    """One autograd node for the whole exchange, so that every rank enters the backward's
    collective (rank 0's outputs depend on no other rank's: a graph of smaller pieces would skip
    the collective there and leave the others waiting)."""

    @staticmethod
    def forward(ctx, q, k, v, decay, initial_state, scale, exchange, local):
        rank = exchange.rank
        decay_grad = decay is not None and ctx.needs_input_grad[3]
        found = {}
        combine = _combine_on_the_kernels if _state_only_kernels(q) else _combine

        def start_of(own: Tensor) -> Tensor:
            """This rank's initial state from the state its tokens leave (``own``), through the exchange."""
            # the length as two floats, filled on the device (a host tensor would be a synchronising copy)
            code = own.new_full((2,), q.shape[2] % _LENGTH_BASE)
            code[:1] = q.shape[2] // _LENGTH_BASE
            gathered = exchange.gather([own, code])
            start, final = combine(gathered, decay, initial_state, rank, own)
            found.update(gathered=gathered, start=start, final=final)
            return start

        forward_from = getattr(local, "forward_from", None)
        if forward_from is not None:
            out = forward_from(q, k, v, decay, scale, start_of)
        else:
            out = local.forward(q, k, v, decay, scale, start_of(local.state(q, k, v, decay)))[0]
        gathered, start, final = found["gathered"], found["start"], found["final"]
        init = None if initial_state is None else initial_state.to(start.dtype)

        ctx.scale, ctx.exchange, ctx.local = scale, exchange, local
        ctx.init_dtype = None if initial_state is None else initial_state.dtype
        # the gathered states enter only the decay's gradient; the lengths every weight
        ctx.decay_grad = decay_grad
        ctx.save_for_backward(q, k, v, decay, init, start, gathered if decay_grad else gathered[:, -2:].clone())
        return out, final

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        q, k, v, decay, init, start, gathered = ctx.saved_tensors
        local, rank = ctx.local, ctx.exchange.rank
        # every rank enters the collective, whichever of its outputs its loss used
        grad_out = grad_out.contiguous()  # autograd may hand in an expanded (stride 0) gradient
        grad_final = grad_final.to(start.dtype)
        want_init = init is not None and ctx.needs_input_grad[4]
        on_kernels = _state_only_kernels(q)
        found = {}

        def leaving_of(own: Tensor) -> Tensor:
            """The gradient reaching the state this rank's tokens leave, from the gradient reaching
            the state they start from (``own``, G_r), through the exchange."""
            own = own.to(start.dtype)
            shares = ctx.exchange.gather([own, grad_final]).view(-1, 2, *start.shape)
            if ctx.decay_grad or not on_kernels:
                states, lengths = _unpack(gathered, start, with_states=ctx.decay_grad)
                weights = _Weights(decay, lengths, rank, start, derivatives=ctx.decay_grad)
                grad_leaving = (_weighted_sum(weights.back, shares[rank + 1:, 0])
                                + _per_head(weights.out_of[:, rank]) * shares[:, 1].sum(0))
                d_init = (_per_head(weights.start) * own + _per_head(weights.end) * grad_final) if want_init else None
                found.update(states=states, weights=weights)
            else:  # the same sums in one launch (kernels.context)
                from .kernels.context import rank_state_gradients

                grad_leaving, d_init = rank_state_gradients(shares, gathered, _rates(decay), rank,
                                                            tuple(start.shape), _LENGTH_BASE, want_init)
            found.update(own=own, grad_leaving=grad_leaving, d_init=d_init)
            return grad_leaving

        backward_from = getattr(local, "backward_from", None)
        if backward_from is not None:
            dq, dk, dv, d_decay = backward_from(grad_out, q, k, v, decay, ctx.scale, start, leaving_of)
        else:
            own = local.state_gradient(q, grad_out, decay, ctx.scale, start.shape[1])
            dq, dk, dv, d_decay = local.backward(grad_out, leaving_of(own), q, k, v, decay, ctx.scale, start)
        own, grad_leaving, d_init = found["own"], found["grad_leaving"], found["d_init"]
        if d_init is not None:
            d_init = d_init.to(ctx.init_dtype)
        if decay is not None and ctx.needs_input_grad[3]:
            # the op's decay gradient holds its initial state fixed and counts lam^N_r S_r in its
            # final state, whose gradient here is L_r's alone: take that term out
            states, weights = found["states"], found["weights"]
            terms = [-weights.d_own * _head_products(start, grad_leaving),
                     weights.d_into * _head_products(states[:rank], own),
                     weights.d_out_of * _head_products(states, grad_final)]
            if init is not None:
                terms += [weights.d_start * _head_products(init, own), weights.d_end * _head_products(init, grad_final)]
            d_decay = (d_decay + sum(term.sum(1) for term in terms)).to(decay.dtype)
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

    from torch.distributed.tensor import Partial

    # (q, k, v and their gradients; decay; the decay's gradient): over the batch each rank's decay
    # gradient is a partial sum, over the heads a shard
    layouts = ((Replicate(), Replicate(), Replicate()), (Shard(0), Replicate(), Partial()),
               (Shard(1), Shard(0), Shard(0)))

    @register_sharding(torch.ops.lightning.attn.default)
    def _attn(q, k, v, decay=None, scale=1.0, initial_state=None, cu_seqlens=None):
        _refuse_sequence_sharding(q, k, v)
        return [
            ([tensors, tensors], [tensors] * 3 + [decay_ if decay is not None else None, None,
                                                  tensors if initial_state is not None else None,
                                                  Replicate() if cu_seqlens is not None else None])
            for tensors, decay_, _ in layouts
        ]

    @register_sharding(torch.ops.lightning.attn_bwd.default)
    def _attn_bwd(grad_out, grad_final_state, q, k, v, decay=None, scale=1.0, initial_state=None, bnhd_grads=False,
                  cu_seqlens=None, decay_grad=False, forward_states=None, forward_segment_len=0, forward_state_split=1):
        # (forward_states: never for DTensors, whose autograd keeps no start states: ops._kept_layout)
        _refuse_sequence_sharding(q, k, v)
        # the initial state's and the decay's gradients are empty placeholders when not asked for: replicated
        return [
            ([tensors] * 3 + [tensors if initial_state is not None else Replicate(),
                              decay_grad_ if decay_grad else Replicate()],
             [tensors, tensors if grad_final_state is not None else None] + [tensors] * 3
             + [decay_ if decay is not None else None, None, tensors if initial_state is not None else None, None,
                Replicate() if cu_seqlens is not None else None, None, None, None, None])
            for tensors, decay_, decay_grad_ in layouts
        ]


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``action`` right after the first import of module ``name`` completes: importing the
    DTensor package costs about 0.9 s, which ``import lightning_op`` should not spend for users who
    never shard, while a DTensor must find the rules as soon as one can exist."""

    def __init__(self, name: str, action) -> None:
        self.name, self.action = name, action

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; and the real spec is found by the finders after this one
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRun(spec.loader, self.action)
        return spec


class _ThenRun(importlib.abc.Loader):
    """A module's own loader, then ``action`` once the module has run; anything else is the loader's."""

    def __init__(self, loader, action) -> None:
        self._loader, self._action = loader, action

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._action()

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _when_imported(name: str, action) -> None:
    """``action()`` now if module ``name`` is imported, else right after its first import."""
    if name in sys.modules:
        action()
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, action))


if dist.is_available():
    _when_imported("torch.distributed.tensor", _register_sharding_rules)
