"""Per-shape autotuning of the launch parameters, with an on-disk cache (opt-in).

:func:`~lightning_op.kernels.choose_config` picks tiles, warps and segments from heuristics fitted
on one H200; another GPU, or another Triton version, may prefer other choices, and only a
measurement on the GPU at hand can tell. When enabled (``LIGHTNING_OP_AUTOTUNE=1`` read when the
kernels are first imported, or :func:`enable`), the first eager call of each *shape class* times the
heuristic's choice and a few variations of it on the call's own inputs, keeps the fastest, and
remembers it in memory and in a JSON file, so that later calls pay a dictionary lookup and later
processes time nothing.

A shape class is the GPU (name and compute capability), the Triton version, :data:`KERNEL_VERSION`,
the kind of launch (``"forward"``: :func:`~lightning_op.kernels.linear_attention`, which also runs
the backward's dq and its unfused dk / dv passes; ``"key_value"``: the fused backward), the dtype,
Dk, Dv, batch*heads and N rounded up to powers of two, decay or not, and the direction in time.
A choice is stored as the override dict :func:`~lightning_op.kernels.config_override` takes (``{}``:
the heuristic itself), so ``choose_config`` still derives each call's launch from it, with its own
validation and rounding, for whatever N in the class the call has.

Nothing is timed (a cached choice is still used, else the heuristic) where timing would be wrong or
would break something: traced launches and explicit segment lengths, under ``torch.compile`` /
``torch.export`` tracing, during CUDA-graph capture (synchronising would break the capture), on
devices other than CUDA. While ``config_override`` forces parameters, autotuning steps aside
entirely: the user's parameters win. Not thread-safe, like ``config_override``: candidates are
derived by filling the same override table.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from typing import Callable, Optional

import torch
import triton

from .config import FAMILIES, FORWARD, LaunchConfig, any_forced, check_changes, forcing, from_flat, \
    next_power_of_2, to_flat

__all__ = ["enable", "disable", "enabled", "cache_path", "select", "KERNEL_VERSION"]

logger = logging.getLogger("lightning_op.autotune")

#: Part of every cache key. Bump it whenever the kernels or their launchers change what a
#: configuration computes or how fast it runs: choices measured on older kernels are then ignored.
KERNEL_VERSION = 7
#: the cache file's layout: ``{"format": 1, "entries": {key: {"config": {...}, "ms": ..., ...}}}``
FILE_FORMAT = 1
#: each candidate is timed over about this much GPU time, in MIN_RUNS to MAX_RUNS launches
CANDIDATE_BUDGET_MS = 25.0
MIN_RUNS, MAX_RUNS = 3, 50
#: once one tuning has taken this long (mostly compiling variants), its remaining candidates are skipped
TUNING_BUDGET_S = 20.0

_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


class _State:
    """What one enabling knows: the cache file's path, the choices in use, the file's entries
    (read lazily, once) and the records this process measured (merged into the file on saving)."""

    def __init__(self, enabled: bool = False, path: Optional[str] = None):
        self.enabled = enabled
        self.path = path
        self.choices: dict[tuple, dict] = {}
        self.file_entries: Optional[dict] = None
        self.measured: dict[str, dict] = {}
        self.save_warned = False


_state = _State()
#: the test hook's timer (see :func:`_fake_timing`)
_fake_timer: Optional[Callable[[str, dict], float]] = None


# ----------------------------------------------------------------------------- switching on and off


def _resolve_path(cache_path=None, environ=os.environ) -> str:
    """``cache_path``, else ``$LIGHTNING_OP_CACHE_DIR/autotune.json``, else
    ``~/.cache/lightning_op/autotune.json``."""
    if cache_path is not None:
        if not isinstance(cache_path, (str, os.PathLike)):
            raise TypeError(f"enable_autotune: cache_path must be a str or os.PathLike, got {type(cache_path).__name__}")
        return os.path.abspath(os.path.expanduser(os.fspath(cache_path)))
    directory = environ.get("LIGHTNING_OP_CACHE_DIR") or os.path.join("~", ".cache", "lightning_op")
    return os.path.abspath(os.path.join(os.path.expanduser(directory), "autotune.json"))


def enable(cache_path=None, *, environ=os.environ) -> str:
    """Turn autotuning on with a fresh in-memory state (the file is read again on the next miss);
    returns the cache file's path."""
    global _state
    _state = _State(True, _resolve_path(cache_path, environ))
    return _state.path


def disable() -> None:
    """Turn autotuning off: every launch takes :func:`choose_config`'s heuristic again."""
    global _state
    _state = _State()


def enabled() -> bool:
    return _state.enabled


def cache_path() -> Optional[str]:
    """The cache file in use, or None while autotuning is off."""
    return _state.path


def _from_environment(environ=os.environ) -> None:
    """``LIGHTNING_OP_AUTOTUNE``: 1 / true / yes / on enables, 0 / false / no / off or unset leaves
    it off; anything else warns and leaves it off (an import should not fail over a typo)."""
    value = environ.get("LIGHTNING_OP_AUTOTUNE", "").strip().lower()
    if value in _ON:
        enable(environ=environ)
    elif value not in _OFF:
        warnings.warn(
            f"LIGHTNING_OP_AUTOTUNE must be 0 or 1, got {environ['LIGHTNING_OP_AUTOTUNE']!r}; autotuning stays off",
            stacklevel=2,
        )


# ----------------------------------------------------------------------------- keys


@functools.lru_cache(maxsize=None)
def _device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"gpu={torch.cuda.get_device_name(index)};cc={major}.{minor}"
    return f"gpu={device.type};cc=none"


def _key_string(key: tuple) -> str:
    """The cache file's readable form of a key."""
    tag, version, kind, dtype, dk, dv, batch_heads, n, has_decay, reverse, *packed = key
    return (
        f"{tag};triton={triton.__version__};kernels={version};kind={kind};"
        f"dtype={str(dtype).removeprefix('torch.')};dk={dk};dv={dv};bh={batch_heads};n={n};"
        f"decay={int(has_decay)};reverse={int(reverse)}" + (";packed=1" if any(packed) else "")
    )


# ----------------------------------------------------------------------------- the launchers' entry


def select(
    kind: str, choose: Callable[[], LaunchConfig], launch: Callable[[LaunchConfig], None],
    device: torch.device, dtype: torch.dtype, dk: int, dv: int, batch_heads: int, n, has_decay: bool,
    reverse: bool, may_tune: bool, packed: bool = False,
) -> LaunchConfig:
    """The launch configuration of one call of kind ``kind``.

    ``choose()`` is the call's ``choose_config`` (it reads the override table, which candidates
    fill); ``launch(cfg)`` runs the call's kernels with ``cfg`` and may be repeated (they write
    their outputs, never accumulate into them); ``may_tune`` is False for traced launches,
    explicit segment lengths and launches that update a state in place. ``packed`` calls
    (``cu_seqlens``) form classes of their own: the same B*H and N cut into many sequences is
    other work than one dense batch. The caller still launches the returned configuration itself.
    """
    state = _state
    if not state.enabled or any_forced():
        return choose()
    if not (isinstance(n, int) and isinstance(batch_heads, int) and isinstance(dk, int) and isinstance(dv, int)):
        return choose()  # symbolic sizes (a traced launch): no class to look up
    key = (_device_tag(device), KERNEL_VERSION, kind, dtype, dk, dv, next_power_of_2(batch_heads),
           next_power_of_2(n), has_decay, reverse) + ((True,) if packed else ())
    changes = state.choices.get(key)
    if changes is None:
        changes = _from_file(state, key, kind)
        if changes and may_tune:
            changes = _launchable(changes, choose, launch, key)
        if changes is None:
            if not (may_tune and _may_time(device)):
                return choose()
            changes = _tune(state, key, choose, launch, device, n)
        state.choices[key] = changes
    if not changes:
        return choose()
    try:
        return _derived(kind, choose, changes)
    except ValueError:  # a cached chunk that the caller's explicit segment length is no multiple of
        return choose()


def _launchable(changes: dict, choose, launch, key: tuple) -> dict:
    """A choice read from the file, after one trial launch of it on this call's inputs (the call
    launches again, so its outputs are this launch's); ``{}`` (the heuristic) for a choice that
    does not compile or launch here, which would otherwise fail every call of its class."""
    try:
        launch(_derived(key[2], choose, changes))
    except Exception as error:
        warnings.warn(
            f"lightning_op autotune: the cached choice {changes} for {_key_string(key)} failed "
            f"({type(error).__name__}: {error}); using the built-in configuration", stacklevel=3,
        )
        return {}
    return changes


def _derived(kind: str, choose: Callable[[], LaunchConfig], changes: dict) -> LaunchConfig:
    """``choose()`` with ``changes`` (a cached choice, spelled flat) forced on ``kind``'s family
    (the override table is empty here: a user's overrides skip autotuning)."""
    with forcing(FAMILIES[kind], from_flat(FAMILIES[kind], changes)):
        return choose()


def _may_time(device: torch.device) -> bool:
    if device.type != "cuda" and _fake_timer is None:
        return False
    if torch.compiler.is_compiling():
        return False
    try:
        return not torch.cuda.is_current_stream_capturing()
    except RuntimeError:  # a CPU-only build of torch (test hook): nothing can be capturing
        return True


# ----------------------------------------------------------------------------- tuning


def _candidates(kind: str, cfg: LaunchConfig, n: int, n_class: int) -> list[dict]:
    """Override dicts (spelled flat, as the cache file keeps them), each one step away from ``cfg``
    (the heuristic's choice for a call of length ``n`` in the class of lengths up to ``n_class``).
    Values are absolute, so a choice made at one N serves the whole class."""
    family = FAMILIES[kind]
    forward = family is FORWARD
    changes = [{"accumulate": int(not cfg.accumulate)}]
    if forward and not cfg.accumulate:  # the other form with its state update accumulating, or not
        changes.append({"update_accumulate": int(not cfg.update_accumulate)})
    if forward and cfg.block_v >= 32:  # fewer registers per program, more programs
        changes.append({"block_v": cfg.block_v // 2})
    if forward and cfg.transposed and cfg.block_k > 128:
        # wide keys: the other output kernel in its own tiles (value blocks of 64, three stages)
        changes.append({"transposed": 0, "block_v": 64, "num_stages": 3})
    elif forward and cfg.block_k == 128 and cfg.chunk >= 64:
        # the other output kernel (keys wider than 128 that are not transposed by default have a
        # float32 state operand, whose transposed tiles overflow shared memory: not a candidate)
        changes.append({"transposed": int(not cfg.transposed)})
    if not forward and cfg.chunk >= 32:  # its block_v is the whole value width: smaller chunks instead
        changes.append({"chunk": cfg.chunk // 2})
    changes.append({"num_warps": 8 if cfg.num_warps == 4 else 4})
    for stages in (cfg.num_stages - 1, cfg.num_stages + 1):
        if 1 <= stages <= 3:
            changes.append({"num_stages": stages})
    if n > cfg.segment_len:  # several segments: their length and the state pass's pieces
        changes.append({"segment_len": 2 * cfg.segment_len})
        if cfg.segment_len // 2 >= 4 * cfg.chunk:
            changes.append({"segment_len": cfg.segment_len // 2})
        changes.append({"segment_len": n_class})  # one segment for every length of the class
        changes.append({"state_split": 2 * cfg.state_split})
        if cfg.state_split > 1:
            changes.append({"state_split": cfg.state_split // 2})
        if forward:  # the state pass's form (the fused backward's always accumulates)
            changes.append({"state_accumulate": int(not cfg.state_accumulate)})
    return [to_flat(family, change) for change in changes]


def _tune(state: _State, key: tuple, choose, launch, device: torch.device, n: int) -> dict:
    """Time the heuristic and its variations on this call's inputs; record, save and return the
    fastest one's override dict. A candidate that fails to compile or launch is skipped; the
    heuristic's own failure is the call's, and is raised."""
    started = time.perf_counter()
    kind = key[2]
    listed = [({}, choose())]
    for changes in _candidates(kind, listed[0][1], n, key[7]):
        try:
            cfg = _derived(kind, choose, changes)
        except ValueError as error:
            logger.debug("%s: candidate %s is not a configuration: %s", kind, changes, error)
            continue
        if all(cfg != seen for _, seen in listed):  # the same launch under another name
            listed.append((changes, cfg))
    timed, failed, skipped = [], 0, 0
    for changes, cfg in listed:
        if changes and time.perf_counter() - started > TUNING_BUDGET_S:
            skipped += 1
            continue
        try:
            launch(cfg)  # compiles; a candidate that cannot compile or launch fails here
            milliseconds = _fake_timer(kind, dict(changes)) if _fake_timer else _gpu_milliseconds(launch, cfg, device)
        except Exception as error:
            if not changes:
                raise
            failed += 1
            logger.debug("%s: candidate %s failed: %s: %s", kind, changes, type(error).__name__, error)
            continue
        timed.append((milliseconds, changes))
    best_ms, best = min(timed, key=lambda item: item[0])  # ties go to the earlier: the heuristic first
    key_string = _key_string(key)
    logger.info(
        "tuned %s: %s, %.4f ms (heuristic %.4f ms; %d candidates, %d failed, %d skipped, %.1f s)",
        key_string, best or "the heuristic", best_ms, timed[0][0], len(listed), failed, skipped,
        time.perf_counter() - started,
    )
    state.measured[key_string] = {
        "config": best, "ms": round(best_ms, 5), "heuristic_ms": round(timed[0][0], 5), "candidates": len(timed),
    }
    _save(state)
    return best


def _gpu_milliseconds(launch, cfg: LaunchConfig, device: torch.device) -> float:
    """The median of timed launches, each between two CUDA events on the current stream. One
    launch first sets how many fit the budget; those are then queued back to back and synchronised
    once, so the GPU, not the host, sets the pace where it can."""
    def event():
        return torch.cuda.Event(enable_timing=True)

    with torch.cuda.device(device):
        start, end = event(), event()
        start.record()
        launch(cfg)
        end.record()
        end.synchronize()
        runs = int(min(MAX_RUNS, max(MIN_RUNS, CANDIDATE_BUDGET_MS / max(start.elapsed_time(end), 1e-3))))
        events = [(event(), event()) for _ in range(runs)]
        for start, end in events:
            start.record()
            launch(cfg)
            end.record()
        events[-1][1].synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)


# ----------------------------------------------------------------------------- the cache file


def _from_file(state: _State, key: tuple, kind: str) -> Optional[dict]:
    """The file's valid choice for ``key``, or None (the file is read on the first miss only)."""
    if state.file_entries is None:
        state.file_entries = _read(state.path, warn=True)
    key_string = _key_string(key)
    record = state.file_entries.get(key_string)
    if record is None:
        return None
    changes = _valid_choice(record, kind)
    if changes is None:
        logger.info("ignoring the invalid cache entry %s: %r", key_string, record)
    return changes


def _valid_choice(record, kind: str) -> Optional[dict]:
    """The override dict of a cache record, or None unless it holds only parameters of ``kind``'s
    family with values ``config_override`` accepts, none past its declared cached maximum."""
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        return None
    changes = record["config"]
    family = FAMILIES[kind]
    try:
        check_changes(family, from_flat(family, changes), cached=True)
    except (TypeError, ValueError):
        return None
    return dict(changes)


def _read(path: str, *, warn: bool) -> dict:
    """The file's entries; ``{}`` for a missing file, and for an unreadable or malformed one (with
    a warning when ``warn``: it is then ignored, and replaced by the next save)."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT or not isinstance(data.get("entries"), dict):
            raise ValueError(f"not a lightning_op autotune cache of format {FILE_FORMAT}")
        return data["entries"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # json's errors and bad UTF-8 are ValueErrors
        if warn:
            warnings.warn(
                f"lightning_op autotune: ignoring the cache file {path} ({type(error).__name__}: {error}); "
                f"the next tuning replaces it", stacklevel=2,
            )
        return {}


def _save(state: _State) -> None:
    """Merge this process's records into the file as it is now (another process may have tuned
    meanwhile) and replace it atomically: written to a temporary file beside it, then
    ``os.replace``d. A failure (a read-only directory) warns once; the choices stay in memory."""
    entries = _read(state.path, warn=False)
    entries.update(state.measured)
    state.file_entries = dict(entries)
    directory = os.path.dirname(state.path)
    try:
        os.makedirs(directory, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".autotune-", suffix=".json.tmp", dir=directory)
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(handle, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump({"format": FILE_FORMAT, "entries": entries}, file, indent=1, sort_keys=True)
                file.write("\n")
            os.replace(temporary, state.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as error:
        if not state.save_warned:
            state.save_warned = True
            warnings.warn(
                f"lightning_op autotune: cannot write the cache file {state.path} ({error}); "
                f"choices are kept in memory for this process only", stacklevel=2,
            )


# ----------------------------------------------------------------------------- test hook


@contextlib.contextmanager
def _fake_timing(timer: Callable[[str, dict], float]):
    """For tests: tune launches on CPU tensors too (the interpreter's) and take each candidate's
    time from ``timer(kind, changes)`` in place of CUDA events. Each candidate is still launched
    once first, so failing ones are still skipped."""
    global _fake_timer
    saved = _fake_timer
    _fake_timer = timer
    try:
        yield
    finally:
        _fake_timer = saved


_from_environment()
