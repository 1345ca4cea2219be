"""What to launch: the kernels' launch parameters, declared once per kernel family, and the
heuristics that choose them.

Three families take launch parameters: ``forward`` (the output pass and its segment-state pass:
:func:`~lightning_op.kernels.linear_attention`, which also runs the backward's dq pass and its
unfused dk / dv passes), ``key_value`` (the fused dk / dv backward) and ``decode`` (the decode
step). Each parameter is declared once in :data:`FAMILIES` with its rule and its bound; forced
values (:func:`config_override`), the autotuner's cached choices and its candidates are all
checked against these declarations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import torch

__all__ = ["LaunchConfig", "Parameter", "Family", "FAMILIES", "config_override", "check_changes", "forced",
           "choose_config", "choose_decode", "packed_decode_rows", "cdiv", "next_power_of_2", "multiprocessors"]


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
    state_accumulate: bool = False  # the segment-state pass's ACCUMULATE form (its own; choose_config: on)
    update_accumulate: bool = False  # the output pass's state update alone accumulating (forward only)
    transposed: bool = False  # the output pass in its TRANSPOSED form (state transposed, cut by key columns)


# ----------------------------------------------------------------------------- the declarations


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One launch parameter. ``rule``: ``"flag"`` (0 or 1), ``"size"`` (a non-negative int), ``"count"`` (a positive int),
    ``"power_of_two"`` (a positive power of two) or ``"tile"`` (a power of two >= 16).
    ``cached_maximum``: the largest value an autotuner cache entry may hold (no candidate is
    larger), None for no bound."""

    name: str
    rule: str
    help: str
    cached_maximum: Optional[int] = None

    def problem(self, value) -> Optional[str]:
        """Why ``value`` is not a value of this parameter, or None."""
        if self.rule == "flag":
            return None if value in (0, 1) and not isinstance(value, float) else "must be 0 or 1"
        if self.rule == "size":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            return None if ok else "must be a non-negative int"
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return "must be a positive int"
        if self.rule == "power_of_two" and value & (value - 1):
            return "must be a power of two"
        if self.rule == "tile" and (value < 16 or value & (value - 1)):
            return "must be a power of two >= 16"
        return None


@dataclasses.dataclass(frozen=True)
class Family:
    """The parameters of one kernel family. ``flat_prefix`` and ``shared`` describe the flat
    spelling of :func:`config_override` (``kv_chunk=32``): a parameter of this family is spelled
    with the prefix, and the unprefixed forward parameters named in ``shared`` apply here too
    unless the prefixed one is given."""

    name: str
    parameters: tuple[Parameter, ...]
    flat_prefix: str = ""
    shared: frozenset = frozenset()

    def __getitem__(self, name: str) -> Parameter:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @functools.cached_property
    def _by_name(self) -> dict:
        return {p.name: p for p in self.parameters}

    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)


_CHUNK = Parameter("chunk", "tile", "rows of the intra-chunk masked attention", cached_maximum=128)
_WARPS = Parameter("num_warps", "power_of_two", "warps per program", cached_maximum=32)
_STAGES = Parameter("num_stages", "count", "software-pipelining stages of the loads", cached_maximum=4)
_SEGMENT = Parameter("segment_len", "count", "rows per segment, rounded up to whole chunks (segments run in parallel)")
_SPLIT = Parameter("state_split", "power_of_two", "pieces per segment in the segment-state pass")
_ACCUMULATE = Parameter("accumulate", "flag", "the kernels' ACCUMULATE form (products accumulated in place)")

FORWARD = Family("forward", (
    _CHUNK,
    Parameter("block_v", "tile", "value columns per program", cached_maximum=256),
    _WARPS, _STAGES, _SEGMENT, _SPLIT, _ACCUMULATE,
    Parameter("state_accumulate", "flag", "the segment-state pass's ACCUMULATE form"),
    Parameter("update_accumulate", "flag", "the state update alone accumulating (UPDATE_ACCUMULATE)"),
    Parameter("transposed", "flag", "the output pass in its TRANSPOSED form (its own form: accumulate "
                                    "and update_accumulate do not apply to it)"),
))
KEY_VALUE = Family("key_value", (
    _CHUNK, _WARPS, _STAGES, _SEGMENT, _SPLIT, _ACCUMULATE,
    Parameter("fused", "flag", "0: the two-pass composition instead of the fused pass (for comparisons)"),
), flat_prefix="kv_", shared=frozenset({"chunk", "num_warps", "num_stages", "segment_len", "state_split",
                                        "accumulate"}))
DECODE = Family("decode", (
    Parameter("block_v", "power_of_two", "value columns per program"),
    Parameter("num_warps", "count", "warps per program"),
    Parameter("packed_rows", "size", "a pooled packed step's sequences of 1 to this many rows run on the decode "
                                     "kernel (0: all on the tiled kernels)"),
), flat_prefix="decode_")

FAMILIES = {family.name: family for family in (FORWARD, KEY_VALUE, DECODE)}
#: the flat spelling's names that are not a forward parameter: (family, parameter) each
_FLAT = {family.flat_prefix + p.name: (family, p) for family in (KEY_VALUE, DECODE) for p in family.parameters}
#: the flat names ``kv_accumulate`` never had: the fused backward takes ``accumulate`` from the forward's
del _FLAT["kv_accumulate"]


# ----------------------------------------------------------------------------- forcing parameters

#: forced parameters per family, as :func:`config_override` set them
_overrides: dict[str, dict] = {}


def check_changes(family: Family, changes: dict, *, cached: bool = False, flat: bool = False) -> None:
    """Raise ``ValueError`` naming the parameter unless every ``changes`` entry is a valid value of
    a parameter of ``family`` (``cached``: also within the bound a cached choice may reach).
    ``flat``: ``changes`` are spelled flat (see :func:`config_override`), as the messages are."""
    for name, value in changes.items():
        local = from_flat(family, {name: value}) if flat else {name: value}
        (local_name, _), = local.items()
        if local_name not in family:
            raise ValueError(f"config_override: unknown {family.name} parameter {name!r}; "
                             f"{family.name} parameters: {list(family.names())}")
        parameter = family[local_name]
        problem = parameter.problem(value)
        if problem is None and cached and parameter.cached_maximum is not None and value > parameter.cached_maximum:
            problem = f"must be at most {parameter.cached_maximum}"
        if problem:
            spelled = name if flat or family is FORWARD else f"{family.name}={{{name!r}: ...}}"
            raise ValueError(f"config_override: {spelled} {problem}, got {value!r}")


def _from_flat(flat: dict) -> dict[str, dict]:
    """The per-family form of the flat spelling (``chunk=32, kv_num_warps=4, decode_block_v=16``).
    Unprefixed names are forward parameters and, where a family shares them, that family's unless
    it is given its own."""
    unknown = set(flat) - set(FORWARD.names()) - set(_FLAT)
    if unknown:
        raise ValueError(f"config_override: unknown parameters {sorted(unknown)}; tunable: "
                         f"{list(FORWARD.names()) + list(_FLAT)}")
    families: dict[str, dict] = {}
    for name, value in flat.items():
        family, parameter = _FLAT[name] if name in _FLAT else (FORWARD, FORWARD[name])
        families.setdefault(family.name, {})[parameter.name] = value
    for family in FAMILIES.values():
        for name in family.shared & set(flat):
            families.setdefault(family.name, {}).setdefault(name, flat[name])
    return families


def to_flat(family: Family, changes: dict) -> dict:
    """``changes`` of one family in the flat spelling (the autotuner's cache file keeps that)."""
    if family is FORWARD:
        return dict(changes)
    return {(name if name == "accumulate" and family is KEY_VALUE else family.flat_prefix + name): value
            for name, value in changes.items()}


def from_flat(family: Family, flat: dict) -> dict:
    """The inverse of :func:`to_flat` for one family's cached choice; raises ``ValueError`` for a
    name of another family."""
    changes = {}
    for name, value in flat.items():
        if family is FORWARD and name in FORWARD:
            changes[name] = value
        elif family is KEY_VALUE and name == "accumulate":
            changes[name] = value
        elif name in _FLAT and _FLAT[name][0] is family:
            changes[_FLAT[name][1].name] = value
        else:
            raise ValueError(f"config_override: {name!r} is not a {family.name} parameter")
    return changes


@contextlib.contextmanager
def config_override(*, forward: Optional[dict] = None, key_value: Optional[dict] = None,
                    decode: Optional[dict] = None, **flat):
    """Force launch parameters for every kernel call inside the block, to time or test
    configurations other than :func:`choose_config`'s. Not thread-safe.

    ``forward``, ``key_value`` and ``decode`` are dicts of one family's parameters each (see
    :data:`FAMILIES` for names, rules and meanings), e.g.
    ``config_override(forward=dict(chunk=32), key_value=dict(fused=0))``.

    The flat spelling is kept too: unprefixed names (``chunk``, ``block_v``, ``num_warps``,
    ``num_stages``, ``segment_len``, ``state_split``, ``accumulate``, ``state_accumulate``,
    ``update_accumulate``, ``transposed``) are forward parameters that also apply to the fused
    backward where it has them; ``kv_``-prefixed names (``kv_chunk``, ``kv_num_warps``,
    ``kv_num_stages``, ``kv_segment_len``, ``kv_state_split``, ``kv_fused``) apply to the fused
    backward only and win there;
    ``decode_block_v`` and ``decode_num_warps`` to the decode step.
    """
    for name, value in flat.items():
        family = _FLAT[name][0] if name in _FLAT else FORWARD
        if name in _FLAT or name in FORWARD:
            check_changes(family, {name: value}, flat=True)
    changes = _from_flat(flat)
    for family, given in ((FORWARD, forward), (KEY_VALUE, key_value), (DECODE, decode)):
        if given is not None:
            changes.setdefault(family.name, {}).update(given)
    for name, given in changes.items():
        check_changes(FAMILIES[name], given)
    saved = {name: dict(given) for name, given in _overrides.items()}
    for name, given in changes.items():
        _overrides.setdefault(name, {}).update(given)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def forced(family: Family, name: str):
    """The forced value of ``family``'s parameter ``name``, or None."""
    return _overrides.get(family.name, {}).get(name)


def any_forced() -> bool:
    return any(_overrides.values())


@contextlib.contextmanager
def forcing(family: Family, changes: dict):
    """Force ``changes`` of ``family`` inside the block (the autotuner's candidates; the table is
    empty there: a user's overrides skip autotuning)."""
    _overrides[family.name] = dict(changes)
    try:
        yield
    finally:
        _overrides.clear()


# ----------------------------------------------------------------------------- the heuristics


def cdiv(a, b):
    """``ceil(a / b)`` for positive ``b``, in plain integer arithmetic (SymInts too). The host
    code's stand-in for ``triton.cdiv``, a ``ConstexprFunction`` that costs microseconds per call."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0), as ``triton.next_power_of_2`` (see cdiv)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.lru_cache(maxsize=None)
def multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_chosen: dict = {}


def choose_config(
    batch_heads: int, n: int, dk: int, dv: int, device: torch.device, segment_len: Optional[int] = None,
    *, whole_value: bool = False, itemsize: int = 2, state_itemsize: Optional[int] = None,
    state_split: Optional[int] = None,
) -> LaunchConfig:
    """:func:`_choose_config`, remembered per argument set (it runs for every launch; a dictionary
    lookup costs far less). Not remembered while :func:`config_override` forces parameters, or for
    symbolic sizes."""
    if any_forced() or not all(type(x) is int for x in (batch_heads, n, dk, dv)) or \
            (segment_len is not None and type(segment_len) is not int):
        return _choose_config(batch_heads, n, dk, dv, device, segment_len, whole_value=whole_value, itemsize=itemsize,
                              state_itemsize=state_itemsize, state_split=state_split)
    count = multiprocessors(device.index or 0) if device.type == "cuda" else 0
    key = (batch_heads, n, dk, dv, device, segment_len, whole_value, itemsize, state_itemsize, count, state_split)
    cfg = _chosen.get(key)
    if cfg is None:
        cfg = _choose_config(batch_heads, n, dk, dv, device, segment_len, whole_value=whole_value, itemsize=itemsize,
                             state_itemsize=state_itemsize, state_split=state_split)
        if len(_chosen) >= 4096:
            _chosen.clear()
        _chosen[key] = cfg
    return cfg


def _choose_config(
    batch_heads: int, n: int, dk: int, dv: int, device: torch.device, segment_len: Optional[int] = None,
    *, whole_value: bool = False, itemsize: int = 2, state_itemsize: Optional[int] = None,
    state_split: Optional[int] = None,
) -> LaunchConfig:
    """Tile sizes and the segment length for one call of the forward family, or of the fused
    backward (``whole_value``). ``itemsize``: bytes per input element; ``state_itemsize``: bytes
    per element of the state's operand in its products, by default ``itemsize`` (float16 inputs
    have 4, see :func:`~lightning_op.kernels.launch.state_itemsize_of`). ``segment_len`` and
    ``state_split``: a caller's fixed cut (an explicit ``segment_len`` alone is not split).

    Each choice is the fastest of the sweeps recorded in benchmarks/RESULTS.md:

    - the whole value width in one program up to 128 columns for 16-bit inputs (q and k are read
      once, not once per value block); 64 for float32, whose tiles would not fit in shared memory;
      for keys wider than 128, chunks and value blocks of 64 (32 for float32);
    - the ``ACCUMULATE`` form for keys up to 64 wide (slower for wider keys); for keys of 65-128
      in 16-bit inputs the forward's state update alone in that form (``update_accumulate``; the
      fused backward has no such choice, see ``backward._key_value_grad_kernel``);
    - one segment (the paper's sequential walk) when batch*heads*value-blocks programs already
      occupy most multiprocessors (more segments only add a pass over k and v); otherwise
      power-of-two segments of at least 8 chunks until the multiprocessors are covered (twice
      over for four-warp programs of the other form, two of which fit on one);
    - the segment-state pass has (segments - 1) * programs to run, too few when batch*heads is
      small: its segments are then cut into ``state_split`` pieces (of at least 4 chunks) while
      it would leave more than a tenth of the multiprocessors idle; it accumulates in place
      whatever the output pass's form;
    - the output passes in their ``TRANSPOSED`` form (the state held as S^T, in parts of 64 key
      columns) for 16-bit keys of 65-128 columns, and for wider ones whose state operand is 16-bit
      too (bfloat16), there in value blocks of 128 and two stages (float16's float32 state operand
      would need more shared memory than a Hopper GPU has);
    - ``whole_value`` (the fused backward, which holds a Dk x Dv state and four row tiles): all
      value columns in one block, fewer pipeline stages.

    Power-of-two segment lengths keep compiled variants few. Parameters forced by
    :func:`config_override` win over these choices.
    """
    family = KEY_VALUE if whole_value else FORWARD

    def pick(name, default):
        value = forced(family, name) if name in family else None
        return default if value is None else value

    block_k = max(16, next_power_of_2(dk))
    wide_float32 = block_k > 128 and itemsize > 2  # 64-row float32 tiles of such keys overflow shared memory
    chunk = pick("chunk", 32 if wide_float32 else 64)
    state_itemsize = itemsize if state_itemsize is None else state_itemsize
    transposed = not whole_value and bool(pick("transposed", int(
        itemsize <= 2 and (block_k == 128 or (block_k > 128 and state_itemsize <= 2)))))
    wide_transposed = transposed and block_k > 128  # S^T in parts: value blocks of 128 in two stages
    if whole_value:
        block_v = max(16, next_power_of_2(dv))
    else:
        widest = (128 if itemsize <= 2 else 64) if block_k <= 128 or wide_transposed else (32 if wide_float32 else 64)
        block_v = pick("block_v", max(16, min(next_power_of_2(dv), widest)))
    num_warps = pick("num_warps", 4 if block_k <= 64 else 8)
    accumulate = bool(pick("accumulate", int(block_k <= 64)))
    if whole_value:
        num_stages = pick("num_stages", 2 if max(block_k, block_v) >= 128 else 1)
    else:
        num_stages = pick("num_stages", 2 if wide_transposed else 3)
    forced_segment = pick("segment_len", None)
    explicit = segment_len is not None  # a caller's fixed length (N may be symbolic): no split
    if segment_len is None and forced_segment is not None:
        segment_len = cdiv(forced_segment, chunk) * chunk
    if segment_len is None:
        segment_len = max(n, chunk)
        if device.type == "cuda" and n > 0:
            programs = batch_heads * cdiv(dv, block_v)
            wanted = multiprocessors(device.index or 0) * (1 if num_warps >= 8 or accumulate else 2)
            if 4 * programs < 3 * wanted:
                per_segment = max(8 * chunk, cdiv(n, cdiv(wanted, programs)))
                segment_len = next_power_of_2(per_segment)
        segment_len = cdiv(segment_len, chunk) * chunk
    elif segment_len <= 0 or segment_len % chunk:
        raise ValueError(f"segment_len must be a positive multiple of the chunk size {chunk}, got {segment_len}")
    if state_split is None:
        state_split = pick("state_split", None)
    if state_split is None:
        state_split = 1
        if device.type == "cuda" and not explicit and n > segment_len:
            busy = batch_heads * cdiv(dv, block_v) * (cdiv(n, segment_len) - 1)
            while 10 * busy * state_split < 9 * multiprocessors(device.index or 0) and \
                    segment_len // (2 * state_split) >= 4 * chunk:
                state_split *= 2
    while state_split > 1 and segment_len % (state_split * chunk):  # pieces are whole chunks
        state_split //= 2
    state_accumulate = bool(pick("state_accumulate", 1))  # key_value has no such parameter: always on
    # the fused backward's state update never accumulates in place (backward._key_value_grad_kernel)
    update_accumulate = not whole_value and bool(pick("update_accumulate", int(64 < block_k <= 128 and itemsize <= 2)))
    return LaunchConfig(chunk, block_k, block_v, segment_len, num_warps, num_stages, state_split, accumulate,
                        state_accumulate, update_accumulate, transposed)


def choose_decode(batch_heads: int, dv: int, device: torch.device) -> tuple[int, int]:
    """``(block_v, num_warps)`` of the decode step: value blocks of 32 columns, 16 where that gives
    too few programs to spread a small batch over the GPU (the step is a read and a write of the
    state: latency, not bandwidth, at B = 1)."""
    block_v = max(16, min(next_power_of_2(dv), 32))
    if device.type == "cuda" and batch_heads * cdiv(dv, block_v) < multiprocessors(device.index or 0):
        block_v = 16
    value = forced(DECODE, "block_v")
    block_v = block_v if value is None else value
    value = forced(DECODE, "num_warps")
    return block_v, 4 if value is None else value


#: a pooled packed step's sequences of up to this many rows run on the decode kernel: one-token
#: sequences gain; sequences of a few rows gain nothing and longer ones lose, since the decode
#: kernel walks their tokens one by one (benchmarks/RESULTS.md)
PACKED_DECODE_ROWS = 1


def packed_decode_rows() -> int:
    """The longest sequence of a pooled packed step that the decode kernel runs (see
    ``launch.linear_attention``'s ``short_rows``): a one-token sequence costs the tiled output
    kernel a whole chunk program; the decode kernel reads and writes its state in value blocks,
    beside the tiled kernels on a second stream."""
    value = forced(DECODE, "packed_rows")
    return PACKED_DECODE_ROWS if value is None else value


def fused_backward_fits(dk: int, dv: int, itemsize: int) -> bool:
    """Whether the fused dk / dv pass takes these head dims: it holds a Dk x Dv float32 state and
    whole rows of q, k, v and do, so both padded to at most 128, or 64 for float32 inputs (shared
    memory). It does not while ``config_override`` forces ``key_value fused=0``."""
    widest = FUSED_BACKWARD_MAX_BLOCK if itemsize <= 2 else FUSED_BACKWARD_MAX_BLOCK // 2
    return max(next_power_of_2(dk), next_power_of_2(dv)) <= widest and forced(KEY_VALUE, "fused") != 0


#: the fused key/value backward's widest padded head dim for 16-bit inputs (see fused_backward_fits)
FUSED_BACKWARD_MAX_BLOCK = 128
