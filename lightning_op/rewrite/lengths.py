"""The checks of a candidate at the other lengths a symbolic sequence length can take.

A candidate verified at the length it was probed at is attention at that length. A graph with a
symbolic length runs at every length in its range, and its masks are functions of the length: a
sliding window is causal attention up to its window and something else past it. So the region is
probed again at a few small lengths, at the lower end of the range, and past every number its
computation holds (a window, a mask buffer's length; or at the range's upper end where that is
lower); where the whole region is too large to evaluate there, its masks alone must be the
verified ones continued (:meth:`_Lengths.check_masks`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from . import graph as g
from .candidate import Candidate, Reject, Stage, probe_limit

_ALT_LENGTHS = (37, 5, 130)  # further sequence lengths probed when N is symbolic
# Past the probe limit a symbolic length's masks may still be checked alone at a long length (no
# products: a few passes over each mask), up to this many elements in one of their tensors.
_MAX_MASK_ELEMENTS = {"cpu": 1 << 25, "cuda": 1 << 28}


def check_lengths(cand: Candidate, ev: g.Evaluator, agrees: Callable[[g.Evaluator], None]) -> None:
    """Probe the region at the lengths a symbolic N can take beyond the one verified: a few
    small ones, the lower end of N's range, and one past every number the region and its masks
    are computed from (at 2 c + 2 for the largest such c, or at the upper end of N's range
    where that is lower). A mask is a function of N, so agreement at a few small lengths says
    nothing of a sliding window of 38 or 64 tokens, or of a window inside a mask buffer: past
    every number its computation holds, such a window shows. A length at which the graph
    cannot run (a buffer sliced past its end) proves nothing and is passed over; a static
    graph runs at its one length, where the region was probed at full size.

    ``ev`` evaluates at the verified length; ``agrees(ev)`` raises :class:`Reject` where the
    region is not the verified attention at ``ev``'s sizes."""
    symbols = getattr(cand.reading.length, "free_symbols", set())
    if symbols:
        _Lengths(cand, ev, agrees, symbols).check()


class _Lengths:
    """The lengths one candidate's symbolic N can take, and those it has been verified at."""

    def __init__(self, cand: Candidate, ev: g.Evaluator, agrees: Callable[[g.Evaluator], None], symbols):
        self.cand, self.ev, self.agrees, self.symbols = cand, ev, agrees, symbols
        self.low, self.high = 2, None  # the range the length's symbols share
        for sym in symbols:
            low, high = g.symbol_range(ev.shape_env, sym)
            self.low = max(self.low, low)
            if high is not None:
                self.high = high if self.high is None else min(self.high, high)
        self.verified = {cand.canonical_shapes(ev)[0][2]}

    def clamp(self, length: int) -> int:
        return max(self.low, length if self.high is None else min(length, self.high))

    def at(self, length: int) -> g.Evaluator:
        return self.ev.rebound({sym: length for sym in self.symbols})

    def largest_at(self, nodes, length: int) -> float:
        """Elements in the largest tensor among ``nodes`` with the length at ``length``."""
        try:
            return self.at(length).largest(nodes)
        except Exception:  # a size that cannot be evaluated: not affordable to find out
            return math.inf

    def probe(self, length: int) -> Optional[Exception]:
        """None when the region agrees at ``length``; the error when it cannot run there."""
        try:
            self.agrees(self.at(length))
        except Reject as reject:
            raise Reject(f"at sequence length {length}, {reject}: what the region computes changes with the "
                         "length (a sliding window?)", reject.stage) from None
        except Exception as error:  # this length may be invalid for the model (a buffer too short)
            return error
        self.verified.add(length)
        return None

    def check(self) -> None:
        clamp, region = self.clamp, self.cand.region
        errors = [self.probe(n) for n in sorted({clamp(alt) for alt in _ALT_LENGTHS} | {self.low})
                  if n not in self.verified]
        if errors and all(error is not None for error in errors):
            raise Reject(f"could not check a second sequence length: {errors[-1]}", Stage.VALUES)

        region_numbers, mask_numbers = _position_numbers(region, self.ev)
        largest = max(region_numbers + mask_numbers, default=0)
        far = clamp(2 * largest + 2)
        if far <= max(self.verified):
            return
        limit = probe_limit(g.tensor_val(self.cand.output).device)
        # where the graph cannot run at `far`, the longest length it can run at past the others
        fallbacks = sorted({clamp(c) for c in region_numbers + mask_numbers if max(self.verified) < clamp(c) < far},
                           reverse=True)
        error: Optional[Exception] = None
        for length in [far, *fallbacks[:3]]:
            elements = self.largest_at(region, length)
            if elements <= limit:
                error = self.probe(length)
            else:  # too large to probe whole: the region past its own numbers, its masks alone here
                region_far = clamp(2 * max(region_numbers, default=0) + 2)
                if region_far > max(self.verified):
                    if self.largest_at(region, region_far) > limit or self.probe(region_far) is not None:
                        raise Reject(f"to prove the mask for every sequence length the region must be probed at "
                                     f"length {region_far}, past the numbers it holds (up to "
                                     f"{max(region_numbers)}), where it is too large to evaluate or cannot run",
                                     Stage.VALUES)
                error = self.check_masks(length, largest, elements)
            if error is None:
                return
        raise Reject(f"could not evaluate the region at a sequence length past the numbers its computation holds "
                     f"(up to {largest}, at {far}), so its mask is not proven for every length: {error}", Stage.VALUES)

    def check_masks(self, length: int, largest: int, elements: float) -> Optional[Exception]:
        """The region's constant inputs at ``length`` against their values at the verified length,
        for a region too large to probe whole there (``elements`` in its largest tensor). Each one
        that grows with the sequence must be a ``[..., N, N]`` function of ``t - s`` (a Toeplitz
        matrix, as every mask of a causal decay is) which, on each side of the diagonal, continues
        the geometric sequence it is at the verified length; every other one must keep its values.
        Returns the error where the graph cannot run at ``length`` (a mask buffer sliced past its
        end comes out short); raises Reject otherwise."""
        order, classes, tol = self.cand.region, self.ev.classes, self.cand.tolerance
        too_large = (f"to prove the mask for every sequence length the region must be probed at length {length}, "
                     f"past the numbers its computation holds (up to {largest}: a window? a mask buffer's length?), "
                     f"where it is too large to evaluate ({elements} elements in one tensor)")
        masks = list(dict.fromkeys(a for n in order for a in n.all_input_nodes if classes.get(a) == g.CONST
                                   and g.tensor_val(a) is not None))
        there = self.at(length)
        device = g.tensor_val(order[-1]).device.type
        limit = _MAX_MASK_ELEMENTS.get(device, _MAX_MASK_ELEMENTS["cpu"])
        if self.largest_at(g.constant_ancestry(masks, classes), length) > limit:
            raise Reject(f"{too_large}, and so are its masks", Stage.VALUES)
        for node in masks:
            try:
                known, shape, value = self.ev.shape(node), there.shape(node), there.const(node)
            except Exception as error:  # the graph cannot run at this length
                return error
            if tuple(value.shape) != shape:
                return RuntimeError(f"{node.name} is {tuple(value.shape)} at length {length}, not {shape}")
            reference = self.ev.const(node).to(torch.float64)
            value = value.to(torch.float64)
            if shape == known:
                if not _close(value, reference, tol):
                    raise Reject(f"{too_large}, and {node.name}'s values change with the length", Stage.VALUES)
                continue
            what = f"{node.name} ({g.describe(node)})"
            square = len(shape) >= 2 and shape[-1] == shape[-2] and known[-1] == known[-2]
            if not square or shape[:-2] != known[:-2]:
                raise Reject(f"{too_large}, and {node.name} ({g.describe(node)}, {list(shape)}) grows with the "
                             "length other than as an [N, N] mask that could be checked alone", Stage.VALUES)
            if not (_is_toeplitz(reference, tol) and _is_toeplitz(value, tol)):
                raise Reject(f"{too_large}, and {what} is not a function of t - s", Stage.VALUES)
            for side, extended in zip(_sides(_by_diagonal(reference)), _sides(_by_diagonal(value))):
                rate = _geometric_rate(side, tol)
                if rate is None:
                    raise Reject(f"{too_large}, and {what} is no geometric sequence on each side of the diagonal, "
                                 "so its values at other lengths cannot be predicted", Stage.VALUES)
                steps = torch.arange(extended.shape[-1], dtype=torch.float64, device=extended.device)
                predicted = side[..., :1] * rate[..., None] ** steps
                if not _close(extended, predicted, tol, scale=side.abs().max()):
                    raise Reject(f"at sequence length {length}, {what} is not the mask it is at the verified "
                                 "length continued: the mask changes with the length (a sliding window?)",
                                 Stage.VALUES)
        return None


def _position_numbers(order, ev: g.Evaluator) -> tuple[list[int], list[int]]:
    """The numbers that could be positions or lengths: those the region itself holds (an offset
    of ``tril``, a slice bound, what its symbolic sizes are computed with), and those its
    constant inputs (its masks) are computed from (a window, a mask buffer's length or values)."""
    classes = ev.classes
    sym_args = [a for n in order for a in n.all_input_nodes if classes.get(a) == g.SYM]
    const_args = [a for n in order for a in n.all_input_nodes if classes.get(a) == g.CONST]
    region = [c for n in order for c in g.literal_numbers(n, sizes=False)]
    region += _numbers(g.constant_ancestry(sym_args, classes), ev)
    return region, _numbers(g.constant_ancestry(const_args, classes), ev)


def _numbers(nodes, ev: g.Evaluator) -> list[int]:
    found = []
    for node in nodes:
        if node.op in ("placeholder", "get_attr"):
            if ev.classes.get(node) == g.CONST:
                found.extend(g.tensor_numbers(ev.const(node)))
        else:
            found.extend(g.literal_numbers(node))
    return found


def _close(value: torch.Tensor, reference: torch.Tensor, tol: float, scale=None) -> bool:
    """Equal within ``tol`` of ``scale`` (the reference's largest magnitude), and finite."""
    if not bool(torch.isfinite(value).all()):
        return False
    scale = reference.abs().max() if scale is None else scale
    return bool((value - reference).abs().max() <= tol * max(float(scale), 1e-300)) if value.numel() else True


def _by_diagonal(m: torch.Tensor) -> torch.Tensor:
    """A ``[..., N, N]`` tensor's first row and column as one vector, at index t - s + N - 1 the
    value on diagonal t - s (from -(N - 1) to N - 1)."""
    return torch.cat([m[..., 0, 1:].flip(-1), m[..., :, 0]], dim=-1)


def _is_toeplitz(m: torch.Tensor, tol: float) -> bool:
    n = m.shape[-1]
    i = torch.arange(n, device=m.device)
    return _close(m, _by_diagonal(m)[..., i[:, None] - i[None, :] + n - 1], tol)


def _sides(diagonals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``_by_diagonal``: the values at t - s = 0, 1, 2, ... and at t - s = -1, -2, ..."""
    n = (diagonals.shape[-1] + 1) // 2
    return diagonals[..., n - 1:], diagonals[..., : n - 1].flip(-1)


def _geometric_rate(side: torch.Tensor, tol: float) -> Optional[torch.Tensor]:
    """Per leading index the rate r with ``side[..., d] == side[..., 0] * r**d`` (from the first
    and the last value not vanishingly small, so rounding spreads thin), or None where there is none."""
    if side.shape[-1] < 2:
        return None
    first = side[..., :1]
    ratios = torch.where(first != 0, side / torch.where(first != 0, first, 1), 0)
    if bool((ratios < 0).any()) or bool(((first == 0) & (side != 0)).any()):
        return None
    steps = torch.arange(side.shape[-1], dtype=torch.float64, device=side.device)
    last = torch.where(ratios > 1e-30, steps, 0).amax(-1)  # the last step not vanishingly small
    chosen = ratios.gather(-1, last.long()[..., None])[..., 0]
    rate = torch.where(last > 0, chosen ** (1 / last.clamp(min=1)), 0)
    if not _close(side, first * rate[..., None] ** steps, tol, scale=side.abs().max()):
        return None
    return rate
