"""Launchers for the Triton kernels (no torch.library here: that lives in ``ops.py``).

``TRITON_INTERPRET=1`` must be set before this module is imported for the kernels to run on CPU
tensors through Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._gates import TRITON_INTERPRETING
from .chunked import _chunk_output_kernel, _segment_scan_kernel, _segment_state_kernel
from .decode import _decode_step_kernel

__all__ = ["linear_attention", "decode_step", "LaunchConfig", "choose_config", "config_override"]

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    chunk: int  # rows of the intra-chunk masked attention (the paper's block)
    block_k: int  # Dk padded to a power of two: the whole key dim sits in one tile
    block_v: int  # value columns per program
    segment_len: int  # rows per segment (a multiple of chunk); segments run in parallel
    num_warps: int
    num_stages: int = 3


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_TUNABLE = ("chunk", "block_v", "num_warps", "num_stages", "segment_len")
_overrides: dict = {}


@contextlib.contextmanager
def config_override(**changes):
    """Force launch parameters (``chunk``, ``block_v``, ``num_warps``, ``num_stages``,
    ``segment_len``) for every kernel call inside the block — forward and backward alike — to
    time or test configurations other than :func:`choose_config`'s. Not thread-safe."""
    unknown = set(changes) - set(_TUNABLE)
    if unknown:
        raise ValueError(f"config_override: unknown parameters {sorted(unknown)}; tunable: {list(_TUNABLE)}")
    for name, value in changes.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"config_override: {name} must be a positive int, got {value!r}")
    for name in ("chunk", "block_v"):
        if name in changes and (changes[name] < 16 or changes[name] & (changes[name] - 1)):
            raise ValueError(f"config_override: {name} must be a power of two >= 16, got {changes[name]}")
    saved = dict(_overrides)
    _overrides.update(changes)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def choose_config(
    batch_heads: int, n: int, dk: int, dv: int, device: torch.device, segment_len: Optional[int] = None
) -> LaunchConfig:
    """Tile sizes and the segment length for one call.

    One segment (the paper's sequential walk) whenever batch*heads*value-blocks already fills the
    GPU; otherwise the sequence is cut into power-of-two segments of at least 8 chunks until about
    two programs per multiprocessor exist. Power-of-two segment lengths keep compiled variants few.
    Parameters forced by :func:`config_override` win over these choices.
    """
    block_k = max(16, triton.next_power_of_2(dk))
    chunk = _overrides.get("chunk", 64 if block_k <= 128 else 32)
    block_v = _overrides.get("block_v", max(16, min(triton.next_power_of_2(dv), 64 if block_k <= 128 else 32)))
    num_warps = _overrides.get("num_warps", 4 if block_k <= 64 else 8)
    num_stages = _overrides.get("num_stages", 3)
    if segment_len is None and "segment_len" in _overrides:
        segment_len = triton.cdiv(_overrides["segment_len"], chunk) * chunk
    if segment_len is None:
        segment_len = max(n, chunk)
        if device.type == "cuda" and n > 0:
            programs = batch_heads * triton.cdiv(dv, block_v)
            wanted_segments = triton.cdiv(2 * _multiprocessors(device.index or 0), programs)
            if wanted_segments > 1:
                per_segment = max(8 * chunk, triton.cdiv(n, wanted_segments))
                segment_len = triton.next_power_of_2(per_segment)
        segment_len = triton.cdiv(segment_len, chunk) * chunk
    elif segment_len <= 0 or segment_len % chunk:
        raise ValueError(f"segment_len must be a positive multiple of the chunk size {chunk}, got {segment_len}")
    return LaunchConfig(chunk, block_k, block_v, segment_len, num_warps, num_stages)


def _strides(x: Optional[Tensor], ndim: int = 4) -> tuple[int, ...]:
    return tuple(x.stride()) if x is not None else (0,) * ndim


def _direct(kernel):
    return kernel


def linear_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    decay: Optional[Tensor] = None,
    *,
    out_scale: float = 1.0,
    value_scale: float = 1.0,
    initial_state: Optional[Tensor] = None,
    reverse: bool = False,
    init_shift: int = 1,
    store_final: bool = True,
    segment_len: Optional[int] = None,
    traceable: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """``reference.linear_attention_chunked`` on the Triton kernels.

    query, key: [B, H, N, Dk]; value: [B, H, N, Dv], any strides, one dtype among float16,
    bfloat16 and float32. decay: float32 [H] slopes or None. initial_state: float32
    [B, H, Dk, Dv], any strides (a transposed view is fine). Inputs are trusted: ``ops.py``
    validates. ``segment_len`` overrides :func:`choose_config`'s choice (tests); see also
    :func:`config_override`. Returns ``(out [B, H, N, Dv] in query's dtype, float32 final state or None)``.

    ``traceable`` (for ``torch.library.triton_op`` bodies, where N may be symbolic under
    torch.export / AOTInductor): kernels launch through ``torch.library.wrap_triton`` and nothing
    branches on N — ``segment_len`` must be given, all three kernels always launch, and N = 0 runs
    one empty segment (the output kernel still writes the final state).
    """
    b, h, n, dk = query.shape
    dv = value.shape[-1]
    device = query.device
    out = torch.empty(b, h, n, dv, dtype=query.dtype, device=device)
    final = torch.empty(b, h, dk, dv, dtype=torch.float32, device=device) if store_final else None
    if traceable:
        if segment_len is None:
            raise ValueError("linear_attention: traceable launches need a fixed segment_len (N may be symbolic)")
        launch = torch.library.wrap_triton
        n_at_least_1 = torch.sym_max(n, 1)
    else:
        launch = _direct
        if n == 0:
            if final is not None:
                final.copy_(initial_state) if initial_state is not None else final.zero_()
            return out, final
        n_at_least_1 = n

    cfg = choose_config(b * h, n, dk, dv, device, segment_len)
    num_segments = triton.cdiv(n_at_least_1, cfg.segment_len)
    num_v_blocks = triton.cdiv(dv, cfg.block_v)
    dtype = _TL_DTYPES[query.dtype]
    dot_dtype = tl.float32 if (TRITON_INTERPRETING and dtype == tl.bfloat16) else dtype
    state_dot_dtype = dot_dtype if dtype == tl.bfloat16 else tl.float32
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    # float16 cannot hold a long undecayed state: its products with q run in tf32
    state_precision = "tf32" if dtype == tl.float16 else precision
    has_decay = decay is not None
    has_init = initial_state is not None
    decay_arg = decay if has_decay else out
    init_arg = initial_state if has_init else out

    # unused pointer arguments still fix the kernel's types: SEG_STATES must point to float32
    seg_states = final if final is not None else torch.empty(1, dtype=torch.float32, device=device)
    # eager calls skip the segment kernels when one segment covers N; traced ones cannot tell
    if traceable or num_segments > 1:
        seg_states = torch.empty(b * h, num_segments, dk, dv, dtype=torch.float32, device=device)
        launch(_segment_state_kernel)[(b * h * num_v_blocks, num_segments)](
            key, value, decay_arg, seg_states,
            *key.stride(), *value.stride(),
            n, h, dk, dv, cfg.segment_len, num_segments, value_scale,
            HAS_DECAY=has_decay, REVERSE=reverse,
            CHUNK=cfg.chunk, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
            DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        launch(_segment_scan_kernel)[(b * h * num_v_blocks,)](
            decay_arg, init_arg, seg_states, *_strides(initial_state),
            h, dk, dv, cfg.segment_len, num_segments,
            HAS_DECAY=has_decay, HAS_INIT=has_init, INIT_SHIFT=init_shift,
            BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
        )
    launch(_chunk_output_kernel)[(b * h * num_v_blocks, num_segments)](
        query, key, value, out, decay_arg, init_arg, seg_states, final if final is not None else out,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        *_strides(initial_state), *_strides(final),
        n, h, dk, dv, cfg.segment_len, num_segments, out_scale, value_scale,
        HAS_DECAY=has_decay, HAS_INIT=has_init, INIT_SHIFT=init_shift,
        REVERSE=reverse, STORE_FINAL=store_final,
        CHUNK=cfg.chunk, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
        DOT_DTYPE=dot_dtype, STATE_DOT_DTYPE=state_dot_dtype, PRECISION=precision,
        STATE_PRECISION=state_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, final


def decode_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, decay: Optional[Tensor], scale: float) -> Tensor:
    """``reference.attention_step`` on the Triton decode kernel: updates the float32 ``state``
    [B, H, Dk, Dv] in place (any strides) and returns the output [B, H, T, Dv] in q's dtype."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    out = torch.empty(b, h, t, dv, dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    block_k = max(16, triton.next_power_of_2(dk))
    # small value blocks give B*H*blocks programs: enough to spread a B = 1 step over the GPU
    block_v = max(16, min(triton.next_power_of_2(dv), 32))
    _decode_step_kernel[(b * h * triton.cdiv(dv, block_v),)](
        q, k, v, out, state, decay if decay is not None else state,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *state.stride(),
        t, h, dk, dv, scale,
        HAS_DECAY=decay is not None, BLOCK_K=block_k, BLOCK_V=block_v, num_warps=4,
    )
    return out
