"""torch.library registration of ``lightning::attn`` and ``lightning::attn_bwd``.

Each op sits with its fake directly beneath it; the autograd glue calls only ops, so compiled
forward and backward graphs hold two opaque nodes. Plain eager calls of ``lightning_attn`` run the
same bodies without the dispatcher (``attn_eager``: host time, see "eager path" below). CUDA
tensors run the Triton kernels; CPU tensors run the chunked PyTorch form of ``reference.py`` (or,
with ``LIGHTNING_OP_BACKEND=triton`` and ``TRITON_INTERPRET=1``, the same Triton kernels through
the interpreter).
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import warnings
import weakref
from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import backends, reference
from ._gates import HAS_TRITON, cpu_backend
from ._layout import empty_bhnd, in_layout, output_bnhd, stored_bnhd
from .support import DTYPES, unsupported

__all__ = ["attn", "attn_bwd", "attn_eager", "attn_step", "validate", "validate_backward", "validate_step", "prepare_decay",
           "as_float32"]



# ----------------------------------------------------------------------------- validation


def _require_equal(actual, expected, message: Callable[[], str]) -> None:
    """``actual == expected`` for sizes that may be symbolic under torch.compile / torch.export.

    The message is built only on failure: formatting a symbolic size would specialise it.
    """
    if isinstance(actual, torch.SymInt) or isinstance(expected, torch.SymInt):
        torch._check(actual == expected, message)
    elif actual != expected:
        raise ValueError(message())


def _check_tensor(name: str, x, ndim: int, op: str = "attn") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"lightning {op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"lightning {op}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"lightning {op}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def validate(q, k, v, decay=None, scale=1.0, initial_state=None, cu_seqlens=None, check_values: bool = True) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument if the inputs are not an attn call.

    Shapes, dtypes and devices, and the values of ``cu_seqlens`` where they can be read (see
    :func:`_check_cu_seqlens_values`; not with ``check_values=False``, for a caller that reads
    them with others); a decay's values are checked by :func:`prepare_decay`.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, 4)
    refused = unsupported(dtypes=(("q", q.dtype),))
    if refused:
        raise refused.error(f"lightning attn: {refused.reason}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"lightning attn: {name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"lightning attn: {name} is on {x.device} but q is on {q.device}")
    b, h, n, dk = q.shape
    dv = v.shape[3]
    for name, x in (("k", k), ("v", v)):
        for dim, what in ((0, "batch size"), (2, "sequence length")):
            _require_equal(
                x.shape[dim], q.shape[dim],
                lambda: f"lightning attn: {name} has {what} {x.shape[dim]} (dim {dim}) but q has {q.shape[dim]}; "
                f"q: [B, H, N, Dk], k: [B, Hkv, N, Dk], v: [B, Hkv, N, Dv]",
            )
    hkv = k.shape[1]
    _require_equal(v.shape[1], hkv, lambda: f"lightning attn: v has {v.shape[1]} heads but k has {hkv}; k and v "
                   "must have the same number of heads (Hkv)")
    _require_equal(k.shape[3], dk, lambda: f"lightning attn: k has head dim {k.shape[3]} but q has {dk}")
    _check_groups(h, hkv)
    refused = unsupported(head_dims=(("q and k", dk), ("v", dv)))
    if refused:
        raise refused.error(f"lightning attn: {refused.reason}")
    if decay is not None:
        _check_tensor("decay", decay, 1)
        if not _is_size(decay.shape[0], h) and not _is_size(decay.shape[0], hkv):
            raise ValueError(
                f"lightning attn: decay must have shape [H] = [{h}] (a state per query head) or [Hkv] = [{hkv}] "
                f"(a state per kv head), got {tuple(decay.shape)}"
            )
        if decay.device != q.device:
            raise ValueError(f"lightning attn: decay is on {decay.device} but q is on {q.device}")
    rows = b
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, q, check_values)
        rows = cu_seqlens.shape[0] - 1
    if initial_state is not None:
        hs = reference.state_heads(h, hkv, decay)
        _check_state_like("attn", "initial_state", initial_state, "shape", (rows, hs, dk, dv),
                          ("S" if cu_seqlens is not None else "B", "H" if hs == h else "Hkv", "Dk", "Dv"), q)
    _check_scale(scale)


def _is_size(actual, expected) -> bool:
    """``actual == expected`` as a Python bool, for sizes that may be symbolic (compared through
    their hints: a guard, which is what a shape check is)."""
    return bool(actual == expected)


def _check_groups(h, hkv) -> None:
    if isinstance(h, torch.SymInt) or isinstance(hkv, torch.SymInt):
        torch._check(h % hkv == 0, lambda: f"lightning attn: q's {h} heads must be a multiple of k's {hkv}")
        return
    if hkv == 0 or h % hkv != 0:
        raise ValueError(
            f"lightning attn: q has {h} heads and k, v have {hkv}; grouped-query heads need Hkv to divide H "
            "(query head h reads kv head h // (H // Hkv))"
        )


def _check_cu_seqlens(cu_seqlens, q: Tensor, check_values: bool = True) -> None:
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"lightning attn: cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"lightning attn: cu_seqlens must be int32 or int64, got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1:
        raise ValueError(
            f"lightning attn: cu_seqlens must be 1-D [S + 1] (sequence starts, then N), got shape {tuple(cu_seqlens.shape)}"
        )
    if not _is_size(cu_seqlens.shape[0] >= 1, True):
        raise ValueError("lightning attn: cu_seqlens must hold at least one entry (0 for no sequences)")
    _require_equal(q.shape[0], 1, lambda: f"lightning attn: with cu_seqlens the batch must be 1 (the sequences are "
                   f"packed along N), got q with batch {q.shape[0]}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"lightning attn: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if check_values:
        _check_cu_seqlens_values(cu_seqlens, q.shape[2])


def _check_cu_seqlens_values(cu_seqlens: Tensor, n) -> None:
    """``0 = cu[0] <= cu[1] <= ... <= cu[S] = N``, where the values can be read: always on the CPU,
    on a GPU with one host read (not during CUDA-graph capture), never while tracing.

    The host read waits for the GPU, and the launches after it then wait for the host: that
    costs the eager forward of a packed batch more than half its GPU time (benchmarks/RESULTS.md).
    So a CUDA ``cu_seqlens`` that passed is not read again for the same N until its version
    counter, address or layout changes (``_remembered_cu_seqlens``, as ``_remembered_indices``):
    the layers of a model, and the backward, share one read per batch."""
    if torch.compiler.is_compiling() or isinstance(n, torch.SymInt) or not _has_values(cu_seqlens):
        return  # traced: the values are not known (nor checked again when the graph runs)
    remembered = _remembered_key((cu_seqlens,), n)
    if remembered is not None and _recall(_remembered_cu_seqlens, remembered) is not _MISSED:
        return
    if cu_seqlens.is_cuda:
        if torch.cuda.is_current_stream_capturing():
            return
        bad = (cu_seqlens[0] != 0) | (cu_seqlens[-1] != n) | (cu_seqlens.diff() < 0).any()
        if bool(bad):  # the one host read
            _check_cu_seqlens_list(cu_seqlens.tolist(), n)
    else:
        _check_cu_seqlens_list(cu_seqlens.tolist(), n)
    if remembered is not None:
        _remember(_remembered_cu_seqlens, remembered)


#: CUDA cu_seqlens whose values passed, keyed as ``_remembered_indices`` (with N in place of the
#: pool's slots). A write the version counter does not see is missed, as for remembered decays; the
#: kernels then read the bounds clamped into the rows (``chunked._packed_plan_kernel``).
_remembered_cu_seqlens: dict = {}


def _check_cu_seqlens_list(values: list, n: int) -> None:
    """:func:`_check_cu_seqlens_values` on values read."""
    if values[0] != 0 or values[-1] != n or any(b < a for a, b in zip(values, values[1:])):
        shown = values if len(values) <= 12 else values[:6] + ["..."] + values[-6:]
        raise ValueError(
            f"lightning attn: cu_seqlens must rise from 0 to N = {n} without decreasing "
            f"(sequence s holds rows cu[s] .. cu[s+1] - 1), got {shown}"
        )


def _check_state_like(op: str, name: str, x, what: str, sizes: tuple, letters: tuple, q: Tensor) -> None:
    """``x`` is a 4-d floating tensor of ``sizes`` (named ``letters`` in messages) on q's device."""
    _check_tensor(name, x, 4, op=op)
    for dim, (size, letter) in enumerate(zip(sizes, letters)):
        _require_equal(
            x.shape[dim], size,
            lambda letter=letter: f"lightning {op}: {name} must have {what} [{', '.join(letters)}] = "
            f"[{', '.join(str(n) for n in sizes)}], got {tuple(x.shape)} ({letter} differs)",
        )
    if x.device != q.device:
        raise ValueError(f"lightning {op}: {name} is on {x.device} but q is on {q.device}")


def _check_scale(scale) -> None:
    if isinstance(scale, torch.SymFloat) or torch.compiler.is_dynamo_compiling():
        return  # a symbolic float (a module attribute under dynamic=True): checked when the op runs
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"lightning attn: scale must be a finite float, got {scale!r}")


#: Decays at or above this are lam = exp(-decay) = 0 in float32 and float64 alike (exp(-104) is
#: already below float32's smallest subnormal). Larger ones, inf included, are clamped to it:
#: every decay factor is lam^e = exp(-decay * e), and ``inf * 0`` at e = 0 would be NaN where
#: lam^0 = 1 is meant; the kernels' ``-decay * log2(e)`` overflows from about 2.4e38 the same way.
DECAY_SATURATION = 1.0e4


def prepare_decay(decay: Optional[Tensor]) -> Optional[Tensor]:
    """The decays as the kernels and the chunked path read them, after checking their values.

    A negative or NaN slope turns its head to NaN, so the values are checked: on the CPU on
    every call (a copy of H numbers; a check that trusted a version counter would miss writes
    through ``.data`` or a NumPy view). On a GPU reading them is a host synchronisation, which
    can cost more than the call itself (benchmarks/RESULTS.md), so a GPU
    tensor is read when first seen and again whenever its version counter or storage changes
    (``_remembered_decays``). Nothing is read during CUDA-graph capture (the warm-up calls before
    it are checked) or for meta and fake tensors. The result is float32, contiguous (the kernels
    index ``DECAY + h``; a strided view such as ``slopes(8)[::2]`` would otherwise be read as its
    neighbours) and at most ``DECAY_SATURATION``.
    """
    if decay is None:
        return None
    if not _has_values(decay) or (decay.is_cuda and torch.cuda.is_current_stream_capturing()):
        saturate = True  # unknown values: the clamp is one captured or traced elementwise op
    elif _reads_every_call(decay):
        saturate = _checked_decay_values(decay)
    else:
        key = (decay._version, decay.data_ptr(), decay.shape, decay.stride(), decay.dtype)
        seen = _remembered_decays.get(id(decay))
        if seen is not None and seen[0]() is decay and seen[1] == key:
            saturate = seen[2]
        else:
            saturate = _checked_decay_values(decay)
            if len(_remembered_decays) > 1024:
                _remembered_decays.clear()
            _remembered_decays[id(decay)] = (weakref.ref(decay), key, saturate)
    if saturate:
        decay = decay.to(torch.float32).clamp(max=DECAY_SATURATION)
    if decay.dtype == torch.float32 and decay.is_contiguous():
        return decay
    return decay.to(torch.float32).contiguous()


#: GPU decays whose values were checked: id -> (weak reference, (version, address, layout), whether
#: any slope passes DECAY_SATURATION).
_remembered_decays: dict = {}


def _reads_every_call(decay: Tensor) -> bool:
    """CPU decays, and inference tensors (they keep no version counter), are read on every call."""
    return decay.device.type == "cpu" or decay.is_inference()


def _checked_decay_values(decay: Tensor) -> bool:
    """Raise unless every slope is >= 0 (NaN fails); return whether any passes DECAY_SATURATION."""
    values = decay.detach().tolist()
    if not all(x >= 0 for x in values):
        raise ValueError(f"lightning attn: decay must hold slopes >= 0 (lam = exp(-decay)); got {values}")
    return max(values, default=0.0) > DECAY_SATURATION


def _has_values(x: Tensor) -> bool:
    """Whether ``x``'s elements can be read: not a meta tensor, nor a fake one of tracing."""
    return x.device.type != "meta" and not is_fake(x)


def _backend(x: Tensor) -> backends.Backend:
    """The Triton kernels for CUDA tensors (and for CPU tensors under ``LIGHTNING_OP_BACKEND=triton``),
    else the chunked PyTorch form."""
    if x.is_cuda:
        if not HAS_TRITON:
            raise RuntimeError("lightning attn: CUDA tensors need triton installed")
        return backends.triton()
    return backends.triton() if cpu_backend() == "triton" else backends.chunked()


def as_float32(x: Optional[Tensor]) -> Optional[Tensor]:
    # the dtype test first: a no-op ``.to`` still costs a dispatch
    return x if x is None or x.dtype == torch.float32 else x.to(torch.float32)


def _has_tangent(*tensors) -> bool:
    """Whether a ``torch.autograd.forward_ad`` dual tensor is among ``tensors``."""
    if forward_ad._current_level < 0:
        return False
    for x in tensors:
        if x is None or not _has_values(x):
            continue
        try:
            if forward_ad.unpack_dual(x).tangent is not None:
                return True
        except RuntimeError:  # below autograd inside a tracer (torch.func.linearize's make_fx): no dual to see
            pass
    return False


def _refuse_forward_ad(*tensors) -> None:
    """The op has no forward-mode formula of its own (``custom_op`` cannot register one): a dual
    input would silently get a zero tangent. ``lightning_attn`` has one (``_TransformableAttention``)."""
    if forward_ad._current_level < 0 or torch._C._functorch.peek_interpreter_stack() is not None:
        return  # under a functorch transform lightning_attn took _TransformableAttention already
    if _has_tangent(*tensors):
        raise RuntimeError(
            "lightning attn: torch.ops.lightning.attn has no forward-mode derivative of its own; call "
            "lightning_op.lightning_attn, which supports torch.autograd.forward_ad and torch.func.jvp / "
            "jacfwd / linearize"
        )


# ----------------------------------------------------------------------------- forward


@torch.library.custom_op("lightning::attn", mutates_args=())
def attn(
    q: Tensor, k: Tensor, v: Tensor, decay: Optional[Tensor] = None, scale: float = 1.0,
    initial_state: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Causal linear attention with per-head decay: returns ``(out [B,H,N,Dv], final_state fp32)``."""
    validate(q, k, v, decay, scale, initial_state, cu_seqlens)
    return _attn_impl(q, k, v, decay, scale, initial_state, cu_seqlens, out_bnhd=output_bnhd(q))


def _attn_impl(q, k, v, decay, scale, initial_state, cu_seqlens=None, keep_start_states=None, out_bnhd=False,
               cut=None, store_final=True):
    """``lightning::attn`` on validated inputs (the op's body, also run by the eager path, which
    passes ``keep_start_states``: see ``kernels.linear_attention``). ``out_bnhd``: the output
    stored as [B, N, H, Dv] (the op's, for q in that layout: ``output_bnhd``); ``cut``: see
    ``backends.forward``; without ``store_final`` the final state is None (``attn_eager``'s
    ``final``)."""
    _refuse_forward_ad(q, k, v, decay, initial_state)
    decay, initial_state = prepare_decay(decay), as_float32(initial_state)
    out, final = backends.forward(_backend(q), q, k, v, decay, scale, initial_state, keep_start_states=keep_start_states,
                                  cu_seqlens=cu_seqlens, out_bnhd=out_bnhd, cut=cut, store_final=store_final)
    return out, None if final is None else final.to(torch.float32)


def final_state_shape(q: Tensor, k: Tensor, v: Tensor, decay: Optional[Tensor], cu_seqlens: Optional[Tensor]):
    """``[B or S, Hs, Dk, Dv]``: one state per sequence and per query head, or per kv head where a
    group shares it (``reference.state_heads``)."""
    rows = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return rows, reference.state_heads(q.shape[1], k.shape[1], decay), q.shape[3], v.shape[3]


@attn.register_fake
def _attn_fake(q, k, v, decay=None, scale=1.0, initial_state=None, cu_seqlens=None):
    validate(q, k, v, decay, scale, initial_state, cu_seqlens)
    b, h, n, dk = q.shape
    dv = v.shape[3]
    out = empty_bhnd((b, h, n, dv), q.dtype, q.device, output_bnhd(q))
    return out, q.new_empty(final_state_shape(q, k, v, decay, cu_seqlens), dtype=torch.float32)


# ----------------------------------------------------------------------------- forward for training graphs
#
# The op's autograd (below) saves its inputs; the backward's dq pass then computes the segment
# start states again, a pass over k and v that the forward had already made (the eager path keeps
# them: ``_EagerAttention``). Where the forward will cut the sequence into segments and the cut is
# known from the shapes alone (``Backend.start_states_layout``), the autograd calls this op
# instead: the same forward with that cut fixed, also returning the start states, which
# compiled training graphs then carry to ``attn_bwd`` (``forward_states``).


@torch.library.custom_op("lightning::attn_train", mutates_args=())
def attn_train(
    q: Tensor, k: Tensor, v: Tensor, decay: Optional[Tensor], scale: float, initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor], segment_len: int, state_split: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``lightning::attn`` cut into segments of ``segment_len`` rows whose start states are
    computed in ``state_split`` pieces each, returning ``(out, final_state, start_states)``: float32
    ``[B*H, (ceil(N / segment_len) - 1) * state_split + 1, Dk, Dv]`` (H query heads; a pack of
    sequences has as many slots as one sequence of its N rows), for ``attn_bwd``'s
    ``forward_states``. A backend that keeps no start states (the chunked CPU form) returns zeros."""
    validate_train(q, k, v, decay, scale, initial_state, cu_seqlens, segment_len, state_split)
    backend = _backend(q)
    shape = _start_states_shape(q, v, segment_len, state_split)
    if backend.start_states_layout is None:
        out, final = _attn_impl(q, k, v, decay, scale, initial_state, cu_seqlens, out_bnhd=output_bnhd(q))
        return out, final, q.new_zeros(shape, dtype=torch.float32)
    kept = []
    out, final = _attn_impl(q, k, v, decay, scale, initial_state, cu_seqlens, keep_start_states=kept,
                            out_bnhd=output_bnhd(q), cut=(segment_len, state_split))
    if not kept:  # one segment covers N: the backward starts from the initial state
        return out, final, q.new_zeros(shape, dtype=torch.float32)
    states = kept[0].states
    if tuple(states.shape) != shape or kept[0].segment_len != segment_len or kept[0].state_split != state_split:
        raise RuntimeError(
            f"lightning attn_train: the forward kept start states of shape {tuple(states.shape)} in segments of "
            f"{kept[0].segment_len} split {kept[0].state_split}, where segments of {segment_len} split "
            f"{state_split} ({shape}) were asked for"
        )
    return out, final, states


def validate_train(q, k, v, decay, scale, initial_state, cu_seqlens, segment_len, state_split) -> None:
    """``validate`` for ``lightning::attn_train``: the forward's arguments and a cut of positive
    integers."""
    validate(q, k, v, decay, scale, initial_state, cu_seqlens)
    _check_cut("attn_train", ("segment_len", segment_len), ("state_split", state_split))


def _check_cut(op: str, *named) -> None:
    for name, value in named:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"lightning {op}: {name} must be a positive int, got {value!r}")


def _start_states_shape(q: Tensor, v: Tensor, segment_len: int, state_split: int) -> tuple:
    """``kernels.launch._num_slots``' count for this cut, without importing the kernels (the fake
    runs where triton is absent)."""
    b, h, n, dk = q.shape
    segments = (torch.sym_max(n, 1) + segment_len - 1) // segment_len
    return b * h, (segments - 1) * state_split + 1, dk, v.shape[3]


@attn_train.register_fake
def _attn_train_fake(q, k, v, decay, scale, initial_state, cu_seqlens, segment_len, state_split):
    validate_train(q, k, v, decay, scale, initial_state, cu_seqlens, segment_len, state_split)
    out, final = _attn_fake(q, k, v, decay, scale, initial_state, cu_seqlens)
    return out, final, q.new_empty(_start_states_shape(q, v, segment_len, state_split), dtype=torch.float32)


# ----------------------------------------------------------------------------- backward


@torch.library.custom_op("lightning::attn_bwd", mutates_args=())
def attn_bwd(
    grad_out: Tensor, grad_final_state: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
    decay: Optional[Tensor] = None, scale: float = 1.0, initial_state: Optional[Tensor] = None, bnhd_grads: bool = False,
    cu_seqlens: Optional[Tensor] = None, decay_grad: bool = False, forward_states: Optional[Tensor] = None,
    forward_segment_len: int = 0, forward_state_split: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv, d_initial_state, d_decay)`` of ``lightning::attn``.

    ``bnhd_grads`` stores dq, dk, dv as [B, N, H, D] (returned as [B, H, N, D] views), for inputs
    kept in that layout: autograd then hands them to the [B, N, H, D] leaves without a copy. The
    layout follows this flag alone, never the inputs' strides, so fake and real outputs agree
    whatever layout a compiler chose for the saved inputs.

    ``d_initial_state`` is an empty tensor when ``initial_state`` is None (an op cannot return
    None), ``d_decay`` (float32, the decay's shape) unless ``decay_grad``.

    ``forward_states``: the start states ``lightning::attn_train`` returned for these inputs with
    the cut ``(forward_segment_len, forward_state_split)``; dq's pass starts its segments from them
    where it cuts the sequence the same way (it needs no pass over k and v of its own then).
    """
    validate_backward(grad_out, grad_final_state, q, k, v, decay, scale, initial_state, bnhd_grads, cu_seqlens,
                      decay_grad, forward_states, forward_segment_len, forward_state_split)
    kept = None
    if forward_states is not None and _backend(q).start_states_layout is not None:
        from .kernels import SegmentStates  # the backend that keeps them is the Triton one

        kept = SegmentStates(forward_states, forward_segment_len, forward_state_split, packed=cu_seqlens is not None)
    return _attn_bwd_impl(grad_out, grad_final_state, q, k, v, decay, scale, initial_state, bnhd_grads, cu_seqlens,
                          decay_grad, forward_states=kept)


def validate_backward(grad_out, grad_final_state, q, k, v, decay=None, scale=1.0, initial_state=None,
                      bnhd_grads=False, cu_seqlens=None, decay_grad=False, forward_states=None, forward_segment_len=0,
                      forward_state_split=1) -> None:
    """``validate`` for ``lightning::attn_bwd``: the forward's arguments, plus ``grad_out``
    ``[B, H, N, Dv]`` in q's dtype and ``grad_final_state`` shaped as the final state (any float
    dtype); ``decay_grad`` needs a decay; ``forward_states`` as ``attn_train`` returns them for
    the cut given."""
    validate(q, k, v, decay, scale, initial_state, cu_seqlens)
    b, h, n, dk = q.shape
    dv = v.shape[3]
    _check_state_like("attn_bwd", "grad_out", grad_out, "the output's shape", (b, h, n, dv), ("B", "H", "N", "Dv"), q)
    if grad_out.dtype != q.dtype:
        raise TypeError(f"lightning attn_bwd: grad_out must have the output's dtype {q.dtype}, got {grad_out.dtype}")
    if grad_final_state is not None:
        shape = final_state_shape(q, k, v, decay, cu_seqlens)
        _check_state_like("attn_bwd", "grad_final_state", grad_final_state, "the final state's shape", shape,
                          ("S" if cu_seqlens is not None else "B", "Hs", "Dk", "Dv"), q)
        if grad_final_state.dtype not in DTYPES:
            raise TypeError(
                f"lightning attn_bwd: grad_final_state must be float16, bfloat16 or float32, got {grad_final_state.dtype}"
            )
    for name, flag in (("bnhd_grads", bnhd_grads), ("decay_grad", decay_grad)):
        if not isinstance(flag, bool):
            raise TypeError(f"lightning attn_bwd: {name} must be a bool, got {flag!r}")
    if decay_grad and decay is None:
        raise ValueError("lightning attn_bwd: decay_grad=True needs a decay")
    if forward_states is not None:
        _check_cut("attn_bwd", ("forward_segment_len", forward_segment_len), ("forward_state_split", forward_state_split))
        shape = _start_states_shape(q, v, forward_segment_len, forward_state_split)
        _check_state_like("attn_bwd", "forward_states", forward_states, "attn_train's start states' shape", shape,
                          ("B*H", "slots", "Dk", "Dv"), q)
        if forward_states.dtype != torch.float32:
            raise TypeError(f"lightning attn_bwd: forward_states must be float32, got {forward_states.dtype}")


def _attn_bwd_impl(grad_out, grad_final_state, q, k, v, decay, scale, initial_state, bnhd_grads, cu_seqlens=None,
                   decay_grad=False, forward_states=None, grad_final_of=None):
    """``lightning::attn_bwd``'s body (also run by the eager path, which passes the forward's
    segment states, and by context parallelism, which passes ``grad_final_of``:
    ``backends.backward``)."""
    decay, initial_state, grad_final_state = prepare_decay(decay), as_float32(initial_state), as_float32(grad_final_state)
    backend = _backend(q)
    hook = {} if grad_final_of is None else dict(grad_final_of=grad_final_of)
    dq, dk, dv, d_init, d_decay = backends.backward(
        backend, grad_out, grad_final_state, q, k, v, decay, scale, initial_state, out_bnhd=bnhd_grads,
        forward_states=forward_states, cu_seqlens=cu_seqlens, decay_grad=decay_grad, **hook,
    )
    d_init = q.new_empty(0, dtype=torch.float32) if d_init is None else as_float32(d_init)
    d_decay = q.new_empty(0, dtype=torch.float32) if d_decay is None else as_float32(d_decay)
    return in_layout(dq, bnhd_grads), in_layout(dk, bnhd_grads), in_layout(dv, bnhd_grads), d_init, d_decay


@attn_bwd.register_fake
def _attn_bwd_fake(grad_out, grad_final_state, q, k, v, decay=None, scale=1.0, initial_state=None, bnhd_grads=False,
                   cu_seqlens=None, decay_grad=False, forward_states=None, forward_segment_len=0, forward_state_split=1):
    validate_backward(grad_out, grad_final_state, q, k, v, decay, scale, initial_state, bnhd_grads, cu_seqlens,
                      decay_grad, forward_states, forward_segment_len, forward_state_split)
    d_init = q.new_empty(0, dtype=torch.float32) if initial_state is None else initial_state.new_empty(
        initial_state.shape, dtype=torch.float32
    )
    d_decay = decay.new_empty(decay.shape, dtype=torch.float32) if decay_grad else q.new_empty(0, dtype=torch.float32)
    return tuple(empty_bhnd(x.shape, x.dtype, x.device, bnhd_grads) for x in (q, k, v)) + (d_init, d_decay)


# ----------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output, *extra_saved):
    q, k, v, decay, scale, initial_state, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, decay, initial_state, cu_seqlens, *extra_saved)
    ctx.scale = scale
    ctx.has_initial_state = initial_state is not None


def _backward(ctx, grad_out, grad_final_state, attn_bwd_fn=None):
    q, k, v, decay, initial_state, cu_seqlens = ctx.saved_tensors[:6]
    if grad_out is None:  # the eager path leaves unused outputs' gradients unmaterialised
        grad_out = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    decay_grad = decay is not None and ctx.needs_input_grad[3]
    dq, dk, dv, d_init, d_decay = (attn_bwd_fn or torch.ops.lightning.attn_bwd)(
        _readable_grad(grad_out), None if grad_final_state is None else grad_final_state.contiguous(),
        q, k, v, decay, ctx.scale, initial_state, stored_bnhd(q), cu_seqlens, decay_grad,
    )
    d_init = d_init.to(initial_state.dtype) if ctx.has_initial_state else None
    d_decay = d_decay.to(decay.dtype) if decay_grad else None
    return dq, dk, dv, d_decay, None, d_init, None


def _readable_grad(grad_out: Tensor) -> Tensor:
    """The output's gradient in one of the two layouts the kernels are tuned for, copied only from
    another (an expanded zero-stride gradient, say): the gradient of an output stored as
    [B, N, H, Dv] usually comes back in that layout, and reading it in place saves a copy of it."""
    return in_layout(grad_out, stored_bnhd(grad_out))


attn.register_autograd(_backward, setup_context=_setup_context)


# The op's autograd kernel, in place of the one ``register_autograd`` generates: the same formula,
# but where the forward's cut is known from the shapes it runs ``attn_train`` and hands the start
# states to the backward (see "forward for training graphs" above). Compiled training graphs
# (AOTAutograd's) record what this kernel calls: ``attn_train`` and ``attn_bwd``, or ``attn`` and
# ``attn_bwd``.


def _attn_autograd(keyset, q, k, v, decay=None, scale=1.0, initial_state=None, cu_seqlens=None):
    if _differentiated(q, k, v, decay, initial_state):
        layout = _kept_layout(q, k, v)
        if layout is not None:
            return _AttentionKeepingStates.apply(q, k, v, decay, scale, initial_state, cu_seqlens, layout)
        return _OpAttention.apply(q, k, v, decay, scale, initial_state, cu_seqlens, keyset)
    return _attn_below_autograd(keyset, q, k, v, decay, scale, initial_state, cu_seqlens)


def _differentiated(*inputs) -> bool:
    """Whether autograd records the call: grad mode on and an input (or None) requiring grad."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)


def _attn_below_autograd(keyset, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.lightning.attn.default.redispatch(keyset & torch._C._after_autograd_keyset, *args)


def _kept_layout(q: Tensor, k: Tensor, v: Tensor):
    """The cut of the forward's start states where the backend keeps them and the shapes tell it
    (``Backend.start_states_layout``); None for DTensors, whose local shapes are not these."""
    backend = _backend(q)
    if backend.start_states_layout is None or _is_dtensor(q):
        return None
    return backend.start_states_layout(q, k, v)


def _is_dtensor(x: Tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


class _OpAttention(torch.autograd.Function):
    """``lightning::attn`` below autograd, its inputs saved for ``attn_bwd``."""

    # the op's inputs first, in the op's order: _backward reads ctx.needs_input_grad by their positions
    @staticmethod
    def forward(ctx, q, k, v, decay, scale, initial_state, cu_seqlens, keyset):
        inputs = (q, k, v, decay, scale, initial_state, cu_seqlens)
        output = _attn_below_autograd(keyset, *inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_final_state):
        return _backward(ctx, grad_out, grad_final_state) + (None,)


class _AttentionKeepingStates(torch.autograd.Function):
    """``lightning::attn_train`` with the cut ``layout``, its start states saved for ``attn_bwd``."""

    @staticmethod
    def forward(ctx, q, k, v, decay, scale, initial_state, cu_seqlens, layout):
        out, final, states = torch.ops.lightning.attn_train(q, k, v, decay, scale, initial_state, cu_seqlens,
                                                            layout.segment_len, layout.state_split)
        _setup_context(ctx, (q, k, v, decay, scale, initial_state, cu_seqlens), (out, final), states)
        ctx.layout = layout
        return out, final

    @staticmethod
    def backward(ctx, grad_out, grad_final_state):
        bwd = functools.partial(torch.ops.lightning.attn_bwd, forward_states=ctx.saved_tensors[6],
                                forward_segment_len=ctx.layout.segment_len,
                                forward_state_split=ctx.layout.state_split)
        return _backward(ctx, grad_out, grad_final_state, attn_bwd_fn=bwd) + (None,)


_autograd_lib = torch.library.Library("lightning", "IMPL")
with warnings.catch_warnings():  # replacing register_autograd's kernel is the point
    warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
    # torch 2.8 to 2.12 refuse to replace a kernel registered from Python unless asked to
    # (``allow_override``, default True from 2.13)
    _override = {"allow_override": True} if "allow_override" in inspect.signature(_autograd_lib.impl).parameters else {}
    _autograd_lib.impl("attn", _attn_autograd, "Autograd", with_keyset=True, **_override)


# ----------------------------------------------------------------------------- eager path
#
# In eager mode, the dispatcher's way into a custom op (its autograd wrapper, redispatch and the
# dynamo-disabling shims, for the forward and again for the backward op) costs several times our
# own host work: most of an eager call's host time, more than the GPU work at short shapes
# (benchmarks/RESULTS.md).
# ``lightning_attn`` therefore calls the op's own bodies through a plain autograd.Function when
# nothing observes the dispatcher; whenever something might (compilation, export, tracing, a
# dispatch or function mode, tensor subclasses, functorch transforms) it calls the op, so graphs
# still hold ``lightning::attn``.


class _EagerAttention(torch.autograd.Function):
    """``lightning::attn`` with its registered autograd, without the dispatcher."""

    # the ctx-in-forward style: a separate setup_context costs more host time per call
    @staticmethod
    def forward(ctx, q, k, v, decay, scale, initial_state, cu_seqlens, final=True):
        # the forward's segment start states (B*H*segments float32 states, none when one segment
        # covers N): the backward's dq pass starts from them instead of a pass of its own over k, v
        kept = []
        output = _attn_impl(q, k, v, decay, scale, initial_state, cu_seqlens, keep_start_states=kept,
                            out_bnhd=output_bnhd(q), store_final=final)
        _setup_context(ctx, (q, k, v, decay, scale, initial_state, cu_seqlens), output)
        ctx.forward_states = kept[0] if kept else None
        ctx.set_materialize_grads(False)  # an unused final state's gradient stays None: no zeros to fill and read
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_final_state):
        grads = _backward(ctx, grad_out, grad_final_state,
                          attn_bwd_fn=functools.partial(_attn_bwd_impl, forward_states=ctx.forward_states)) + (None,)
        if not torch.is_grad_enabled():
            return grads
        # create_graph=True: the kernels' gradients have no history, so a loss built from them
        # would silently miss their dependence on the inputs; tie them to the graph through a
        # node that refuses to be differentiated (the op's path raises at the same point)
        anchor = next(x for x in ctx.saved_tensors if x is not None and x.requires_grad)
        present = [index for index, g in enumerate(grads) if g is not None]
        tied = _NotTwiceDifferentiable.apply(anchor, *(grads[index] for index in present))
        grads = list(grads)
        for index, g in zip(present, tied):
            grads[index] = g
        return tuple(grads)


class _NotTwiceDifferentiable(torch.autograd.Function):
    """Passes gradients through unchanged, attached to ``anchor``'s graph; differentiating them raises."""

    @staticmethod
    def forward(ctx, anchor, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *grad_grads):
        raise RuntimeError(
            "lightning attn: the gradients of lightning_attn are not differentiable (double backward, "
            "e.g. a gradient penalty through create_graph=True, is not supported)"
        )


class _TransformableAttention(torch.autograd.Function):
    """``lightning::attn`` with a forward-mode derivative and functorch support, for calls under
    ``torch.autograd.forward_ad`` or a ``torch.func`` transform (``grad``, ``jacrev``, ``jvp``,
    ``jacfwd``, ``linearize``, ``vmap``); the op's own autograd (a ``custom_op``'s) has neither.

    The output is linear in each of q, k and v separately and in the initial state, so with
    ``attn(q, k, v, S)`` the op's output and final state (final state independent of q)::

        d out   = attn(dq, k, v, S).out + attn(q, dk, v, 0).out + attn(q, k, dv, dS).out
        d final =                         attn(q, dk, v, 0).final + attn(q, k, dv, dS).final
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, decay, scale, initial_state, cu_seqlens):
        return torch.ops.lightning.attn(q, k, v, decay, scale, initial_state, cu_seqlens)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        q, k, v, decay, _, initial_state, cu_seqlens = inputs
        ctx.cu_seqlens = cu_seqlens
        ctx.save_for_forward(q, k, v, decay, initial_state)
        ctx.set_materialize_grads(False)  # inputs without a tangent get None, not zeros to run through

    @staticmethod
    def backward(ctx, grad_out, grad_final_state):
        return _backward(ctx, grad_out, grad_final_state, attn_bwd_fn=_TransformableBackward.apply)

    @staticmethod
    def jvp(ctx, dq, dk, dv, d_decay, d_scale, d_init, d_cu_seqlens):
        if d_decay is not None and bool((d_decay != 0).any()):
            raise ValueError(
                "lightning attn: decay has a tangent, but forward-mode derivatives in the decay are not "
                "supported (reverse mode is); pass decay.detach()"
            )
        q, k, v, decay, initial_state = ctx.saved_tensors  # save_for_forward's
        scale, cu_seqlens = ctx.scale, ctx.cu_seqlens

        def attn_op(q, k, v, decay, scale, initial_state):
            return torch.ops.lightning.attn(q, k, v, decay, scale, initial_state, cu_seqlens)
        d_out = d_final = None

        def add(total, term):
            return term if total is None else total + term

        if dq is not None:
            d_out = attn_op(dq, k, v, decay, scale, initial_state)[0]
        if dk is not None:
            out, final = attn_op(q, dk, v, decay, scale, None)
            d_out, d_final = add(d_out, out), add(d_final, final)
        if dv is not None or d_init is not None:
            out, final = attn_op(q, k, torch.zeros_like(v) if dv is None else dv, decay, scale,
                                 None if d_init is None else d_init)
            d_out, d_final = add(d_out, out), add(d_final, final)
        if d_out is None:
            d_out = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
        if d_final is None:
            d_final = q.new_zeros(final_state_shape(q, k, v, decay, cu_seqlens), dtype=torch.float32)
        return d_out, d_final


class _TransformableBackward(torch.autograd.Function):
    """``lightning::attn_bwd`` under a transform: ``torch.func.grad`` differentiates with
    ``create_graph``, so the backward op would see inputs that require grad (and a ``custom_op``
    without autograd cannot run then). Its results are not differentiable again."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out, grad_final_state, q, k, v, decay, scale, initial_state, bnhd_grads=False, cu_seqlens=None,
                decay_grad=False):
        return torch.ops.lightning.attn_bwd(grad_out, grad_final_state, q, k, v, decay, scale, initial_state,
                                            bnhd_grads, cu_seqlens, decay_grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        _NotTwiceDifferentiable.backward(ctx)

    @staticmethod
    def jvp(ctx, *tangents):
        _NotTwiceDifferentiable.backward(ctx)


def _transformed(*tensors) -> bool:
    """Whether a functorch transform wraps an input or a forward-mode dual tensor is among them."""
    if any(x is not None and torch._C._functorch.is_functorch_wrapped_tensor(x) for x in tensors):
        return True
    return _has_tangent(*tensors)


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _dispatcher_observed(*tensors) -> bool:
    """Whether the call must go through the op: something may trace, transform or intercept it.
    Runs on every eager call: each check is a flag read (a microsecond in all), and a functorch
    transform is seen by its interpreter stack, not input by input."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return True
    if torch._C._is_torch_function_mode_enabled() or forward_ad._current_level >= 0:
        return True
    if is_in_torch_dispatch_mode() or torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    for x in tensors:
        if x is not None and type(x) not in _PLAIN_TENSOR_TYPES:
            return True
    return False


def attn_eager(q, k, v, decay=None, scale=1.0, initial_state=None, cu_seqlens=None, final: bool = True):
    """``lightning::attn`` for callers that validated the inputs: the op's bodies directly in plain
    eager mode (with its autograd), else the op itself. Same values, gradients and errors.

    ``final=False``: the caller drops the final state, so the plain eager path neither stores it
    nor returns it (``(out, None)``): one float32 state per sequence and head that nothing reads
    (a pack of 128 sequences at H16 D128 writes 134 MB of them). Calls through the op still
    return it."""
    if _dispatcher_observed(q, k, v, decay, initial_state, cu_seqlens):
        if not torch.compiler.is_compiling() and _transformed(q, k, v, decay, initial_state):
            return _TransformableAttention.apply(q, k, v, decay, scale, initial_state, cu_seqlens)
        return attn(q, k, v, decay, scale, initial_state, cu_seqlens)
    return _named_in_profiles("lightning::attn", _attn_eager_call, q, k, v, decay, scale, initial_state, cu_seqlens,
                              final)


def _named_in_profiles(name: str, call: Callable, *args):
    """``call(*args)``, inside a profiler range called ``name`` (the op's) while a profiler runs:
    direct eager calls show up in profiles as the op's calls do."""
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(name):
            return call(*args)
    return call(*args)


def _attn_eager_call(q, k, v, decay, scale, initial_state, cu_seqlens, final=True):
    if _differentiated(q, k, v, decay, initial_state):
        return _EagerAttention.apply(q, k, v, decay, scale, initial_state, cu_seqlens, final)
    return _attn_impl(q, k, v, decay, scale, initial_state, cu_seqlens, out_bnhd=output_bnhd(q), store_final=final)


# ----------------------------------------------------------------------------- decode step
#
# Defined with torch.library.Library rather than custom_op: eager dispatch costs about a third as
# much, which matters one token at a time. No autograd: decoding is inference.

_lib = torch.library.Library("lightning", "FRAGMENT")
_lib.define(
    "attn_step(Tensor q, Tensor k, Tensor v, Tensor(a!) state, Tensor? decay=None, float scale=1.0, "
    "Tensor? cu_seqlens=None, Tensor? state_indices=None) -> Tensor"
)


def validate_step(q, k, v, state, decay=None, scale=1.0, cu_seqlens=None, state_indices=None) -> None:
    """``validate`` for the decode step, plus: the state is float32 (it is updated in place) and no
    input asks for gradients (the step is inference-only). With ``state_indices`` the state is a
    pool ``[P, Hs, Dk, Dv]`` (any P) and the indices name a slot per row (or per sequence with
    ``cu_seqlens``): in range, no slot twice; negative ones mark padding."""
    _check_step_layout(q, k, v, state, decay, scale, cu_seqlens, state_indices)
    _check_step_call(q, k, v, state, decay, scale, cu_seqlens, state_indices)


def _check_step_layout(q, k, v, state, decay, scale, cu_seqlens, state_indices) -> None:
    """What :func:`validate_step` checks that depends on the arguments' types, shapes, dtypes,
    devices and the state's strides alone (:func:`_step_signature`), and the scale."""
    if state_indices is None:
        validate(q, k, v, decay, scale, state, cu_seqlens, check_values=False)
    else:
        validate(q, k, v, decay, scale, None, cu_seqlens, check_values=False)
        _check_tensor("state", state, 4, op="attn_step")
        _, hs, dk, dv = final_state_shape(q, k, v, decay, cu_seqlens)
        for dim, (size, letter) in enumerate(((hs, "Hs"), (dk, "Dk"), (dv, "Dv")), start=1):
            _require_equal(state.shape[dim], size, lambda letter=letter: (
                f"lightning attn_step: the pool state must have shape [P, Hs, Dk, Dv] = [P, {hs}, {dk}, {dv}], "
                f"got {tuple(state.shape)} ({letter} differs)"))
        if state.device != q.device:
            raise ValueError(f"lightning attn_step: state is on {state.device} but q is on {q.device}")
        rows = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        _check_state_indices(state_indices, rows, state.shape[0], q, "sequences" if cu_seqlens is not None else "rows",
                             check_values=False)
    if state.dtype != torch.float32:
        raise TypeError(f"lightning attn_step: state must be float32 (it is updated in place), got {state.dtype}")
    if _overlaps_itself(state):
        raise ValueError(
            f"lightning attn_step: state (strides {tuple(state.stride())}) has elements sharing memory, e.g. an "
            "expanded tensor; it is updated in place, so each (batch, head) needs its own: pass state.clone()"
        )


def _check_step_call(q, k, v, state, decay, scale, cu_seqlens, state_indices) -> bool:
    """What :func:`validate_step` checks on every call, after :func:`_check_step_layout`: the
    scale, grad mode, aliasing of the state, and the values of ``cu_seqlens`` and the slots. Rows'
    checked CUDA slots are remembered (:func:`_check_state_index_values`); packed calls read
    theirs every call (:func:`_check_packed_step_values`). Returns whether a padding sequence
    may hold rows (:func:`_check_packed_step_values`; False for steps of rows)."""
    _check_scale(scale)
    _check_step_grad(q, k, v, state, decay)
    _check_step_aliasing(q, k, v, state, decay)  # where the tensors are, not their shapes
    if cu_seqlens is not None:
        return _check_packed_step_values(cu_seqlens, state_indices, q.shape[2], state.shape[0])
    if state_indices is not None:
        _check_state_index_values(state_indices, state.shape[0], remember=True)
    return False


def _check_packed_step_values(cu_seqlens: Tensor, state_indices: Optional[Tensor], n, slots) -> bool:
    """The values of a packed step's ``cu_seqlens`` (:func:`_check_cu_seqlens_values`) and slots
    (:func:`_check_state_index_values`), read together: one copy to the host (on a GPU a
    concatenation, then the one wait), none while tracing or during CUDA-graph capture. Returns
    whether a padding sequence (negative slot) may hold rows, whose outputs must then be zeroed:
    True where nothing was read."""
    if torch.compiler.is_compiling() or isinstance(n, torch.SymInt) or isinstance(slots, torch.SymInt) or not all(
            x is None or _has_values(x) for x in (cu_seqlens, state_indices)) or (
            cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()):
        return True  # traced or captured: the values are not read (nor checked again when the graph runs)
    remembered = _remembered_key((cu_seqlens, state_indices), (n, slots))
    if remembered is not None:
        padded = _recall(_remembered_steps, remembered)
        if padded is not _MISSED:
            return padded
    if state_indices is None:
        _check_cu_seqlens_list(cu_seqlens.tolist(), n)
        padded = False
    else:
        values = torch.cat((cu_seqlens, state_indices)).tolist()
        bounds, indices = values[:cu_seqlens.shape[0]], values[cu_seqlens.shape[0]:]
        _check_cu_seqlens_list(bounds, n)
        _check_slot_values(indices, slots)
        padded = any(index < 0 and end > start for index, start, end in zip(indices, bounds, bounds[1:]))
    if remembered is not None:
        _remember(_remembered_steps, remembered, padded)
    return padded


#: CUDA (cu_seqlens, state_indices) of packed steps whose values passed -> whether a padding
#: sequence holds rows; keyed as ``_remembered_indices``: the layers of one engine step read once.
_remembered_steps: dict = {}


def _check_state_indices(indices, rows, slots, q: Tensor, what: str, remember: bool = False,
                         check_values: bool = True) -> None:
    """The indices' type, shape and device, and their values where they can be read: each < the
    pool's ``slots``, none named twice (negative ones, padding, never collide).

    The values are one host read, a copy of the indices and no kernel (a reduction on the device
    first, then a read of its verdict, costs a dozen launches for the same wait). ``remember``
    (the decode kernel's steps, whose kernel also leaves slots past the pool alone): CUDA indices
    that passed are not read again until their version counter, address or layout changes
    (``_remembered_indices``), so the layers of one decode step, and steps of an unchanged batch,
    make no host read at all."""
    if not isinstance(indices, Tensor):
        raise TypeError(f"lightning attn_step: state_indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"lightning attn_step: state_indices must be int32 or int64, got dtype {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"lightning attn_step: state_indices must be 1-D, got shape {tuple(indices.shape)}")
    _require_equal(indices.shape[0], rows, lambda: f"lightning attn_step: state_indices has {indices.shape[0]} "
                   f"entries but the call has {rows} {what} (one slot each)")
    if indices.device != q.device:
        raise ValueError(f"lightning attn_step: state_indices is on {indices.device} but q is on {q.device}")
    if check_values:
        _check_state_index_values(indices, slots, remember)


def _check_state_index_values(indices: Tensor, slots, remember: bool = False) -> None:
    """:func:`_check_state_indices`' value part, for indices of a validated type, shape and device."""
    remembered = _remembered_key((indices,), slots) if remember else None
    if remembered is not None and _recall(_remembered_indices, remembered) is not _MISSED:
        return
    if torch.compiler.is_compiling() or not _has_values(indices) or isinstance(slots, torch.SymInt) or (
            indices.is_cuda and torch.cuda.is_current_stream_capturing()):
        return  # traced or captured: the values are not read
    _check_slot_values(indices.tolist(), slots)
    if remembered is not None:
        _remember(_remembered_indices, remembered)


#: CUDA state_indices whose values passed (:func:`_remembered_key`'s key, with the pool's slots)
#: -> (weak references, version counters when read, None). A write the version counter does not
#: see (through ``.data``, DLPack, a kernel of another library, a CUDA-graph replay) is missed, as
#: for remembered decays; the decode kernel still never touches a slot past the pool, and a slot
#: named twice then races between its rows.
_remembered_indices: dict = {}


def _remembered_key(tensors: tuple, extra):
    """``(key, owners)`` under which a check of the values of ``tensors`` (None entries skipped) is
    remembered, or None where one must be read on every call (:func:`_remembers`; tensor
    subclasses, traced ones among them). A view is remembered through its base, which outlives it:
    per-step views of one buffer hit too."""
    key, owners = [extra], []
    for x in tensors:
        if x is None:
            continue
        if type(x) is not Tensor or not _remembers(x):
            return None
        owner = x if x._base is None else x._base
        key.append((id(owner), x.data_ptr(), x.shape, x.stride(), x.dtype))
        owners.append(owner)
    return tuple(key), owners


_MISSED = object()


def _recall(table: dict, remembered):
    """What :func:`_remember` stored under ``remembered``, or ``_MISSED`` where the tensors changed
    (another tensor at the address, or a write their version counters saw)."""
    key, owners = remembered
    seen = table.get(key)
    if seen is None or any(ref() is not owner or version != owner._version
                           for ref, version, owner in zip(seen[0], seen[1], owners)):
        return _MISSED
    return seen[2]


def _remember(table: dict, remembered, value=None) -> None:
    key, owners = remembered
    if len(table) > 1024:
        table.clear()
    table[key] = ([weakref.ref(x) for x in owners], [x._version for x in owners], value)


def _remembers(indices: Tensor) -> bool:
    """CPU indices are read on every call (no device to wait for; NumPy views write behind the
    version counter), and so are inference tensors (they keep no version counter)."""
    return indices.is_cuda and not indices.is_inference()


def _check_slot_values(values: list, slots: int) -> None:
    """Raise unless every non-negative entry of ``values`` is < ``slots`` and none repeats."""
    used = [x for x in values if x >= 0]
    if any(x >= slots for x in used):
        raise ValueError(f"lightning attn_step: state_indices must be < the pool's {slots} slots (negative: padding), "
                         f"got {max(used)}")
    if len(set(used)) != len(used):
        twice = sorted({x for x in used if used.count(x) > 1})
        raise ValueError(f"lightning attn_step: state_indices names slot(s) {twice[:8]} more than once; each row or "
                         "sequence needs its own slot")


def _check_step_aliasing(q, k, v, state, decay) -> None:
    for name, x in (("q", q), ("k", k), ("v", v), ("decay", decay)):
        if x is not None and _may_share_memory(x, state):
            raise ValueError(
                f"lightning attn_step: {name} shares memory with state, which the step updates in place while "
                f"reading {name}; pass a copy ({name}.clone())"
            )


def _may_share_memory(a: Tensor, b: Tensor) -> bool:
    """Whether the bytes ``a`` and ``b`` span intersect (conservative for interleaved strides, as
    PyTorch's own in-place overlap check is). Traced tensors are not checked: the real call is."""
    # plain tensors (not fake, functional or meta) have concrete sizes and storage: the tracing
    # checks below cost about a quarter of an eager decode step's host time (19 of 72 us on an H100)
    plain = type(a) is Tensor and type(b) is Tensor and not (a.is_meta or b.is_meta)
    if not plain and (not (_has_values(a) and _has_values(b)) or any(
        isinstance(d, torch.SymInt) for x in (a, b) for d in (*x.shape, *x.stride())
    )):
        return False
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(x):
        first = x.storage_offset() * x.element_size()
        last = first + (sum((size - 1) * stride for size, stride in zip(x.shape, x.stride())) + 1) * x.element_size()
        return first, last

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _overlaps_itself(x: Tensor) -> bool:
    """Whether two elements of ``x`` share memory (an in-place update would race): torch's own
    check where it can tell, else any stride 0 over a dimension longer than one."""
    if any(isinstance(d, torch.SymInt) for d in (*x.shape, *x.stride())):
        return False  # traced: the real call checks
    verdict = torch._debug_has_internal_overlap(x)  # 0 no, 1 yes, 2 too hard to tell
    if verdict == 2:
        return any(size > 1 and stride == 0 for size, stride in zip(x.shape, x.stride()))
    return verdict == 1


def _check_step_grad(q, k, v, state, decay) -> None:
    if _differentiated(q, k, v, state, decay):
        names = [n for n, x in (("q", q), ("k", k), ("v", v), ("state", state), ("decay", decay))
                 if x is not None and x.requires_grad]
        raise ValueError(
            f"lightning attn_step: {', '.join(names)} require(s) grad, but the decode step updates the state in "
            "place and has no backward; use lightning_attn(..., initial_state=state) to train, or torch.no_grad()"
        )


#: Signatures (:func:`_step_signature`) of decode-step arguments that passed ``validate_step``'s
#: layout part. A decode loop calls the step with the same ones every token, and the layers of a
#: serving step share theirs: it then pays a set lookup instead of the full validation; what
#: depends on values or addresses (:func:`_check_step_call`) is still checked on every call.
_validated_steps: set = set()


def _step_signature(q, k, v, state, decay, cu_seqlens, state_indices) -> tuple:
    """What :func:`_check_step_layout` depends on: each argument's shape, dtype and device, and
    the state's strides (whether it overlaps itself)."""
    return tuple(None if x is None else (x.shape, x.dtype, x.device)
                 for x in (q, k, v, state, decay, cu_seqlens, state_indices)) + (state.stride(),)


def _attn_step_impl(q, k, v, state, decay=None, scale=1.0, cu_seqlens=None, state_indices=None):
    """The step on the decode kernel where the Triton backend runs (dense or pooled rows, grouped
    heads or not), packed sequences on its tiled kernels reading and writing pool rows in place;
    pooled, grouped and packed steps on the chunked CPU path are composed from the tiled op
    (``_pooled_step``)."""
    padded = _validate_step_once(q, k, v, state, decay, scale, cu_seqlens, state_indices)
    backend = _backend(q)
    if cu_seqlens is not None:
        if backend.name == "triton":
            return _packed_step_in_place(q, k, v, state, decay, scale, cu_seqlens, state_indices, padded)
        return _pooled_step(q, k, v, state, decay, scale, cu_seqlens, state_indices)
    if backend.name == "triton" and (state_indices is not None or k.shape[1] != q.shape[1]):
        from .kernels.decode import launch_decode_step

        return launch_decode_step(q, k, v, state, prepare_decay(decay), scale, state_indices)
    if state_indices is not None:
        return _pooled_step(q, k, v, state, decay, scale, None, state_indices)
    if k.shape[1] != q.shape[1]:
        # grouped heads on the chunked path: the tiled op from the state, its final state copied back
        out, final = _attn_impl(q, k, v, decay, scale, state)
        state.copy_(final)
        return out
    return backend.step(q, k, v, state, prepare_decay(decay), scale)


def _validate_step_once(q, k, v, state, decay, scale, cu_seqlens, state_indices) -> bool:
    """``validate_step``, its layout part once per signature; returns :func:`_check_step_call`'s
    answer."""
    signature = _step_signature(q, k, v, state, decay, cu_seqlens, state_indices)
    if signature not in _validated_steps:
        _check_step_layout(q, k, v, state, decay, scale, cu_seqlens, state_indices)
        if len(_validated_steps) > 1024:
            _validated_steps.clear()
        _validated_steps.add(signature)
    return _check_step_call(q, k, v, state, decay, scale, cu_seqlens, state_indices)


def _packed_step_in_place(q, k, v, state, decay, scale, cu_seqlens, state_indices, padded=True):
    """Packed sequences continuing states of a pool on the Triton kernels: the tiled kernels read
    each sequence's initial state from its row of the pool and write its final state back there
    (``kernels.linear_attention``'s ``state_rows``), so a prefill chunk runs at the tiled kernels'
    speed and no state is gathered or scattered around the call. ``padded``: whether a padding
    sequence may hold rows (their outputs are zeros, so the output is zeroed first)."""
    from .kernels import linear_attention
    from .kernels.config import packed_decode_rows

    if state_indices is None:
        state_indices = torch.arange(cu_seqlens.shape[0] - 1, device=q.device)
    out, _ = linear_attention(q, k, v, backends.compute_decay(prepare_decay(decay), q.shape[1]), out_scale=scale,
                              initial_state=state, cu_seqlens=cu_seqlens, state_rows=state_indices,
                              padded_rows=padded, short_rows=packed_decode_rows())
    return out


def _pooled_step(q, k, v, state, decay, scale, cu_seqlens, state_indices):
    """Rows (or packed sequences) continuing the states of their slots, composed: the slots
    gathered, the tiled op run from them, the final states written back. Padding rows (negative
    index) give zeros and write nothing; no host read of the indices (a padding row writes the
    value that another row of the call writes, or slot 0's own value back when every row is
    padding)."""
    rows = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if state_indices is None:
        state_indices = torch.arange(rows, device=q.device)
    state_indices = state_indices.long()
    valid = state_indices >= 0
    slots = state_indices.clamp(min=0)
    if state.shape[0] == 0 or rows == 0:  # nothing to read or write (every index is then padding)
        return q.new_zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    start = state.index_select(0, slots)
    out, final = _attn_impl(q, k, v, decay, scale, start, cu_seqlens)
    # the first row with a slot (row 0 if none); index_select, not x[first]: a tensor index is a host read
    first = valid.to(torch.int8).argmax().view(1)
    any_valid = valid.any()
    fallback_slot = torch.where(any_valid, slots.index_select(0, first)[0], 0)
    fallback = torch.where(any_valid, final.index_select(0, first)[0], state[0])
    keep = valid[:, None, None, None]
    state.index_copy_(0, torch.where(valid, slots, fallback_slot), torch.where(keep, final, fallback))
    if cu_seqlens is None:
        return torch.where(keep, out, 0.0)
    position = torch.arange(q.shape[2], device=q.device)
    sequence = torch.searchsorted(cu_seqlens[1:].long(), position, right=True).clamp(max=rows - 1)
    return torch.where(valid[sequence][None, None, :, None], out, 0.0)


_lib.impl("attn_step", _attn_step_impl, "CPU")
_lib.impl("attn_step", _attn_step_impl, "CUDA")
attn_step = torch.ops.lightning.attn_step.default


def attn_step_eager(q, k, v, state, decay=None, scale=1.0, cu_seqlens=None, state_indices=None):
    """``lightning::attn_step`` in plain eager mode: the op's kernel (:func:`_attn_step_impl`)
    called directly, without the dispatcher's way in, which costs about as much host time as the
    step's own checks and launch (one token at a time, the host paces decoding); the same values,
    in-place update and errors. Whenever something may trace, transform or intercept the call
    (:func:`_dispatcher_observed`), or a tensor is on a device the op has no kernel for (meta), it
    calls the op, so graphs still hold ``lightning::attn_step``. Neither way bumps the state's
    version counter (the op's schema marks the mutation for graph capture)."""
    if _dispatcher_observed(q, k, v, state, decay, cu_seqlens, state_indices) or not _has_kernel_device(q, state):
        # the packet, as users call it: graphs record the call as before
        return torch.ops.lightning.attn_step(q, k, v, state, decay, scale, cu_seqlens, state_indices)
    return _named_in_profiles("lightning::attn_step", _attn_step_impl, q, k, v, state, decay, scale, cu_seqlens,
                              state_indices)


def _has_kernel_device(*tensors: Tensor) -> bool:
    """Whether the tensors are on devices the step has kernels for (CPU, CUDA): the others (meta)
    go through the op, to its fake or to the dispatcher's error."""
    return all(x.device.type in ("cpu", "cuda") for x in tensors)


@torch.library.register_fake("lightning::attn_step")
def _attn_step_fake(q, k, v, state, decay=None, scale=1.0, cu_seqlens=None, state_indices=None):
    validate_step(q, k, v, state, decay, scale, cu_seqlens, state_indices)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
