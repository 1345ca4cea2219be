"""Ready modules: a TransNormerLLM / MiniMax-style lightning attention block and a decode-state cache."""

from __future__ import annotations

import copy
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import context_parallel_attn
from .functional import attn_step, lightning_attn
from .reference import slopes
from .support import unsupported

__all__ = ["LightningAttention", "StateCache", "StatePool"]

#: Inputs of at most this many tokens, with a cached state and no gradients, take the in-place
#: decode step; longer ones (prefill) take the tiled op.
STEP_MAX_TOKENS = 8


class StateCache:
    """The decode states of a model's attention layers: one float32 ``[B, H, Dk, Dv]`` tensor per
    layer index, whatever the context length. Layers update their entry in place while decoding.

    Each entry belongs to the layer that stored it (``owner``): another live layer reading or
    writing that index raises ``ValueError``, since two layers sharing one state compute wrong
    results without any error (stacked layers all left at ``layer_idx=0`` would). Calls without an
    owner (code inspecting or restoring states) are not checked, and setting a state without one
    keeps the entry's owner. :meth:`reset` frees every index, and so does the owner being garbage
    collected: a layer built in its place (a model rebuilt or reloaded) takes the entry over and
    continues its state; call :meth:`reset` between sequences.
    """

    def __init__(self) -> None:
        self._states: dict[int, Tensor] = {}
        # weak, so that a cache outliving its model does not keep the model alive
        self._owners: dict[int, weakref.ref] = {}

    def get(self, layer_idx: int, *, owner: Optional[nn.Module] = None) -> Optional[Tensor]:
        if owner is not None:
            self._check_owner(layer_idx, owner)
        return self._states.get(layer_idx)

    def set(self, layer_idx: int, state: Tensor, *, owner: Optional[nn.Module] = None) -> None:
        if not isinstance(state, Tensor) or state.dim() != 4 or state.dtype != torch.float32:
            raise TypeError(f"StateCache.set: state must be a float32 [B, H, Dk, Dv] tensor, got {state!r:.80}")
        if owner is not None:
            self._check_owner(layer_idx, owner)
            self._owners[layer_idx] = weakref.ref(owner)
        self._states[layer_idx] = state

    def _check_owner(self, layer_idx: int, owner: nn.Module) -> None:
        ref = self._owners.get(layer_idx)
        holder = None if ref is None else ref()
        if holder is not None and holder is not owner:
            raise ValueError(
                f"StateCache: layer_idx {layer_idx} holds the state of another layer ({type(holder).__name__} at "
                f"{id(holder):#x}, this one at {id(owner):#x}); layers sharing a state give wrong results. Give each "
                "layer a distinct layer_idx (layer_idx=i for the i-th of stacked layers), or each its own cache"
            )

    def reset(self) -> None:
        self._states.clear()
        self._owners.clear()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, layer_idx: int) -> bool:
        return layer_idx in self._states

    def __getstate__(self) -> dict:
        # weak references do not pickle, and the layers they name do not travel with the states
        return {"_states": self._states, "_owners": {}}

    def __deepcopy__(self, memo: dict) -> "StateCache":
        # a copy is for the same layers (a branch of the same decode, as in beam search)
        other = StateCache()
        other._states = copy.deepcopy(self._states, memo)
        other._owners = dict(self._owners)
        return other

    @property
    def nbytes(self) -> int:
        """Bytes held by all states (constant in the context length)."""
        return sum(s.numel() * s.element_size() for s in self._states.values())


class StatePool:
    """Decode states of many requests for serving: per layer one float32 ``[num_slots, Hs, Dk, Dv]``
    pool (made on the layer's first use), addressed by slot. :meth:`allocate` gives a free slot to
    a new request (its states zeroed in every layer), :meth:`free` returns it. A layer called with
    ``cache=pool, slots=...`` continues each row's (or packed sequence's) slot in place; a
    negative slot is a padding row."""

    def __init__(self, num_slots: int) -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"StatePool: num_slots must be a positive int, got {num_slots!r}")
        self.num_slots = num_slots
        self._pools: dict[int, Tensor] = {}
        self._free = list(range(num_slots - 1, -1, -1))

    def pool(self, layer_idx: int, shape: tuple, device) -> Tensor:
        """The layer's pool, made of zeros on first use; ``shape`` is a slot's ``(Hs, Dk, Dv)``."""
        found = self._pools.get(layer_idx)
        if found is None:
            found = self._pools[layer_idx] = torch.zeros(self.num_slots, *shape, dtype=torch.float32, device=device)
        elif tuple(found.shape[1:]) != tuple(shape):
            raise ValueError(f"StatePool: layer_idx {layer_idx} holds slots of shape {tuple(found.shape[1:])}, this "
                             f"layer needs {tuple(shape)}; give each layer a distinct layer_idx")
        return found

    def allocate(self) -> int:
        """A free slot, its states zeroed: the start of a new request."""
        if not self._free:
            raise RuntimeError(f"StatePool: all {self.num_slots} slots are in use; free finished requests' slots")
        slot = self._free.pop()
        for states in self._pools.values():
            states[slot].zero_()
        return slot

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"StatePool.free: slot {slot} is not an allocated slot")
        self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)


class LightningAttention(nn.Module):
    """Lightning attention block in the style of TransNormerLLM / MiniMax-01.

    ``q, k, v = silu(x W_qkv)`` per head; causal linear attention with the per-layer decay
    ``slopes(num_heads, layer_idx, num_layers)``; then ``out_proj(sigmoid(x W_gate) * rmsnorm(o))``.

    ``forward(x, state=None, *, cache=None) -> (y, new_state)`` with x ``[B, N, hidden_size]`` and
    states float32 ``[B, H, head_dim, head_dim]``. ``state`` continues a sequence; with a
    :class:`StateCache` the layer reads and stores its own state there under ``layer_idx`` (so
    stacked layers need distinct indices; the cache refuses two layers at one index), and short
    inputs (decode steps, up to ``STEP_MAX_TOKENS`` tokens, no gradients) update the cached state in
    place. ``new_state`` is always the caller's own tensor: with a cache it is a copy of the cached
    state, which later steps do not change (one state-sized copy per call); a ``state`` passed
    beside a cache is read, never updated in place.

    ``num_kv_heads`` (a divisor of ``num_heads``; default ``num_heads``): grouped-query heads, k and
    v projected to that many heads; the query heads of a group share one state and one decay
    (``slopes(num_kv_heads, ...)``), so states and the cache are ``[B, num_kv_heads, D, D]``.
    ``learnable_decay``: the decay is ``exp(log_decay)``, a parameter initialised to the slopes,
    which trains (the op gives its gradient); else a fixed buffer ``decay``.

    ``context_parallel_group``: a process group whose ranks each pass consecutive slices of one
    sequence (rank order); the layer then runs :func:`lightning_op.distributed.context_parallel_attn`
    and returns the whole sequence's final state on every rank. No cache in that mode.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: Optional[int] = None,
        *,
        layer_idx: int = 0,
        num_layers: int = 1,
        scale: float = 1.0,
        bias: bool = False,
        eps: float = 1e-6,
        num_kv_heads: Optional[int] = None,
        learnable_decay: bool = False,
        context_parallel_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(
                    f"LightningAttention: hidden_size {hidden_size} is not divisible by num_heads {num_heads}; "
                    "pass head_dim"
                )
            head_dim = hidden_size // num_heads
        refused = unsupported(head_dims=(("head_dim", head_dim),))
        if refused:  # named as this module's argument
            raise refused.error("LightningAttention: " + refused.reason.replace("head dim of head_dim", "head_dim"))
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1 or (
                num_heads % num_kv_heads):
            raise ValueError(f"LightningAttention: num_kv_heads must be a positive divisor of num_heads {num_heads}, "
                             f"got {num_kv_heads!r}")
        factory = dict(device=device, dtype=dtype)
        self.num_heads, self.head_dim, self.layer_idx, self.scale = num_heads, head_dim, layer_idx, scale
        self.num_kv_heads = num_kv_heads
        self.context_parallel_group = context_parallel_group
        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(hidden_size, inner + 2 * num_kv_heads * head_dim, bias=bias, **factory)
        self.gate_proj = nn.Linear(hidden_size, inner, bias=bias, **factory)
        self.norm = nn.RMSNorm(inner, eps=eps, **factory)
        self.out_proj = nn.Linear(inner, hidden_size, bias=bias, **factory)
        decay = slopes(num_kv_heads, layer_idx, num_layers) if num_layers > 1 else slopes(num_kv_heads)
        if learnable_decay:
            # float32 whatever the module's dtype: the decay enters exponents over long sequences
            self.log_decay = nn.Parameter(decay.log().to(device=device))
        else:
            # derived from the configuration, so not part of the state dict
            self.register_buffer("decay", decay.to(device=device), persistent=False)

    def forward(
        self, x: Tensor, state: Optional[Tensor] = None, *, cache=None, slots: Optional[Tensor] = None,
        cu_seqlens: Optional[Tensor] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if isinstance(cache, StatePool):
            return self._serve(x, cache, slots, cu_seqlens), None
        if slots is not None:
            raise ValueError("LightningAttention: slots address a StatePool; pass cache=pool")
        b, n, _ = x.shape
        if self.context_parallel_group is not None and cache is not None:
            raise ValueError(
                "LightningAttention: a context-parallel layer takes no cache (each rank holds a slice of one "
                "sequence); pass the whole sequence's state as state"
            )
        cached = None if cache is None else cache.get(self.layer_idx, owner=self)
        if state is None:
            state = cached
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = F.silu(self.qkv_proj(x)).split((h * d, hkv * d, hkv * d), dim=-1)
        # [B, H, N, D] views of [B, N, H, D]
        q, k, v = (t.view(b, n, heads, d).transpose(1, 2) for t, heads in ((q, h), (k, hkv), (v, hkv)))
        decay = self.log_decay.exp() if hasattr(self, "log_decay") else self.decay
        in_place = state is not None and state is cached and n <= STEP_MAX_TOKENS and not (
            torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        )
        if in_place:
            o = attn_step(q, k, v, state, decay, scale=self.scale)
            new_state = state
        elif self.context_parallel_group is not None:
            o, new_state = context_parallel_attn(q, k, v, decay, scale=self.scale, group=self.context_parallel_group,
                                                 initial_state=state, output_final_state=True)
        else:
            o, new_state = lightning_attn(
                q, k, v, decay, scale=self.scale, initial_state=state, output_final_state=True
            )
        if cache is not None:
            cache.set(self.layer_idx, new_state, owner=self)
            # the cached tensor changes in place at later decode steps: the caller gets a snapshot
            new_state = new_state.clone()
        o = o.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        y = self.out_proj(torch.sigmoid(self.gate_proj(x)) * self.norm(o))
        return y, new_state

    def _serve(self, x: Tensor, pool: StatePool, slots: Optional[Tensor], cu_seqlens: Optional[Tensor]) -> Tensor:
        """Rows (or packed sequences) continuing their slots of ``pool`` in place (inference)."""
        if slots is None:
            raise ValueError("LightningAttention: a StatePool needs slots (the slot of each row, or of each packed "
                             "sequence with cu_seqlens)")
        b, n, _ = x.shape
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = F.silu(self.qkv_proj(x)).split((h * d, hkv * d, hkv * d), dim=-1)
        q, k, v = (t.view(b, n, heads, d).transpose(1, 2) for t, heads in ((q, h), (k, hkv), (v, hkv)))
        decay = self.log_decay.exp() if hasattr(self, "log_decay") else self.decay
        state_heads = hkv if hkv < h and (decay is None or decay.shape[0] == hkv) else h
        states = pool.pool(self.layer_idx, (state_heads, d, d), x.device)
        o = attn_step(q, k, v, states, decay, scale=self.scale, cu_seqlens=cu_seqlens, state_indices=slots)
        o = o.transpose(1, 2).reshape(b, n, h * d)
        return self.out_proj(torch.sigmoid(self.gate_proj(x)) * self.norm(o))
