"""How to launch: the host side of each kernel family (grids, strides, the segment-state passes,
the constexpr switches of a :class:`~.config.LaunchConfig`).

Inputs are trusted: ``ops.py`` validates. ``TRITON_INTERPRET=1`` must be set before this module
is imported for the kernels to run on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Optional

import torch
import triton.language as tl
from torch import Tensor

from .._gates import TRITON_INTERPRETING
from .._layout import empty_bhnd
from . import autotune
from ._launch import launcher as _launcher
from .backward import _key_value_grad_kernel
from .boundary import _block_scan_kernel, _block_state_kernel
from .chunked import _chunk_output_kernel, _packed_plan_kernel, _segment_scan_kernel, _segment_state_kernel
from .config import LaunchConfig, any_forced, cdiv, choose_config, multiprocessors, next_power_of_2
from .decay_grad import _decay_moment_kernel, _moment_chain_kernel
from .context import leaving_state
from .decode import launch_decode_step, launch_short_sequences

__all__ = ["linear_attention", "key_value_gradients", "decay_gradient", "decode_step", "SegmentStates",
           "StartStatesLayout", "start_states_layout", "state_itemsize_of"]

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


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
    packed: bool = False  # of packed sequences: slots as ``_packed_plan`` lays them out

    def t(self) -> "SegmentStates":
        return dataclasses.replace(self, transposed=not self.transposed)

    def strides(self) -> tuple[int, int]:
        """(key, value) element strides of a slot, as the reading pass indexes it."""
        inner = self.states.shape[-1]
        return (1, inner) if self.transposed else (inner, 1)

    def fits(self, cfg: "LaunchConfig", num_slots: int, dk: int, dv: int, device: torch.device,
             packed: bool = False) -> bool:
        tile = (dv, dk) if self.transposed else (dk, dv)
        return (self.segment_len == cfg.segment_len and self.state_split == cfg.state_split and self.packed == packed
                and self.states.dtype == torch.float32 and self.states.device == device
                and tuple(self.states.shape[1:]) == (num_slots, *tile) and self.states.is_contiguous())


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
    which costs more host time than a short kernel runs; done once per launch key)."""
    return _launcher(kernel)


@dataclasses.dataclass(frozen=True)
class StartStatesLayout:
    """How the segment start states of a forward :func:`linear_attention` call are cut, known
    before the call (:func:`start_states_layout`): float32 ``[B*H, slots, Dk, Dv]`` with
    :func:`_num_slots` slots."""

    segment_len: int
    state_split: int


def start_states_layout(query: Tensor, key: Tensor, value: Tensor) -> Optional[StartStatesLayout]:
    """The layout of the segment start states that ``linear_attention(query, key, value)`` (a
    forward call: no ``segment_len``, ``reverse`` or pool) keeps in ``keep_start_states``, from the
    shapes alone, the same for packed and dense calls (a pack is cut as one sequence of its N rows
    would be, :func:`_packed_plan`). None where it keeps none (one segment covers N) or where the
    shapes cannot tell: symbolic sizes, or per-shape timing (:mod:`.autotune`), whose choice is
    known only once the call has run.

    Training graphs carry the states from the forward to the backward as an output of the op
    (``lightning::attn_train``), whose size its fake must state before anything runs."""
    b, _, n, dk = query.shape
    dv = value.shape[-1]
    h = _compute_heads(query, key, value)
    if not all(type(x) is int for x in (b, h, n, dk, dv)) or (autotune.enabled() and not any_forced()):
        return None
    cfg = choose_config(b * h, n, dk, dv, query.device, itemsize=query.element_size(),
                        state_itemsize=state_itemsize_of(query.dtype))
    num_segments = cdiv(max(n, 1), cfg.segment_len)
    if num_segments <= 1:
        return None
    return StartStatesLayout(cfg.segment_len, cfg.state_split)


def linear_attention(
    query: Tensor, key: Tensor, value: Tensor, decay: Optional[Tensor] = None, *, out_scale: float = 1.0,
    value_scale: float = 1.0, initial_state: Optional[Tensor] = None, reverse: bool = False, init_shift: int = 1,
    store_final: bool = True, segment_len: Optional[int] = None, traceable: bool = False, out_bnhd: bool = False,
    start_states: Optional[SegmentStates] = None,
    keep_start_states: Optional[list] = None, cu_seqlens: Optional[Tensor] = None,
    state_rows: Optional[Tensor] = None, padded_rows: bool = True, state_split: Optional[int] = None,
    zero_unused_slots: bool = False, start_of: Optional[Callable[[Tensor], Tensor]] = None, short_rows: int = 0,
) -> tuple[Tensor, Optional[Tensor]]:
    """The general causal linear attention (``reference.linear_attention_chunked``) on the Triton kernels.

    query, key: [B, Hq / Hk, N, Dk]; value: [B, Hv, N, Dv], any strides, one dtype among float16,
    bfloat16 and float32. decay: float32 [H] slopes or None. initial_state: float32
    [B, Hi, Dk, Dv], any strides (a transposed view is fine). Inputs are trusted: ``ops.py``
    validates.

    Grouped heads: the call computes H = max(Hq, Hk, Hv) heads; each of Hq, Hk, Hv and Hi divides
    H, and compute head h reads head ``h // (H // X.shape[1])`` of tensor X (``repeat_interleave``'s
    order), in place. ``decay`` has one slope per compute head, and ``out`` and the final state
    have H heads (heads of a group that share their key, value, decay and initial state compute
    the same state: the caller picks one, or sums gradients over the group).

    ``segment_len`` overrides :func:`choose_config`'s choice (tests, and a cut fixed in advance with
    ``state_split``: :func:`start_states_layout`); see also
    :func:`config_override` and the opt-in per-shape timing of :mod:`.autotune`. Returns
    ``(out [B, H, N, Dv] in query's dtype, float32 final state or None)``; ``out_bnhd`` stores
    ``out`` as [B, N, H, Dv] (seen as [B, H, N, Dv]): gradients of inputs kept in that layout then
    need no copy.

    ``keep_start_states``: a list to which the call appends the :class:`SegmentStates` it computed
    (nothing when one segment covers N); ``zero_unused_slots``: their slots that no segment starts
    from hold zeros, not whatever the memory held (states returned as an op's output). ``start_states``: such states of an earlier call with the
    same key, value (or, ``transposed``, the two swapped), decay and initial state (the same
    ``value_scale`` and ``init_shift``), used instead of the segment-state pass where they fit
    (:meth:`SegmentStates.fits`); the caller vouches for that sameness. Eager calls only.

    ``traceable`` (for ``torch.library.triton_op`` bodies, where N may be symbolic under
    torch.export / AOTInductor): kernels launch through ``torch.library.wrap_triton`` and nothing
    branches on N — ``segment_len`` must be given, all three kernels always launch, and N = 0 runs
    one empty segment (the output kernel still writes the final state).

    ``cu_seqlens`` (packed sequences; int32 or int64 [S + 1], 0 = cu[0] <= ... <= cu[S] = N,
    trusted): B is 1 and rows ``cu[s] .. cu[s+1] - 1`` are sequence s; no state crosses a boundary.
    initial_state is then [S, Hi, Dk, Dv] (sequence s starts from entry s, with ``init_shift`` as
    above) and the final state [S, H, Dk, Dv] (a sequence without rows keeps its initial state, or
    zeros); ``reverse`` walks each sequence from its own end. Every sequence is cut into segments
    of its own (see :func:`_packed_plan`: tables built on the device, nothing read on the host).

    ``state_rows`` (with ``cu_seqlens``; int32 or int64 [S], trusted: rows of the pool, none twice):
    ``initial_state`` is a pool [P, Hi, Dk, Dv] of float32 states, and sequence s starts from row
    ``state_rows[s]`` and its final state is written back there, in place (head ``h // (H // Hi)``,
    by the group's first compute head); a negative row marks padding: its output rows are zeros and
    no row of the pool is read or written (``padded_rows=False``: the caller read the rows and no
    padding sequence holds any, so the output is not zeroed first). Returns ``(out, initial_state)``. No program of the
    output pass reads a row another writes: a sequence cut into segments, or whose state a group
    of heads shares, starts from a copy the segment scan takes (``chunked._packed_plan_kernel``).
    Forward only (``reverse`` and ``init_shift`` keep their defaults). ``short_rows``: sequences
    of 1 to that many rows (decode tokens) run on the decode kernel instead,
    its programs reading and writing their pool rows as the tiled ones do; on a GPU they run on a
    second stream beside the tiled kernels (memory-bound beside compute-bound work), joined
    before the call returns (CUDA-graph capture records the two branches).

    ``start_of`` (context parallelism: the rows are one rank's share of a longer sequence):
    a function from the state the rows leave from a zero start (float32 [B, H, Dk, Dv], compute
    heads) to the initial state the call then starts from (as ``initial_state``, which must be
    None). The leaving state costs no pass of its own where N is cut into segments: it is summed
    from the segment-state pass's own states, before its scan, and the last segment's rows
    (:func:`final_state` over them); with one segment it is :func:`final_state` over all rows.
    ``start_of`` runs once, between the passes (it may enter a collective). Eager dense forwards
    only (not ``reverse``, ``init_shift`` 1, no ``cu_seqlens``), never timed by the autotuner.
    """
    if start_of is not None and (initial_state is not None or reverse or init_shift != 1 or traceable
                                 or cu_seqlens is not None or start_states is not None):
        raise ValueError("linear_attention: start_of needs an eager dense forward without initial_state, "
                         "reverse, init_shift, cu_seqlens or start_states")
    b, _, n, dk = query.shape
    dv = value.shape[-1]
    h = _compute_heads(query, key, value)
    device = query.device
    pooled = state_rows is not None
    if pooled:  # padding sequences' rows are never written: zeros from the start
        if cu_seqlens is None or initial_state is None or reverse or traceable:
            raise ValueError("linear_attention: state_rows needs cu_seqlens and a pool as initial_state, "
                             "forward and eager only")
        out = (torch.zeros if padded_rows else torch.empty)(b, h, n, dv, dtype=query.dtype, device=device)
        final = initial_state
        store_final = True
    else:
        out = empty_bhnd((b, h, n, dv), query.dtype, device, out_bnhd)
        num_states = b if cu_seqlens is None else cu_seqlens.shape[0] - 1  # batch entries or sequences
        final = torch.empty(num_states, h, dk, dv, dtype=torch.float32, device=device) if store_final else None
    if traceable:
        if segment_len is None:
            raise ValueError("linear_attention: traceable launches need a fixed segment_len (N may be symbolic)")
        launch = torch.library.wrap_triton
        n_at_least_1 = torch.sym_max(n, 1)
    else:
        launch = _direct
        if n == 0:
            if start_of is not None:  # called all the same: it may enter a collective
                initial_state = start_of(torch.zeros(b, h, dk, dv, dtype=torch.float32, device=device))
            if final is not None and not pooled:  # (a pool's rows keep their states)
                _copy_state(final, initial_state)
            return out, final
        n_at_least_1 = n

    types = _dot_types(query.dtype)
    has_decay = decay is not None
    decay_arg = decay if has_decay else out

    # a pooled state shared by a group of compute heads is read by all of them and written by one
    lead_all = pooled and h > initial_state.shape[1]

    def launch_with(cfg: LaunchConfig) -> None:  # writes out and final whole: the autotuner may repeat it
        initial = initial_state
        num_segments = cdiv(n_at_least_1, cfg.segment_len)
        plan = None if cu_seqlens is None else _packed_plan(cu_seqlens, n_at_least_1, cfg.segment_len,
                                                            cfg.state_split, launch, state_rows=state_rows,
                                                            pool_rows=initial_state.shape[0] if pooled else None,
                                                            lead_all=lead_all, rows=n,
                                                            short_rows=short_rows if pooled else 0)
        side = None
        if pooled and short_rows > 0:
            side = _beside(device)
            with _on(side):
                launch_short_sequences(query, key, value, out, initial_state, decay, out_scale, state_rows,
                                       plan.sequences, short_rows)
        if keep_start_states is not None:
            keep_start_states.clear()  # the last launch's states (the autotuner's candidates ran before)
        num_v_blocks = cdiv(dv, cfg.block_v)
        # unused pointer arguments still fix the kernel's types: SEG_STATES must point to float32
        if final is not None:
            seg_states = final
        else:
            seg_states = torch.empty(1, dtype=torch.float32, device=device) if traceable else _placeholder(device)
        num_slots, state_strides = 0, (dv, 1)
        if start_of is not None and num_segments == 1:
            initial = start_of(_leaving_state(key, value, decay, h, value_scale))
        # eager calls skip the segment kernels when one segment covers N; traced ones cannot tell
        if traceable or num_segments > 1 or lead_all:
            # a packed plan's piece table has a row per slot (lead slots included)
            num_slots = _num_slots(num_segments, cfg.state_split) if plan is None else plan.pieces.shape[0]
            if not traceable and start_states is not None and start_states.fits(cfg, num_slots, dk, dv, device,
                                                                                plan is not None):
                seg_states, state_strides = start_states.states, start_states.strides()
            else:
                def initial_from_own(own: Tensor) -> Tensor:
                    nonlocal initial
                    initial = start_of(_leaving_state(key, value, decay, h, value_scale, own, cfg, num_segments))
                    return initial

                seg_states = _segment_start_states(
                    key, value, decay, initial, cfg, num_segments, h,
                    value_scale=value_scale, reverse=reverse, init_shift=init_shift, launch=launch, plan=plan,
                    state_rows=state_rows, zero_unused=zero_unused_slots,
                    initial_from_own=None if start_of is None else initial_from_own,
                )
                if keep_start_states is not None:
                    keep_start_states.append(SegmentStates(seg_states, cfg.segment_len, cfg.state_split,
                                                           packed=plan is not None))
        has_init = initial is not None
        args = (
            query, key, value, out, decay_arg, initial if has_init else out, seg_states,
            final if final is not None else out,
            None if plan is None else plan.segments, *query.stride(), *key.stride(), *value.stride(), *out.stride(),
            *_strides(initial), *_strides(final), *state_strides,
            n, h, dk, dv, cfg.segment_len, num_segments, num_slots, cfg.state_split, out_scale, value_scale,
            *_groups(h, query, key, value, initial),
        )
        flags = dict(HAS_DECAY=has_decay, HAS_INIT=has_init, INIT_SHIFT=init_shift, REVERSE=reverse,
                     STORE_FINAL=store_final, CHUNK=cfg.chunk, BLOCK_V=cfg.block_v, **types,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if plan is not None:
            flags["VARLEN"] = True
        if pooled:
            flags.update(POOLED=True, STATE_ROWS=state_rows, final_group=h // initial_state.shape[1])
        grid = (b * h * num_v_blocks, num_segments if plan is None else plan.segments.shape[0])
        if cfg.transposed:
            # key columns in parts of at most 64 (head dims up to 256: at most four parts)
            part = min(cfg.block_k, 64)
            form = dict(TRANSPOSED=True, KEY_PARTS=cfg.block_k // part, PART=part)
        else:
            form = dict(ACCUMULATE=cfg.accumulate, UPDATE_ACCUMULATE=cfg.update_accumulate)
        launch(_chunk_output_kernel)[grid](*args, BLOCK_K=cfg.block_k, **form, **flags)
        if side is not None:
            _join(side)

    itemsize, state_itemsize = query.element_size(), state_itemsize_of(query.dtype)
    cfg = autotune.select(
        "forward", lambda: choose_config(b * h, n, dk, dv, device, segment_len, itemsize=itemsize,
                                         state_itemsize=state_itemsize, state_split=state_split), launch_with,
        # a pooled launch updates the pool in place: it cannot be repeated to time candidates
        device, query.dtype, dk, dv, b * h, n, has_decay, reverse,
        not traceable and segment_len is None and not pooled and start_of is None,
        packed=cu_seqlens is not None,
    )
    launch_with(cfg)
    return out, final


_side_streams: dict = {}


def _beside(device: torch.device):
    """A second stream of ``device`` that waits for the current one's work so far (None off CUDA,
    and under the interpreter: launches then run in order)."""
    if device.type != "cuda" or TRITON_INTERPRETING:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _side_streams.get(index)
    if stream is None:
        stream = _side_streams[index] = torch.cuda.Stream(index)
    stream.wait_stream(torch.cuda.current_stream(index))
    return stream


def _on(stream):
    """``torch.cuda.stream(stream)``, or nothing for None."""
    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


def _join(stream) -> None:
    """The current stream of ``stream``'s device waits for its work (see :func:`_beside`)."""
    torch.cuda.current_stream(stream.device).wait_stream(stream)


def _compute_heads(*tensors: Tensor):
    """The heads a call computes: the most any of ``tensors`` has (the others' counts divide it)."""
    heads = tensors[0].shape[1]
    for x in tensors[1:]:
        heads = torch.sym_max(heads, x.shape[1])
    return heads


def _groups(heads, *tensors: Optional[Tensor]) -> tuple:
    """Compute heads per head of each tensor (1 for None): compute head h reads head h // group of
    it. The kernels take these as runtime integers; a launch specialises 1 into a constant, so
    equal head counts compile to the kernels' code without groups."""
    return tuple(1 if x is None else heads // x.shape[1] for x in tensors)


def _copy_state(final: Tensor, initial_state: Optional[Tensor]) -> None:
    """``final`` [B, H, Dk, Dv] := ``initial_state`` [B, Hi, Dk, Dv] read per compute head (or zeros)."""
    if initial_state is None:
        final.zero_()
        return
    b, h = final.shape[:2]
    hi = initial_state.shape[1]
    final.view(b, hi, h // hi, *final.shape[2:]).copy_(initial_state[:, :, None])


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


@dataclasses.dataclass(frozen=True)
class PackedPlan:
    """Where the programs of a packed batch work (int32 tables, see :func:`_packed_plan`)."""

    segments: Tensor  # [M, 5]: sequence (-1: none), first row, length, index in the sequence, start slot
    pieces: Tensor  # [P, 4]: sequence (-1: none), first row, length, index in the sequence
    sequences: Tensor  # [S, 5]: first slot, slots, first segment (before the ordering), length, first row


def _packed_plan(cu_seqlens: Tensor, n, segment_len, state_split, launch=_direct, *,
                 state_rows: Optional[Tensor] = None, pool_rows: Optional[int] = None,
                 lead_all: bool = False, rows=None, short_rows: int = 0) -> PackedPlan:
    """The tables of a packed batch, built on the device from ``cu_seqlens`` by one small kernel
    (``chunked._packed_plan_kernel``): nothing is read on the host, and their sizes depend on N
    and S alone, so N and S may be symbolic.

    Sequence s of length n_s (``cu[s+1] - cu[s]``) is cut into ``max(1, ceil(n_s / L))`` segments
    of L = ``segment_len`` rows counted from its start (a sequence without rows has one empty
    segment, which writes its final state); all of them fit in M = ceil(N / L) + S entries, the
    rest marked -1 (their programs return at once). Each segment but a sequence's last is cut into
    ``state_split`` pieces whose own states take one slot each, sequence after sequence: at most
    (ceil(N / L) - 1) * state_split of them, as in a batch of one sequence of N rows, so the slots
    and the piece table keep :func:`_num_slots`' count (the last entry always -1). A segment
    ``index > 0`` of sequence s starts from slot ``first_slot[s] + index * state_split - 1``.

    ``state_rows`` (pooled states, see :func:`linear_attention`): padding sequences (a negative
    row, or one at or past ``pool_rows``, the pool's size: captured and compiled steps cannot check
    their rows, and such a row must not be written) get no segment, and a sequence of several
    segments (every sequence, ``lead_all``) a lead slot before its pieces, which the scan fills
    with its initial state and its segment 0 starts from (segment ``index`` then from
    ``first_slot[s] + index * state_split``): :func:`_lead_slots` more slots. A sequence of 1 to
    ``short_rows`` rows gets neither: the decode kernel runs it from the sequence table.

    ``rows``: the rows the sequences lie in (default ``n``, which a traced call raises to 1 for
    the segment count): bounds past them are clamped to them (see the kernel), so values that no
    host check read can give wrong outputs but never an access past the tensors.

    Without ``state_rows`` the segment table is then ordered by the rows each segment walks,
    longest first (the entries without a segment last): the GPU starts programs in grid order, and
    a long segment started last would finish alone (a pack of mixed lengths ran its forward 30%
    faster so ordered, benchmarks/RESULTS.md). The programs' results do not depend on the order.
    Pooled steps keep the kernel's order: their few long prompt chunks come first in practice, and
    the ordering's launches would cost a decode step more than it saves."""
    device = cu_seqlens.device
    num_sequences = cu_seqlens.shape[0] - 1
    num_segments = cdiv(n, segment_len)
    lead_slots = 0 if state_rows is None else _lead_slots(num_segments, num_sequences, lead_all)
    plan = PackedPlan(torch.empty(num_segments + num_sequences, 5, dtype=torch.int32, device=device),
                      torch.empty(_num_slots(num_segments, state_split) + lead_slots, 4, dtype=torch.int32,
                                  device=device),
                      torch.empty(num_sequences, 5, dtype=torch.int32, device=device))
    pooled = {} if state_rows is None else dict(POOLED=True, STATE_ROWS=state_rows, lead_all=int(lead_all),
                                                pool_rows=2**31 - 1 if pool_rows is None else pool_rows,
                                                short_rows=short_rows)
    launch(_packed_plan_kernel)[(1,)](
        cu_seqlens, plan.segments, plan.pieces, plan.sequences, n if rows is None else rows, num_sequences,
        plan.segments.shape[0],
        plan.pieces.shape[0], segment_len, state_split, BLOCK=PLAN_BLOCK, **pooled,
    )
    if state_rows is None:
        segments = plan.segments
        walked = (segments[:, 2] - segments[:, 3] * segment_len).clamp(max=segment_len)
        walked = torch.where(segments[:, 0] >= 0, walked, -1)
        plan = dataclasses.replace(plan, segments=segments.index_select(
            0, torch.argsort(walked, descending=True, stable=True)))
    return plan


def _lead_slots(num_segments: int, num_sequences: int, lead_all: bool) -> int:
    """Lead slots of a pooled plan: one per sequence with ``lead_all``, else one per sequence of
    more than one segment (longer than a segment, so fewer than ``num_segments``)."""
    return num_sequences if lead_all else num_segments - 1


#: sequences per step of ``_packed_plan_kernel``
PLAN_BLOCK = 256


#: the segment scan's state columns per program and its pipelined loads (``_segment_scan_kernel``):
#: a Dk x 32 float32 tile is 16 KiB at Dk = 128, four of them in flight
SCAN_BLOCK_V, SCAN_STAGES = 32, 4


def _num_slots(num_segments, state_split: int):
    """Slots of the segment states: ``state_split`` pieces per segment before the last, plus one
    (see :func:`_segment_start_states`)."""
    return (num_segments - 1) * state_split + 1


def _segment_start_states(
    key: Tensor, value: Tensor, decay: Optional[Tensor], initial_state: Optional[Tensor], cfg: LaunchConfig,
    num_segments, heads, *, value_scale: float, reverse: bool, init_shift: int, launch=_direct,
    plan: Optional["PackedPlan"] = None, state_rows: Optional[Tensor] = None, zero_unused: bool = False,
    initial_from_own: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """float32 [B*H, pieces, Dk, Dv] (steps 1 and 2 of ``chunked.py``) of H = ``heads`` compute
    heads (key, value and initial state read per compute head as in :func:`linear_attention`),
    with ``cfg.state_split`` pieces per segment before the last, plus one: slot g holds the state
    at piece g+1's start, so
    segment s starts from slot ``s * state_split - 1``; the last slot is unused. The state kernel's
    grid covers every piece (the last one's programs return at once), so it is never empty, also
    when N is symbolic (``state_split`` is then 1). With a ``plan`` (packed sequences) the same
    number of slots holds the pieces of every sequence's segments but its last, sequence after
    sequence (:func:`_packed_plan`), and the scan runs per sequence. ``state_rows``: the initial
    states are rows of a pool, copied to the plan's lead slots (:func:`_packed_plan`). ``zero_unused``:
    the slots no segment starts from are zeros (a packed plan's are known on the device only: all
    slots start zeroed). ``initial_from_own``: the initial state is its answer, given the slots
    between the two steps (each piece's own state), instead of ``initial_state``."""
    seg_states = _segment_own_states(key, value, decay, cfg, num_segments, heads, value_scale=value_scale,
                                     reverse=reverse, launch=launch, plan=plan, zero_unused=zero_unused)
    if initial_from_own is not None:
        initial_state = initial_from_own(seg_states)
    _scan_segment_states(seg_states, decay, initial_state, cfg, seg_states.shape[1], heads, value.shape[-1],
                         init_shift=init_shift, launch=launch, plan=plan, state_rows=state_rows)
    return seg_states


def _segment_own_states(
    key: Tensor, value: Tensor, decay: Optional[Tensor], cfg: LaunchConfig, num_segments, heads, *,
    value_scale: float, reverse: bool, launch=_direct, plan: Optional["PackedPlan"] = None, zero_unused: bool = False,
) -> Tensor:
    """Step 1 of :func:`_segment_start_states`: slot g holds piece g's own state (its rows from a
    zero start, ``sum_s lam^(end-s) value_scale key_s^T value_s``, end its last row)."""
    b, _, n, dk = key.shape
    dv = value.shape[-1]
    h = heads
    num_v_blocks = cdiv(dv, cfg.block_v)
    piece_len = cfg.segment_len // cfg.state_split
    num_pieces = _num_slots(num_segments, cfg.state_split) if plan is None else plan.pieces.shape[0]
    seg_states = (torch.zeros if zero_unused and plan is not None else torch.empty)(
        b * h, num_pieces, dk, dv, dtype=torch.float32, device=key.device)
    if zero_unused and plan is None:
        seg_states[:, -1].zero_()
    has_decay = decay is not None
    types = _dot_types(key.dtype)
    packed = {} if plan is None else dict(VARLEN=True)
    launch(_segment_state_kernel)[(b * h * num_v_blocks, num_pieces)](
        key, value, decay if has_decay else seg_states, seg_states, None if plan is None else plan.pieces,
        *key.stride(), *value.stride(),
        n, h, dk, dv, piece_len, num_pieces, value_scale, *_groups(h, key, value),
        HAS_DECAY=has_decay, REVERSE=reverse, **packed,
        CHUNK=cfg.chunk, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
        DOT_DTYPE=types["DOT_DTYPE"], PRECISION=types["PRECISION"], ACCUMULATE=cfg.state_accumulate,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return seg_states


def _scan_segment_states(
    seg_states: Tensor, decay: Optional[Tensor], initial_state: Optional[Tensor], cfg: LaunchConfig, num_pieces,
    heads, dv: int, *, init_shift: int, launch=_direct, plan: Optional["PackedPlan"] = None,
    state_rows: Optional[Tensor] = None,
) -> None:
    """Step 2 of :func:`_segment_start_states`, in place: slot g goes from piece g's own state to
    the state at piece g+1's start, from ``initial_state``."""
    dk = seg_states.shape[2]
    piece_len = cfg.segment_len // cfg.state_split
    has_decay = decay is not None
    scan_block_v = min(SCAN_BLOCK_V, max(16, next_power_of_2(dv)))
    pooled = {} if state_rows is None else dict(POOLED=True, STATE_ROWS=state_rows)
    packed = {} if plan is None else dict(VARLEN=True)
    launch(_segment_scan_kernel)[
        (seg_states.shape[0] * cdiv(dv, scan_block_v), 1 if plan is None else plan.sequences.shape[0])](
        decay if has_decay else seg_states, initial_state if initial_state is not None else seg_states, seg_states,
        None if plan is None else plan.sequences, *_strides(initial_state),
        heads, dk, dv, piece_len, num_pieces, *_groups(heads, initial_state),
        HAS_DECAY=has_decay, HAS_INIT=initial_state is not None, INIT_SHIFT=init_shift, **packed, **pooled,
        BLOCK_K=cfg.block_k, BLOCK_V=scan_block_v, STAGES=SCAN_STAGES, num_warps=4,
    )


def state_only_block(n: int) -> int:
    """Rows per block of a state-only pass (:func:`final_state`) over ``n`` rows: blocks run in
    parallel and then a scan walks them one after another, so at least 1024 rows and at most 16
    blocks: at long N the walk over more blocks costs more than the block kernel saves
    (benchmarks/RESULTS.md)."""
    return max(1024, 1 << max(0, (n - 1) // 16).bit_length())


def _leaving_state(key: Tensor, value: Tensor, decay: Optional[Tensor], heads, value_scale: float,
                   own_states: Optional[Tensor] = None, cfg: Optional[LaunchConfig] = None,
                   num_segments: int = 1, reverse: bool = False) -> Tensor:
    """The float32 state [B, H, Dk, Dv] (H = ``heads`` compute heads) the rows leave from a zero
    start (``linear_attention``'s ``start_of``; ``reverse``: walked from the end, as the fused
    backward walks them). With ``own_states`` (the segment-state pass's slots before their scan,
    ``cfg``'s cut into ``num_segments``), the decayed sum of the pieces' own states and the last
    segment's rows' state; else a state-only pass over every row."""
    b, _, n, _ = key.shape
    if own_states is None:
        leaving = final_state(key, value, decay, state_only_block(n), value_scale=value_scale, reverse=reverse)
        if leaving.shape[1] != heads:  # no decay: one state per kv head, which its query heads share
            leaving = leaving.repeat_interleave(heads // leaving.shape[1], 1)
        return leaving
    # the walk's last segment: the rows after the others, or (walked from the end) before them
    walked = (num_segments - 1) * cfg.segment_len
    rows = slice(0, n - walked) if reverse else slice(walked, n)
    tail = final_state(key[:, :, rows], value[:, :, rows], decay, state_only_block(n - walked),
                       value_scale=value_scale, reverse=reverse)
    pieces = (num_segments - 1) * cfg.state_split
    return leaving_state(own_states, tail, decay, pieces, cfg.segment_len // cfg.state_split, n, b, heads)


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
    cu_seqlens: Optional[Tensor] = None,
    start_of: Optional[Callable[[Tensor], Tensor]] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """dk, dv (and dS_0) in one fused pass (``backward.py``) of what
    ``lightning_op.backends.key_value_gradients`` composes from two linear attentions. Only for
    head dims :func:`~.config.fused_backward_fits` accepts: the backend chooses. Returns
    ``(dk, dv, dS_0 float32 or None)``.

    Grouped heads as in :func:`linear_attention`: H = the most heads among q, k, v and grad_out
    (usually q's and grad_out's; k and v may have fewer), grad_final_state [B, Hg, Dk, Dv] with Hg
    dividing H, decay [H]; dk and dv are [B, H, N, D] per compute head (the caller sums each
    group's heads), dS_0 [B, H, Dk, Dv]. ``cu_seqlens``: packed sequences as in
    :func:`linear_attention` (grad_final_state [S, Hg, Dk, Dv], dS_0 [S, H, Dk, Dv], each
    sequence walked from its own end).

    ``start_of`` (context parallelism, as :func:`linear_attention`'s): a function from the state
    the walk from the end leaves from a zero start (``scale * sum_t lam^t q_t^T do_t``, float32
    [B, H, Dk, Dv]) to ``grad_final_state`` (which must be None), summed from the walk's own
    segment-state pass where it has one. Dense eager calls only, never timed by the autotuner."""
    if start_of is not None and (grad_final_state is not None or cu_seqlens is not None):
        raise ValueError("key_value_gradients: start_of needs no grad_final_state and no cu_seqlens")
    b, _, n, dk = q.shape
    dv = v.shape[-1]
    h = _compute_heads(q, k, v, grad_out)
    device = q.device
    grad_k = empty_bhnd((b, h, n, dk), k.dtype, device, out_bnhd)
    grad_v = empty_bhnd((b, h, n, dv), v.dtype, device, out_bnhd)
    num_states = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final = torch.empty(num_states, h, dk, dv, dtype=torch.float32, device=device) if store_final else None
    if n == 0:
        if start_of is not None:  # called all the same: it may enter a collective
            grad_final_state = start_of(torch.zeros(b, h, dk, dv, dtype=torch.float32, device=device))
        if final is not None:
            _copy_state(final, grad_final_state)
        return grad_k, grad_v, final

    types = _dot_types(q.dtype)

    def launch_with(cfg: LaunchConfig) -> None:  # writes grad_k, grad_v and final whole: repeatable
        given = grad_final_state
        num_segments = cdiv(n, cfg.segment_len)
        plan = None if cu_seqlens is None else _packed_plan(cu_seqlens, n, cfg.segment_len, cfg.state_split)
        seg_states = final if final is not None else _placeholder(device)
        if start_of is not None and num_segments == 1:
            given = start_of(_leaving_state(q, grad_out, decay, h, scale, reverse=True))
        if num_segments > 1:
            def initial_from_own(own: Tensor) -> Tensor:
                nonlocal given
                given = start_of(_leaving_state(q, grad_out, decay, h, scale, own, cfg, num_segments, reverse=True))
                return given

            # dS's own contributions: key q, value scale * do, walked from the end
            seg_states = _segment_start_states(
                q, grad_out, decay, given, cfg, num_segments, h, value_scale=scale, reverse=True,
                init_shift=0, plan=plan, initial_from_own=None if start_of is None else initial_from_own,
            )
        has_init = given is not None
        packed = {} if plan is None else dict(VARLEN=True)
        _direct(_key_value_grad_kernel)[(b * h, num_segments if plan is None else plan.segments.shape[0])](
            q, k, v, grad_out, grad_k, grad_v,
            decay if decay is not None else seg_states, given if has_init else seg_states,
            seg_states, final if final is not None else seg_states, None if plan is None else plan.segments,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_k.stride(), *grad_v.stride(),
            *_strides(given), *_strides(final),
            n, h, dk, dv, cfg.segment_len, num_segments, seg_states.shape[1] if num_segments > 1 else 0,
            cfg.state_split, scale, *_groups(h, q, k, v, grad_out, given),
            HAS_DECAY=decay is not None, HAS_INIT=has_init, STORE_FINAL=store_final,
            CHUNK=cfg.chunk, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v, ACCUMULATE=cfg.accumulate, **types, **packed,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    itemsize = q.element_size()
    cfg = autotune.select(
        "key_value", lambda: choose_config(b * h, n, dk, dv, device, whole_value=True, itemsize=itemsize),
        launch_with, device, q.dtype, dk, dv, b * h, n, decay is not None, True, start_of is None,
        packed=cu_seqlens is not None,
    )
    launch_with(cfg)
    return grad_k, grad_v, final


#: rows per chunk of the moment pass (``decay_grad.py``), its float32 (S, M) pair's elements per
#: program (Dk x BLOCK_V each, at most 8192: 64 KiB for the two) and its warps. By ptxas on sm_90
#: (benchmarks/registers.py, bf16, split operands), instructions per chunk, no spills: D = 64 1111
#: (4 warps: 29 of 1538 local); D = 128 1038 with BLOCK_V = 64, 708 with 32 (two programs: 1416
#: for the same columns), 128 spills; D = 256 1136 with BLOCK_V = 32
MOMENT_CHUNK, MOMENT_TILE, MOMENT_WARPS = 64, 8192, 8
#: segments of the moment pass: up to this many programs per multiprocessor, each segment at least
#: MOMENT_MIN_SEGMENT rows (a segment's start pair costs a second read of its k and v)
MOMENT_PROGRAMS_PER_SM, MOMENT_MIN_SEGMENT = 2, 2048
#: the packed chain's state columns per program and its pipelined slots (``_moment_chain_kernel``):
#: a slot is two tiles, so two in flight hold the bytes of the segment scan's four
MOMENT_CHAIN_BLOCK_V, MOMENT_CHAIN_STAGES = SCAN_BLOCK_V, SCAN_STAGES // 2


def decay_gradient(
    query: Tensor, key: Tensor, value: Tensor, grad_out: Tensor, decay: Tensor, scale: float = 1.0,
    initial_state: Optional[Tensor] = None, grad_final: Optional[Tensor] = None, *,
    cu_seqlens: Optional[Tensor] = None, chunk: Optional[int] = None, block_v: Optional[int] = None,
    segment_len: Optional[int] = None, split: Optional[bool] = None,
) -> Tensor:
    """``dL/d decay`` per compute head (float32 ``[H]``) of the op whose output's gradient is
    ``grad_out`` and final state's ``grad_final``: ``reference.decay_gradient_chunked`` (same
    arguments and heads) in one pass of the moment kernel (``decay_grad.py``).

    query, key, value, grad_out: [B, H*, N, D], any strides, one dtype among float16, bfloat16
    and float32; H = query's heads, key, value and grad_out read at head ``h // (H / H*)``.
    decay: float32 [H]. initial_state [B or S, Hi, Dk, Dv] read per compute head, grad_final
    [B or S, H, Dk, Dv]. ``cu_seqlens``: packed sequences (B = 1), each walked from its own
    initial state; nothing of ``cu_seqlens`` is read on the host.

    ``chunk``, ``block_v`` and ``segment_len`` override the launch's choices (tests). Where the
    programs of whole walks would leave the GPU idle (:func:`_moment_cut`), each batch entry or
    packed sequence is cut into segments of ``segment_len`` rows: a states-only pass computes the
    own end pair of every segment that another follows, a chain turns those into start pairs
    (dense: :func:`_segment_moment_starts`; packed: ``decay_grad._moment_chain_kernel`` on the
    tables of :func:`_packed_plan`, one state piece per segment), and the walk starts each segment
    from its pair. ``segment_len`` given with ``cu_seqlens`` forces the packed segments. ``split``:
    16-bit products take their weighted operand as two 16-bit terms (``decay_grad._weighted_product``;
    the default where the products are 16-bit: one term leaves a head's gradient up to 5e-2 off
    at long N)."""
    b, h, n, dk = query.shape
    dv = value.shape[-1]
    device = query.device
    chunk = chunk or MOMENT_CHUNK
    block_k = max(16, next_power_of_2(dk))
    block_v = block_v or max(16, min(64, next_power_of_2(dv), MOMENT_TILE // block_k))
    num_v_blocks = cdiv(dv, block_v)
    num_entries = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if segment_len is None:
        segment_len = _moment_segment_len(n, num_entries, h * num_v_blocks, cu_seqlens is not None, device)
    packed_segments = cu_seqlens is not None and segment_len is not None
    segment_len = cdiv(max(n if segment_len is None else segment_len, 1), chunk) * chunk
    num_segments = cdiv(max(n, 1), segment_len)
    if num_entries == 0 or n == 0:
        return torch.zeros(h, dtype=torch.float32, device=device)
    types = _dot_types(query.dtype)
    if split is None:
        split = types["DOT_DTYPE"] != tl.float32

    def launch(states_only: bool, has_starts: bool, programs: int, table: Optional[Tensor] = None) -> None:
        # grid axis 1: the batch entries or packed sequences; with a plan's table, axis 2 indexes it
        packed = {} if table is None else dict(PLAN=table)
        _direct(_decay_moment_kernel)[(h * num_v_blocks, num_entries if table is None else 1, programs)](
            query, key, value, grad_out, decay, initial_state if initial_state is not None else partials,
            grad_final if grad_final is not None else partials, cu_seqlens, starts, partials,
            *query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *_strides(initial_state),
            *_strides(grad_final), n, h, dk, dv, segment_len, scale,
            *_groups(h, query, key, value, grad_out, initial_state),
            HAS_INIT=initial_state is not None, HAS_GRAD_FINAL=grad_final is not None,
            VARLEN=cu_seqlens is not None, SEGMENTS=num_segments, STATES_ONLY=states_only, HAS_STARTS=has_starts,
            CHUNK=chunk, BLOCK_K=block_k, BLOCK_V=block_v, DOT_DTYPE=types["DOT_DTYPE"], PRECISION=types["PRECISION"],
            SPLIT=split, num_warps=MOMENT_WARPS, num_stages=2, **packed,
        )

    if packed_segments:
        plan = _packed_plan(cu_seqlens, n, segment_len, 1)
        # the plan's piece entries: one per segment that another follows, the last always without one
        num_pairs = plan.pieces.shape[0] - 1
        # entries of the segment table without a segment store no partial
        partials = torch.zeros(plan.segments.shape[0] * h * num_v_blocks, dtype=torch.float32, device=device)
        starts = partials
        if num_pairs > 0:
            starts = torch.empty(num_pairs, h, 2, dk, dv, dtype=torch.float32, device=device)
            launch(True, False, num_pairs, plan.pieces)
            chain_block_v = min(MOMENT_CHAIN_BLOCK_V, max(16, next_power_of_2(dv)))
            _direct(_moment_chain_kernel)[(h * cdiv(dv, chain_block_v), num_entries)](
                decay, initial_state if initial_state is not None else starts, starts, plan.sequences,
                *_strides(initial_state), h, dk, dv, segment_len, *_groups(h, initial_state),
                HAS_INIT=initial_state is not None, BLOCK_K=block_k, BLOCK_V=chain_block_v,
                STAGES=MOMENT_CHAIN_STAGES, num_warps=4,
            )
        launch(False, num_pairs > 0, plan.segments.shape[0], plan.segments)
        return -partials.view(-1, h, num_v_blocks).sum((0, 2))

    partials = torch.empty(num_entries * num_segments * h * num_v_blocks, dtype=torch.float32, device=device)
    starts = partials
    if num_segments > 1:
        starts = torch.empty(b, h, num_segments, 2, dk, dv, dtype=torch.float32, device=device)
        launch(True, False, num_segments - 1)  # the last segment's own pair starts no segment
        _segment_moment_starts(starts, decay, initial_state, segment_len)
    launch(False, num_segments > 1, num_segments)
    return -partials.view(num_entries * num_segments, h, num_v_blocks).sum((0, 2))


def _moment_segment_len(n: int, entries: int, programs_per_entry: int, packed: bool,
                        device: torch.device) -> Optional[int]:
    """The moment pass's segment length on ``device`` (:func:`_moment_cut`), or None: walks whole."""
    if device.type != "cuda" or entries * programs_per_entry == 0:
        return None
    return _moment_cut(n, entries, programs_per_entry, packed,
                       MOMENT_PROGRAMS_PER_SM * multiprocessors(device.index or 0))


def _moment_cut(n: int, entries: int, programs_per_entry: int, packed: bool, wanted: int) -> Optional[int]:
    """Rows per segment of the moment pass, or None where whole walks are kept: ``entries`` batch
    entries or packed sequences of N rows in all, each walked by ``programs_per_entry`` programs
    (heads times value blocks), on a GPU that runs ``wanted`` programs at a time (one fits an SM
    at a time: 8 warps of up to 255 registers). Segments hold at least ``MOMENT_MIN_SEGMENT`` rows.

    Dense: ``count = min(wanted // (B * programs_per_entry), ceil(N / MIN))`` segments per entry
    where that is more than one, so at most ``wanted`` programs (a count just past a whole number
    of waves would leave the last wave nearly empty). Packed: the lengths are not read on the
    host, and one sequence may hold nearly all N rows, so the pack is cut as one sequence of N
    rows would be (``count`` with B = 1): the longest sequence then walks at most L rows in a
    program, whatever the lengths, also among many short ones (one 48K sequence walked whole
    would pace 40 others of 400 rows six times over). Where no sequence is that long, the cut
    costs three small launches (plan, a states pass and a chain with nothing to do)."""
    if packed:
        entries = 1
    count = min(wanted // (entries * programs_per_entry), cdiv(n, MOMENT_MIN_SEGMENT))
    return max(cdiv(n, count), MOMENT_MIN_SEGMENT) if count > 1 else None


def _segment_moment_starts(pairs: Tensor, decay: Tensor, initial_state: Optional[Tensor], length: int) -> None:
    """In place: each segment's own end pair ``(E_m, E'_m)`` (from (0, 0), [B, H, segments, 2, Dk,
    Dv]; the last segment's is never read) becomes the pair segment m starts from (entry 0 is
    left as it is: the first segment starts from the initial state). Segments of L = ``length``
    rows compose as

        S_(m+1) = lam^L S_m + E_m,    M_(m+1) = lam^L M_m + L lam^L S_m + E'_m,   (S_0, M_0) = (init, 0)

    so with ``A[m, m'] = lam^(L (m - 1 - m'))`` for m' < m (else 0): ``S = A E + lam^(L m) S_0``
    and ``M = A (E' + L lam^L S)``, two batched products (every exponent >= 0), in float64: a
    float32 product may run in TF32 (``torch.backends.cuda.matmul.allow_tf32``), 1e-3 off."""
    b, h, count, _, dk, dv = pairs.shape
    wide = torch.float64
    segment = torch.arange(count, device=pairs.device)
    gap = (segment[:, None] - 1 - segment[None, :]).clamp(min=0)
    log_lam = -decay.to(wide)[:, None, None]
    chain = torch.where(segment[:, None] > segment[None, :], torch.exp(log_lam * (length * gap)), 0.0)  # [H, m, m']
    own = pairs.flatten(-2)  # [B, H, segments, 2, Dk * Dv]; the last segment's pair is not written
    chain = chain[:, :, :-1]
    states = chain @ own[:, :, :-1, 0].to(wide)
    if initial_state is not None:
        init = initial_state.to(wide)
        init = init.repeat_interleave(h // init.shape[1], 1) if init.shape[1] != h else init
        states = states + torch.exp(log_lam[:, 0] * (length * segment))[..., None] * init.reshape(b, h, 1, dk * dv)
    lam_length = torch.exp(log_lam * length)
    moments = chain @ (own[:, :, :-1, 1].to(wide) + length * lam_length * states[:, :, :-1])
    own[:, :, 1:, 0] = states[:, :, 1:]
    own[:, :, 1:, 1] = moments[:, :, 1:]


def final_state(key: Tensor, value: Tensor, decay: Optional[Tensor], block: int, *, value_scale: float = 1.0,
                reverse: bool = False) -> Tensor:
    """The float32 state ``[B, H, Dk, Dv]`` that :func:`linear_attention` (same arguments, no
    initial state) ends in, without its outputs: one parallel pass over key and value in blocks of
    ``block`` rows and a scan over the blocks (``boundary.py``), so key and value are read once
    and nothing of N rows is written. Forward ``sum_t lam^(N-1-t) value_scale key_t^T value_t``;
    ``reverse`` (the walk from the end) ``sum_t lam^t value_scale key_t^T value_t``. H is the most
    heads among key, value and decay, each read per compute head as in :func:`linear_attention`."""
    if not block > 0:
        raise ValueError(f"final_state: block must be positive, got {block}")
    b, _, n, dk = key.shape
    dv = value.shape[-1]
    h = _compute_heads(key, value)
    if decay is not None:
        h = max(h, decay.shape[0])
    device = key.device
    if n == 0:
        return torch.zeros(b, h, dk, dv, dtype=torch.float32, device=device)
    count = cdiv(n, block)
    # forward: one more entry, the final state; reverse: entry 0 is the whole walk
    num_entries = count + (0 if reverse else 1)
    out = torch.empty(b, h, num_entries, dk, dv, dtype=torch.float32, device=device)
    block_k = max(16, next_power_of_2(dk))
    block_v = max(16, min(64, next_power_of_2(dv)))
    decay_arg = decay if decay is not None else out
    flags = dict(HAS_DECAY=decay is not None, REVERSE=reverse, BLOCK_K=block_k)
    _direct(_block_state_kernel)[(b * h * cdiv(dv, block_v), count)](
        key, value, decay_arg, out, *key.stride(), *value.stride(),
        n, h, dk, dv, block, num_entries, value_scale, *_groups(h, key, value),
        CHUNK=max(16, min(64, next_power_of_2(block))), BLOCK_V=block_v,
        DOT_DTYPE=_dot_types(key.dtype)["DOT_DTYPE"], PRECISION="ieee", **flags, num_warps=4,
    )
    scan_block_v = min(SCAN_BLOCK_V, max(16, next_power_of_2(dv)))
    end = {} if reverse else dict(STORE_END=True)
    _direct(_block_scan_kernel)[(b * h * cdiv(dv, scan_block_v), 1)](
        decay_arg, out, n, h, dk, dv, block, num_entries, BLOCK_V=scan_block_v, **flags, **end, num_warps=4,
    )
    return out[:, :, 0 if reverse else count]


def decode_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, decay: Optional[Tensor], scale: float) -> Tensor:
    """``reference.attention_step`` on the Triton decode kernel: updates the float32 ``state``
    [B, H, Dk, Dv] in place (any strides) and returns the output [B, H, T, Dv] in q's dtype (the
    dense form of :func:`.decode.launch_decode_step`)."""
    return launch_decode_step(q, k, v, state, decay, scale)
