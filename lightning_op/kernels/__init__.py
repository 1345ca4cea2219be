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
from ._launch import launcher as _launcher
from .. import reference
from .backward import _key_value_grad_kernel
from .chunked import _chunk_output_kernel, _chunk_output_t_kernel, _segment_scan_kernel, _segment_state_kernel
from .decode import _decode_step_kernel

__all__ = ["linear_attention", "key_value_gradients", "decode_step", "LaunchConfig", "SegmentStates", "choose_config",
           "config_override", "state_itemsize_of"]

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    chunk: int  # rows of the intra-chunk masked attention (the paper's block)
    block_k: int  # Dk padded to a power of two: the whole key dim sits in one tile
    block_v: int  # value columns per program
    segment_len: int  # rows per segment (a multiple of chunk); segments run in parallel
    num_warps: int
    num_stages: int = 3
    state_split: int = 1  # pieces per segment in the segment-state pass (its parallelism)
    accumulate: bool = False  # the kernels' ACCUMULATE form (products accumulated in place)
    weight_values: bool = False  # the state update's row weights on v, not k (WEIGHT_VALUES)
    state_accumulate: bool = False  # the segment-state pass's ACCUMULATE form (its own; choose_config: on)
    update_accumulate: bool = False  # the output pass's state update alone accumulating (UPDATE_ACCUMULATE)
    late_dk_scores: bool = False  # the fused backward's dk scores after dv's store (LATE_DK_SCORES)
    transposed: bool = False  # the output pass as _chunk_output_t_kernel (state transposed, cut by key columns)


@dataclasses.dataclass(frozen=True)
class SegmentStates:
    """The segment start states one :func:`linear_attention` call computed (float32
    ``[B*H, slots, Dk, Dv]``, see :func:`_segment_start_states`) and the cut they belong to.

    The gradient of the op's query is a linear attention whose state is the transpose of the
    forward's (query do, key v, value k: ``sum lam^(t-s) v_s k_s^T``), so the backward can start
    its segments from these instead of a second segment-state pass over k and v: ``t()``
    describes them read that way. A call takes them only where its own configuration cuts the
    sequence the same way (else it computes its own)."""

    states: Tensor
    segment_len: int
    state_split: int
    transposed: bool = False

    def t(self) -> "SegmentStates":
        return dataclasses.replace(self, transposed=not self.transposed)

    def strides(self) -> tuple[int, int]:
        """(key, value) element strides of a slot, as the reading pass indexes it."""
        inner = self.states.shape[-1]
        return (1, inner) if self.transposed else (inner, 1)

    def fits(self, cfg: "LaunchConfig", num_slots: int, dk: int, dv: int, device: torch.device) -> bool:
        tile = (dv, dk) if self.transposed else (dk, dv)
        return (self.segment_len == cfg.segment_len and self.state_split == cfg.state_split
                and self.states.dtype == torch.float32 and self.states.device == device
                and tuple(self.states.shape[1:]) == (num_slots, *tile) and self.states.is_contiguous())


def _cdiv(a, b):
    """``ceil(a / b)`` for positive ``b``, in plain integer arithmetic (SymInts too). The host
    code's stand-in for ``triton.cdiv``, which is a ``ConstexprFunction`` and costs 3-5 us per call
    on this project's CPU against 0.1 us (a forward+backward made seven such calls)."""
    return (a + b - 1) // b


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0), as ``triton.next_power_of_2`` (see _cdiv)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_TUNABLE = ("chunk", "block_v", "num_warps", "num_stages", "segment_len", "state_split", "accumulate", "weight_values",
            "state_accumulate", "update_accumulate", "transposed")
#: the fused key/value backward's own parameters (its block_v is always the whole value width)
_TUNABLE_KV = ("kv_chunk", "kv_num_warps", "kv_num_stages", "kv_segment_len", "kv_state_split", "kv_state_accumulate",
               "kv_update_accumulate", "kv_late_dk_scores")
#: the decode step's
_TUNABLE_DECODE = ("decode_block_v", "decode_num_warps")
_overrides: dict = {}


@contextlib.contextmanager
def config_override(**changes):
    """Force launch parameters for every kernel call inside the block, to time or test
    configurations other than :func:`choose_config`'s. Not thread-safe.

    ``chunk``, ``block_v``, ``num_warps``, ``num_stages``, ``segment_len``, ``state_split`` and
    ``accumulate`` (0 or 1: the kernels' ``ACCUMULATE`` form) apply to all kernels (forward and backward),
    ``state_accumulate`` (0 or 1) to the segment-state pass alone (its form; on by default),
    ``update_accumulate`` (0 or 1: ``UPDATE_ACCUMULATE``, the state update alone accumulating) to
    the output kernels and the fused backward, ``weight_values`` (0 or 1: ``WEIGHT_VALUES``) to the
    forward-type kernels, ``transposed`` (0 or 1) runs the forward-type output passes as
    ``_chunk_output_t_kernel`` (one form of its own: ``accumulate``, ``weight_values`` and
    ``update_accumulate`` do not apply to it);
    ``kv_chunk``, ``kv_num_warps``, ``kv_num_stages``, ``kv_segment_len``, ``kv_state_split``,
    ``kv_state_accumulate``, ``kv_update_accumulate``, ``kv_late_dk_scores`` (0 or 1:
    ``LATE_DK_SCORES``) to the fused key/value backward only, where they win
    over the general ones; ``kv_fused=0`` replaces that fused pass with its two-pass composition
    (for comparisons); ``decode_block_v``, ``decode_num_warps`` to the decode step.
    """
    _check_overrides(changes)
    saved = dict(_overrides)
    _overrides.update(changes)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def _check_overrides(changes: dict) -> None:
    """Raise ``ValueError`` naming the parameter unless ``changes`` are valid :func:`config_override`
    arguments (also the check of the autotuner's cached choices)."""
    unknown = set(changes) - set(_TUNABLE) - set(_TUNABLE_KV) - set(_TUNABLE_DECODE) - {"kv_fused"}
    if unknown:
        raise ValueError(
            f"config_override: unknown parameters {sorted(unknown)}; "
            f"tunable: {list(_TUNABLE + _TUNABLE_KV + _TUNABLE_DECODE)}, kv_fused"
        )
    for name, value in changes.items():
        if name in ("kv_fused", "accumulate", "weight_values", "state_accumulate", "kv_state_accumulate",
                    "update_accumulate", "kv_update_accumulate", "kv_late_dk_scores", "transposed"):
            if value not in (0, 1) or isinstance(value, float):
                raise ValueError(f"config_override: {name} must be 0 or 1, got {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"config_override: {name} must be a positive int, got {value!r}")
    for name in ("decode_block_v", "state_split", "kv_state_split"):
        if name in changes and changes[name] & (changes[name] - 1):
            raise ValueError(f"config_override: {name} must be a power of two, got {changes[name]}")
    for name in ("chunk", "block_v", "kv_chunk"):
        if name in changes and (changes[name] < 16 or changes[name] & (changes[name] - 1)):
            raise ValueError(f"config_override: {name} must be a power of two >= 16, got {changes[name]}")


def _forced(name: str, whole_value: bool):
    """The override for ``name`` (the fused backward's own first), or None."""
    if whole_value and f"kv_{name}" in _overrides:
        return _overrides[f"kv_{name}"]
    return _overrides.get(name)


_chosen: dict = {}


def choose_config(
    batch_heads: int, n: int, dk: int, dv: int, device: torch.device, segment_len: Optional[int] = None,
    *, whole_value: bool = False, itemsize: int = 2, state_itemsize: Optional[int] = None,
) -> LaunchConfig:
    """:func:`_choose_config`, remembered per argument set (it runs for every launch: ≈ 9 us of host
    time each on this project's CPU, a dictionary lookup once known). Not remembered while
    :func:`config_override` forces parameters, or for symbolic sizes."""
    if _overrides or not all(type(x) is int for x in (batch_heads, n, dk, dv)) or \
            (segment_len is not None and type(segment_len) is not int):
        return _choose_config(batch_heads, n, dk, dv, device, segment_len, whole_value=whole_value, itemsize=itemsize,
                              state_itemsize=state_itemsize)
    multiprocessors = _multiprocessors(device.index or 0) if device.type == "cuda" else 0
    key = (batch_heads, n, dk, dv, device, segment_len, whole_value, itemsize, state_itemsize, multiprocessors)
    cfg = _chosen.get(key)
    if cfg is None:
        cfg = _choose_config(batch_heads, n, dk, dv, device, segment_len, whole_value=whole_value, itemsize=itemsize,
                             state_itemsize=state_itemsize)
        if len(_chosen) >= 4096:
            _chosen.clear()
        _chosen[key] = cfg
    return cfg


def _choose_config(
    batch_heads: int, n: int, dk: int, dv: int, device: torch.device, segment_len: Optional[int] = None,
    *, whole_value: bool = False, itemsize: int = 2, state_itemsize: Optional[int] = None,
) -> LaunchConfig:
    """Tile sizes and the segment length for one call (``itemsize``: bytes per input element;
    ``state_itemsize``: bytes per element of the state's operand in its products, by default
    ``itemsize``; float16 inputs have 4, see :func:`state_itemsize_of`).

    Chosen from the H200 sweeps in benchmarks/RESULTS.md:

    - the whole value width in one program up to 128 columns for 16-bit inputs (q and k read once,
      not once per value block); 64 for float32, whose tiles would not fit in shared memory;
      keys wider than 128: chunks and value blocks of 64 (2026-12-02: 5.7x faster forward than
      chunks and blocks of 32 at D = 256, 7.9x in the other kernel form), 32 for float32;
    - the ``ACCUMULATE`` form of the kernels for keys up to 64 wide (2026-12-02: at D = 64 about
      2x faster forward, at D = 128 1.46x slower, at D = 256 1.38x slower); for wider keys up to
      128 in 16-bit inputs the state update alone in that form (``update_accumulate``; H200,
      2026-12-02: main shape 0.388 -> 0.365 ms forward, B2 N32K 0.511 -> 0.486, B64 N1K 0.426 ->
      0.404; at D = 256 1.811 -> 2.183, slower), the fused backward's too (main shape
      forward+backward 1.507 -> 1.486 ms, B2 N32K 1.899 -> 1.861); there, for keys up to 128 wide,
      the fused backward's dk scores after dv's store (``late_dk_scores``; H200, 2026-12-02:
      forward+backward 1.470 -> 1.399 ms at the main shape, 1.836 -> 1.778 at B2 N32K);
    - one segment (the paper's sequential walk) when batch*heads*value-blocks programs already
      occupy most multiprocessors (more segments only add a pass over k and v); otherwise
      power-of-two segments of at least 8 chunks until the multiprocessors are covered (twice
      over for four-warp programs of the other form, two of which fit and gained from it);
    - the segment-state pass has (segments - 1) * programs to run, too few when batch*heads is
      small: its segments are then cut into ``state_split`` pieces (of at least 4 chunks) while
      it would leave more than a tenth of the multiprocessors idle, and it runs in the
      ``ACCUMULATE`` form whatever the output pass's (its products accumulate in place; no
      rescaled state). H200, 2026-12-02, forward / forward+backward ms: B2 N32K (96
      programs) 0.521 / 2.061 in one piece of the other form, 0.510 / 1.951 in two accumulating;
      B1 N128K (112) 1.063 / 4.112 against 1.045 / 3.995; B1 N64K (112) 0.527 / 2.094 against
      0.533 / 2.028;
    - the output passes as ``_chunk_output_t_kernel`` (``transposed``: the state held as S^T, in
      parts of 64 key columns) for 16-bit keys of 65-128 columns, and wider ones whose state
      operand is 16-bit too (bfloat16), there in value blocks of 128 and two stages. H200,
      2026-12-02, forward / forward+backward ms: B8 N8K D256 1.804 / 7.212 -> 1.355 / 5.585, main
      shape 0.372 / 1.448 -> 0.339 / 1.372, B2 N32K 0.487 / 1.840 -> 0.456 / 1.772. Float16's
      float32 state operand makes the D = 256 tiles need 256 KiB of shared memory (the H200
      has 227);
    - ``whole_value`` (the fused backward, which holds a Dk x Dv state and four row tiles): all
      value columns in one block, fewer pipeline stages.

    Power-of-two segment lengths keep compiled variants few. Parameters forced by
    :func:`config_override` win over these choices.
    """
    def pick(name, default):
        forced = _forced(name, whole_value)
        return default if forced is None else forced

    block_k = max(16, _next_power_of_2(dk))
    wide_float32 = block_k > 128 and itemsize > 2  # 64-row float32 tiles of such keys overflow shared memory
    chunk = pick("chunk", 32 if wide_float32 else 64)
    state_itemsize = itemsize if state_itemsize is None else state_itemsize
    transposed = not whole_value and bool(pick("transposed", int(
        itemsize <= 2 and (block_k == 128 or (block_k > 128 and state_itemsize <= 2)))))
    wide_transposed = transposed and block_k > 128  # S^T in parts: value blocks of 128 in two stages
    if whole_value:
        block_v = max(16, _next_power_of_2(dv))
    else:
        widest = (128 if itemsize <= 2 else 64) if block_k <= 128 or wide_transposed else (32 if wide_float32 else 64)
        block_v = pick("block_v", max(16, min(_next_power_of_2(dv), widest)))
    num_warps = pick("num_warps", 4 if block_k <= 64 else 8)
    accumulate = bool(pick("accumulate", int(block_k <= 64)))
    if whole_value:
        num_stages = pick("num_stages", 2 if max(block_k, block_v) >= 128 else 1)
    else:
        num_stages = pick("num_stages", 2 if wide_transposed else 3)
    forced_segment = _forced("segment_len", whole_value)
    explicit = segment_len is not None  # a caller's fixed length (N may be symbolic): no split
    if segment_len is None and forced_segment is not None:
        segment_len = _cdiv(forced_segment, chunk) * chunk
    if segment_len is None:
        segment_len = max(n, chunk)
        if device.type == "cuda" and n > 0:
            programs = batch_heads * _cdiv(dv, block_v)
            wanted = _multiprocessors(device.index or 0) * (1 if num_warps >= 8 or accumulate else 2)
            if 4 * programs < 3 * wanted:
                per_segment = max(8 * chunk, _cdiv(n, _cdiv(wanted, programs)))
                segment_len = _next_power_of_2(per_segment)
        segment_len = _cdiv(segment_len, chunk) * chunk
    elif segment_len <= 0 or segment_len % chunk:
        raise ValueError(f"segment_len must be a positive multiple of the chunk size {chunk}, got {segment_len}")
    state_split = _forced("state_split", whole_value)
    if state_split is None:
        state_split = 1
        if device.type == "cuda" and not explicit and n > segment_len:
            busy = batch_heads * _cdiv(dv, block_v) * (_cdiv(n, segment_len) - 1)
            while 10 * busy * state_split < 9 * _multiprocessors(device.index or 0) and \
                    segment_len // (2 * state_split) >= 4 * chunk:
                state_split *= 2
    while state_split > 1 and segment_len % (state_split * chunk):  # pieces are whole chunks
        state_split //= 2
    weight_values = False if whole_value else bool(pick("weight_values", 0))
    state_accumulate = bool(pick("state_accumulate", 1))
    update_accumulate = bool(pick("update_accumulate", int(64 < block_k <= 128 and itemsize <= 2)))
    late_dk_scores = whole_value and bool(pick("late_dk_scores", int(block_k <= 128)))
    return LaunchConfig(chunk, block_k, block_v, segment_len, num_warps, num_stages, state_split, accumulate,
                        weight_values, state_accumulate, update_accumulate, late_dk_scores, transposed)


_placeholders: dict = {}


def _placeholder(device: torch.device) -> Tensor:
    """A float32 tensor of one element on ``device``, kept: the pointer argument of a kernel option
    that is off (it fixes the argument's type and is never read or written). Eager calls only; a
    traced call allocates its own (a kept tensor would enter the graph as a constant)."""
    found = _placeholders.get(device)
    if found is None:
        found = _placeholders[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return found


def _strides(x: Optional[Tensor], ndim: int = 4) -> tuple[int, ...]:
    return tuple(x.stride()) if x is not None else (0,) * ndim


def _direct(kernel):
    """Eager launches: the kernel's remembering launcher (``_launch``: Triton's per-call dispatch,
    ≈ 130 us of host time per launch on the H200 machine, done once per launch key)."""
    return _launcher(kernel)


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
    out_bnhd: bool = False,
    start_states: Optional[SegmentStates] = None,
    keep_start_states: Optional[list] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """``reference.linear_attention_chunked`` on the Triton kernels.

    query, key: [B, H, N, Dk]; value: [B, H, N, Dv], any strides, one dtype among float16,
    bfloat16 and float32. decay: float32 [H] slopes or None. initial_state: float32
    [B, H, Dk, Dv], any strides (a transposed view is fine). Inputs are trusted: ``ops.py``
    validates. ``segment_len`` overrides :func:`choose_config`'s choice (tests); see also
    :func:`config_override` and the opt-in per-shape timing of :mod:`.autotune`. Returns ``(out [B, H, N, Dv] in query's dtype, float32 final state or None)``;
    ``out_bnhd`` stores ``out`` as [B, N, H, Dv] (seen as [B, H, N, Dv]): gradients of inputs kept
    in that layout then need no copy.

    ``keep_start_states``: a list to which the call appends the :class:`SegmentStates` it computed
    (nothing when one segment covers N). ``start_states``: such states of an earlier call with the
    same key, value (or, ``transposed``, the two swapped), decay and initial state (the same
    ``value_scale`` and ``init_shift``), used instead of the segment-state pass where they fit
    (:meth:`SegmentStates.fits`); the caller vouches for that sameness. Eager calls only.

    ``traceable`` (for ``torch.library.triton_op`` bodies, where N may be symbolic under
    torch.export / AOTInductor): kernels launch through ``torch.library.wrap_triton`` and nothing
    branches on N — ``segment_len`` must be given, all three kernels always launch, and N = 0 runs
    one empty segment (the output kernel still writes the final state).
    """
    b, h, n, dk = query.shape
    dv = value.shape[-1]
    device = query.device
    out = reference.empty_bhnd((b, h, n, dv), query.dtype, device, out_bnhd)
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

    types = _dot_types(query.dtype)
    has_decay = decay is not None
    has_init = initial_state is not None
    decay_arg = decay if has_decay else out
    init_arg = initial_state if has_init else out

    def launch_with(cfg: LaunchConfig) -> None:  # writes out and final whole: the autotuner may repeat it
        num_segments = _cdiv(n_at_least_1, cfg.segment_len)
        if keep_start_states is not None:
            keep_start_states.clear()  # the last launch's states (the autotuner's candidates ran before)
        num_v_blocks = _cdiv(dv, cfg.block_v)
        # unused pointer arguments still fix the kernel's types: SEG_STATES must point to float32
        if final is not None:
            seg_states = final
        else:
            seg_states = torch.empty(1, dtype=torch.float32, device=device) if traceable else _placeholder(device)
        num_slots, state_strides = 0, (dv, 1)
        # eager calls skip the segment kernels when one segment covers N; traced ones cannot tell
        if traceable or num_segments > 1:
            num_slots = _num_slots(num_segments, cfg.state_split)
            if not traceable and start_states is not None and start_states.fits(cfg, num_slots, dk, dv, device):
                seg_states, state_strides = start_states.states, start_states.strides()
            else:
                seg_states = _segment_start_states(
                    key, value, decay, initial_state, cfg, num_segments,
                    value_scale=value_scale, reverse=reverse, init_shift=init_shift, launch=launch,
                )
                if keep_start_states is not None:
                    keep_start_states.append(SegmentStates(seg_states, cfg.segment_len, cfg.state_split))
        args = (
            query, key, value, out, decay_arg, init_arg, seg_states, final if final is not None else out,
            *query.stride(), *key.stride(), *value.stride(), *out.stride(),
            *_strides(initial_state), *_strides(final), *state_strides,
            n, h, dk, dv, cfg.segment_len, num_segments, num_slots, cfg.state_split, out_scale, value_scale,
        )
        flags = dict(HAS_DECAY=has_decay, HAS_INIT=has_init, INIT_SHIFT=init_shift, REVERSE=reverse,
                     STORE_FINAL=store_final, CHUNK=cfg.chunk, BLOCK_V=cfg.block_v, **types,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        grid = (b * h * num_v_blocks, num_segments)
        if cfg.transposed:
            # key columns in parts of at most 64 (head dims up to 256: at most four parts)
            part = min(cfg.block_k, 64)
            launch(_chunk_output_t_kernel)[grid](*args, KEY_PARTS=cfg.block_k // part, PART=part, **flags)
        else:
            launch(_chunk_output_kernel)[grid](
                *args, BLOCK_K=cfg.block_k, ACCUMULATE=cfg.accumulate, WEIGHT_VALUES=cfg.weight_values,
                UPDATE_ACCUMULATE=cfg.update_accumulate, **flags,
            )

    itemsize, state_itemsize = query.element_size(), state_itemsize_of(query.dtype)
    cfg = _autotune.select(
        "forward", lambda: choose_config(b * h, n, dk, dv, device, segment_len, itemsize=itemsize,
                                         state_itemsize=state_itemsize), launch_with,
        device, query.dtype, dk, dv, b * h, n, has_decay, reverse, not traceable and segment_len is None,
    )
    launch_with(cfg)
    return out, final


def state_itemsize_of(dtype: torch.dtype) -> int:
    """Bytes per element of the state's operand in the kernels' products with the state, on the
    GPU (as :func:`_dot_types_of`): 2 for bfloat16, 4 for float32 and float16 (tf32: float16
    cannot hold a long undecayed state)."""
    return 2 if dtype == torch.bfloat16 else 4


def _dot_types(dtype: torch.dtype) -> dict:
    """The kernels' DOT_DTYPE / STATE_DOT_DTYPE / PRECISION / STATE_PRECISION for inputs of ``dtype``
    (a fresh dict: callers may add to it)."""
    return dict(_dot_types_of(dtype, torch.backends.cuda.matmul.allow_tf32))


@functools.lru_cache(maxsize=None)
def _dot_types_of(dtype: torch.dtype, allow_tf32: bool) -> tuple:
    tl_dtype = _TL_DTYPES[dtype]
    # the interpreter's numpy has no bfloat16 matrix product
    dot_dtype = tl.float32 if (TRITON_INTERPRETING and tl_dtype == tl.bfloat16) else tl_dtype
    precision = "tf32" if allow_tf32 else "ieee"
    return tuple(dict(
        DOT_DTYPE=dot_dtype,
        # float16 cannot hold a long undecayed state: its products with the state run in tf32
        STATE_DOT_DTYPE=dot_dtype if tl_dtype == tl.bfloat16 else tl.float32,
        PRECISION=precision,
        STATE_PRECISION="tf32" if tl_dtype == tl.float16 else precision,
    ).items())


#: the segment scan's state columns per program and its pipelined loads (``_segment_scan_kernel``):
#: a Dk x 32 float32 tile is 16 KiB at Dk = 128, four of them in flight
SCAN_BLOCK_V, SCAN_STAGES = 32, 4


def _num_slots(num_segments, state_split: int):
    """Slots of the segment states: ``state_split`` pieces per segment before the last, plus one
    (see :func:`_segment_start_states`)."""
    return (num_segments - 1) * state_split + 1


def _segment_start_states(
    key: Tensor, value: Tensor, decay: Optional[Tensor], initial_state: Optional[Tensor], cfg: LaunchConfig,
    num_segments, *, value_scale: float, reverse: bool, init_shift: int, launch=_direct,
) -> Tensor:
    """float32 [B*H, pieces, Dk, Dv] (steps 1 and 2 of ``chunked.py``), with ``cfg.state_split``
    pieces per segment before the last, plus one: slot g holds the state at piece g+1's start, so
    segment s starts from slot ``s * state_split - 1``; the last slot is unused. The state kernel's
    grid covers every piece (the last one's programs return at once), so it is never empty, also
    when N is symbolic (``state_split`` is then 1)."""
    b, h, n, dk = key.shape
    dv = value.shape[-1]
    num_v_blocks = _cdiv(dv, cfg.block_v)
    piece_len = cfg.segment_len // cfg.state_split
    num_pieces = _num_slots(num_segments, cfg.state_split)
    seg_states = torch.empty(b * h, num_pieces, dk, dv, dtype=torch.float32, device=key.device)
    has_decay = decay is not None
    decay_arg = decay if has_decay else seg_states
    types = _dot_types(key.dtype)
    launch(_segment_state_kernel)[(b * h * num_v_blocks, num_pieces)](
        key, value, decay_arg, seg_states,
        *key.stride(), *value.stride(),
        n, h, dk, dv, piece_len, num_pieces, value_scale,
        HAS_DECAY=has_decay, REVERSE=reverse,
        CHUNK=cfg.chunk, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
        DOT_DTYPE=types["DOT_DTYPE"], PRECISION=types["PRECISION"], ACCUMULATE=cfg.state_accumulate,
        WEIGHT_VALUES=cfg.weight_values,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    scan_block_v = min(SCAN_BLOCK_V, max(16, _next_power_of_2(dv)))
    launch(_segment_scan_kernel)[(b * h * _cdiv(dv, scan_block_v),)](
        decay_arg, initial_state if initial_state is not None else seg_states, seg_states,
        *_strides(initial_state),
        h, dk, dv, piece_len, num_pieces,
        HAS_DECAY=has_decay, HAS_INIT=initial_state is not None, INIT_SHIFT=init_shift,
        BLOCK_K=cfg.block_k, BLOCK_V=scan_block_v, STAGES=SCAN_STAGES, num_warps=4,
    )
    return seg_states


#: the fused key/value backward holds a Dk x Dv float32 state and whole rows of q, k, v, do:
#: head dims padded to at most this, and at most half of it for float32 inputs (shared memory)
FUSED_BACKWARD_MAX_BLOCK = 128


def key_value_gradients(
    grad_out: Tensor,
    grad_final_state: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Optional[Tensor] = None,
    scale: float = 1.0,
    *,
    store_final: bool = False,
    out_bnhd: bool = False,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``reference.key_value_gradients_chunked`` in one fused pass (``backward.py``) when the head
    dims fit it (both padded to at most ``FUSED_BACKWARD_MAX_BLOCK``, half that for float32
    inputs), else as two linear attentions on :func:`linear_attention`. Returns ``(dk, dv, dS_0 float32 or None)``."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    widest = FUSED_BACKWARD_MAX_BLOCK if q.element_size() <= 2 else FUSED_BACKWARD_MAX_BLOCK // 2
    too_wide = max(_next_power_of_2(dk), _next_power_of_2(dv)) > widest
    if too_wide or _overrides.get("kv_fused") == 0:
        return reference.key_value_gradients_chunked(
            grad_out, grad_final_state, q, k, v, decay, scale, store_final=store_final,
            linear_attention=linear_attention, out_bnhd=out_bnhd,
        )
    device = q.device
    grad_k = reference.empty_bhnd(k.shape, k.dtype, device, out_bnhd)
    grad_v = reference.empty_bhnd(v.shape, v.dtype, device, out_bnhd)
    final = torch.empty(b, h, dk, dv, dtype=torch.float32, device=device) if store_final else None
    if n == 0:
        if final is not None:
            final.copy_(grad_final_state) if grad_final_state is not None else final.zero_()
        return grad_k, grad_v, final

    has_init = grad_final_state is not None
    types = _dot_types(q.dtype)

    def launch_with(cfg: LaunchConfig) -> None:  # writes grad_k, grad_v and final whole: repeatable
        num_segments = _cdiv(n, cfg.segment_len)
        seg_states = final if final is not None else _placeholder(device)
        if num_segments > 1:
            # dS's own contributions: key q, value scale * do, walked from the end
            seg_states = _segment_start_states(
                q, grad_out, decay, grad_final_state, cfg, num_segments, value_scale=scale, reverse=True, init_shift=0
            )
        _direct(_key_value_grad_kernel)[(b * h, num_segments)](
            q, k, v, grad_out, grad_k, grad_v,
            decay if decay is not None else seg_states, grad_final_state if has_init else seg_states,
            seg_states, final if final is not None else seg_states,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_k.stride(), *grad_v.stride(),
            *_strides(grad_final_state), *_strides(final),
            n, h, dk, dv, cfg.segment_len, num_segments, seg_states.shape[1] if num_segments > 1 else 0,
            cfg.state_split, scale,
            HAS_DECAY=decay is not None, HAS_INIT=has_init, STORE_FINAL=store_final,
            CHUNK=cfg.chunk, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v, ACCUMULATE=cfg.accumulate,
            UPDATE_ACCUMULATE=cfg.update_accumulate, LATE_DK_SCORES=cfg.late_dk_scores, **types,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    itemsize = q.element_size()
    cfg = _autotune.select(
        "key_value", lambda: choose_config(b * h, n, dk, dv, device, whole_value=True, itemsize=itemsize),
        launch_with, device, q.dtype, dk, dv, b * h, n, decay is not None, True, True,
    )
    launch_with(cfg)
    return grad_k, grad_v, final


def decode_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, decay: Optional[Tensor], scale: float) -> Tensor:
    """``reference.attention_step`` on the Triton decode kernel: updates the float32 ``state``
    [B, H, Dk, Dv] in place (any strides) and returns the output [B, H, T, Dv] in q's dtype."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    out = torch.empty(b, h, t, dv, dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    block_k = max(16, _next_power_of_2(dk))
    # Value blocks of 32 columns; 16 where that gives too few programs to spread a small batch
    # over the GPU (the step is a read and a write of the state: latency, not bandwidth, at B = 1).
    block_v = max(16, min(_next_power_of_2(dv), 32))
    if q.is_cuda and b * h * _cdiv(dv, block_v) < _multiprocessors(q.device.index or 0):
        block_v = 16
    block_v = _overrides.get("decode_block_v", block_v)
    num_warps = _overrides.get("decode_num_warps", 4)
    _direct(_decode_step_kernel)[(b * h * _cdiv(dv, block_v),)](
        q, k, v, out, state, decay if decay is not None else state,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *state.stride(),
        t, h, dk, dv, scale,
        HAS_DECAY=decay is not None, BLOCK_K=block_k, BLOCK_V=block_v, num_warps=num_warps,
    )
    return out


from . import autotune as _autotune  # noqa: E402  (uses choose_config and the override table above)
