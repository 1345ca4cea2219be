"""Hugging Face transformers models in eager mode: their lightning-attention layers run the op.

::

    from lightning_op.integrations.transformers import patch_model, unpatch_model
    n = patch_model(model)     # in place; the number of layers patched
    unpatch_model(model)       # the original forwards again

transformers' MiniMax (``MiniMaxLightningAttention``, the MiniMax-Text-01 / M1 architecture) runs
its lightning layers as a Python loop over blocks of a fresh prompt and as a Python loop over
tokens whenever its cache holds a state. A patched layer computes the same function with the
same projections, activation, padding mask, norm, gate and output projection and the layer's own
``slope_rate``, with the op in place of the loops:

- without a cached state: ``lightning_attn`` over the whole input (differentiable);
- with one: ``lightning_attn(..., initial_state=state)`` for a prompt continued from the cache or
  under autograd, and the in-place ``attn_step`` for decode steps (at most ``STEP_MAX_TOKENS``
  tokens, no gradients).

The cache keeps the format transformers reads (``get_linear_cache`` / ``set_linear_cache``: one
``[B, H, D, D]`` tensor per lightning layer, which ``generate()``'s beam search and cache reuse
reorder, repeat and copy), holding float32 states whatever the model's dtype. A decode step
updates its layer's cached state in place: copy a cache (``copy.deepcopy``) before continuing it
in two ways. States the original layers stored in the model's dtype are read as float32.

Only this module imports transformers (when a function is called), so ``import lightning_op``
never needs it.
"""

from __future__ import annotations

import types
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from ..functional import attn_step, lightning_attn
from ..support import unsupported

__all__ = ["patch_model", "unpatch_model", "STEP_MAX_TOKENS"]

#: Inputs of at most this many tokens that continue a cached state without gradients take the
#: in-place decode step (its program keeps the state in registers across them); longer ones, the
#: tiled op.
STEP_MAX_TOKENS = 8

# the float32 [H] decays a patched layer hands the op, with the slope_rate they were made from:
# the op reads a GPU decay's values once per tensor (a host synchronisation), so the same tensor
# is passed on every call rather than a fresh conversion
_DECAY_MEMO = "_lightning_op_decay"


def _lightning_layer_classes() -> tuple[type, ...]:
    """The classes of transformers' lightning-attention layers (none where transformers, or its
    MiniMax, is missing)."""
    try:
        from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention
    except ImportError:
        return ()
    return (MiniMaxLightningAttention,)


def patch_model(model: nn.Module) -> int:
    """Make every lightning-attention layer of ``model`` run ``lightning_op``, in place.

    Layers are recognised by their exact class (a subclass may compute something else, so it is
    left alone); every other module is untouched. Returns the number of layers this call patched,
    and warns, saying why, when it is 0. Undo with :func:`unpatch_model`.
    """
    classes = _lightning_layer_classes()
    patched, already, skipped = 0, 0, []
    for name, module in model.named_modules():
        if type(module) not in classes:
            continue
        if _is_patched(module):
            already += 1
            continue
        slot = _forward_slot(module)
        refused = unsupported(head_dims=(("q, k and v", module.head_dim),))
        if refused or not _runs_the_class_forward(module, slot):
            skipped.append(f"{name or type(module).__name__} ("
                           + (refused.reason if refused else "its forward is already replaced by something else") + ")")
            continue
        setattr(module, slot, types.MethodType(_patched_forward, module))
        patched += 1
    left_alone = f"left {len(skipped)} layer(s) as they were: {'; '.join(skipped)}"
    if patched == 0:
        if skipped:
            why = left_alone
        elif already:
            why = f"its {already} lightning-attention layer(s) were patched already"
        elif not classes:
            why = "transformers (with its MiniMax model) could not be imported"
        else:
            why = ("it has no lightning-attention layer (looked for " + ", ".join(c.__name__ for c in classes)
                   + f" in {type(model).__name__})")
        warnings.warn(f"lightning_op patch_model: patched no layer: {why}", stacklevel=2)
    elif skipped:
        warnings.warn(f"lightning_op patch_model: {left_alone}", stacklevel=2)
    return patched


def unpatch_model(model: nn.Module) -> int:
    """Give the layers :func:`patch_model` patched their original forwards back; returns how many.

    A cache filled by patched layers holds float32 states, which the original layers of a 16-bit
    model cannot continue: start their generation from a fresh cache.
    """
    restored = 0
    for module in model.modules():
        slot = _forward_slot(module)
        if _is_patched(module, slot):
            if slot == "forward":
                del module.forward
            else:
                setattr(module, slot, types.MethodType(type(module).forward, module))
            module.__dict__.pop(_DECAY_MEMO, None)
            restored += 1
    return restored


def _forward_slot(module: nn.Module) -> str:
    """The instance attribute that holds the forward to replace. accelerate's hooks (a model
    loaded with ``device_map=``) replace ``forward`` with a wrapper that moves the inputs and calls
    the forward they keep in ``_old_forward``: that one is replaced, so the hook keeps working."""
    return "_old_forward" if "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__ else "forward"


def _runs_the_class_forward(module: nn.Module, slot: str) -> bool:
    forward = module.__dict__.get(slot)
    if slot == "forward":
        return forward is None
    return isinstance(forward, types.MethodType) and forward.__func__ is type(module).forward


def _is_patched(module: nn.Module, slot: Optional[str] = None) -> bool:
    forward = module.__dict__.get(slot or _forward_slot(module))
    return isinstance(forward, types.MethodType) and forward.__func__ is _patched_forward


def _decay(layer: nn.Module) -> Tensor:
    """The layer's ``slope_rate`` ([H, 1, 1], lam = exp(-slope)) as the op's float32 [H] decays."""
    slopes = layer.slope_rate
    if torch.compiler.is_compiling():
        return slopes.reshape(-1).to(torch.float32)
    # (inference tensors, of a model built under torch.inference_mode, keep no version counter)
    version = None if slopes.is_inference() else slopes._version
    key = (slopes.data_ptr(), version, slopes.dtype, slopes.device)
    memo = layer.__dict__.get(_DECAY_MEMO)
    if memo is None or memo[0] != key:
        memo = (key, slopes.detach().reshape(-1).to(torch.float32))
        layer.__dict__[_DECAY_MEMO] = memo
    return memo[1]


def _steppable(state: Tensor) -> Tensor:
    """The cached state, or a copy that the in-place step may update: float32 (the original layers
    store the model's dtype) and, outside inference mode, not an inference tensor (a cache filled
    under ``torch.inference_mode``)."""
    if state.dtype != torch.float32 or (
        not torch.compiler.is_compiling() and state.is_inference() and not torch.is_inference_mode_enabled()
    ):
        return state.to(torch.float32, copy=True)
    return state


def _patched_forward(
    self, hidden_states: Tensor, position_embeddings=None, attention_mask: Optional[Tensor] = None,
    cache=None, **kwargs,
) -> tuple[Tensor, Tensor]:
    """``MiniMaxLightningAttention.forward`` with the op: ``(output, state)``, the state float32."""
    if cache is None:
        cache = kwargs.get("past_key_values")  # the argument's older name
    batch, length, _ = hidden_states.shape
    heads, head_dim = self.num_attention_heads, self.head_dim

    qkv = self.act_fn(self.qkv_proj(hidden_states))
    if attention_mask is not None:
        # a 2D padding mask: padded positions give zero q, k and v, so they add nothing to the state
        qkv = (qkv * attention_mask[:, :, None]).to(qkv.dtype)
    q, k, v = qkv.reshape(batch, length, heads, 3 * head_dim).split(head_dim, dim=3)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, N, D] views, read in place

    state = cache.get_linear_cache(self.layer_idx) if cache is not None else None
    if not isinstance(state, Tensor):
        state = None
    decay = _decay(self)
    if state is not None and length <= STEP_MAX_TOKENS and not (
        torch.is_grad_enabled() and (qkv.requires_grad or state.requires_grad)
    ):
        state = _steppable(state)
        out = attn_step(q, k, v, state, decay)
    else:
        out, state = lightning_attn(q, k, v, decay, initial_state=state, output_final_state=True)

    out = out.transpose(1, 2).reshape(batch, length, heads * head_dim)
    out = self.norm(out)
    out = torch.sigmoid(self.output_gate(hidden_states)) * out
    out = self.out_proj(out)
    if cache is not None:
        cache.set_linear_cache(self.layer_idx, state)
    return out, state
