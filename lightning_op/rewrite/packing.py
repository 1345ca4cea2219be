"""Packed batches: a mask that keeps each sequence of a packed row to itself, proven and rewritten
to ``cu_seqlens``.

A packed batch holds several sequences back to back in one row; attention over it is masked per
sequence: position t reads position s only where both lie in the same sequence. Models build that
mask from sequence ids, ``ids[:, None] == ids[None, :]``, and the ids from the sequences'
boundaries: ``torch.searchsorted(cu_seqlens, positions, right=True)`` (or ``torch.bucketize``).
The boundaries are data, not constants, so the probes cannot read the mask off. What is proven
instead, for every value the boundaries can take:

1. **The ids are runs.** ``searchsorted(X, arange(N), right=r)`` counts the boundaries below each
   position, so for a sorted ``X`` (what ``searchsorted`` requires; its result is undefined
   otherwise) the ids are non-decreasing and a new run starts exactly at the positions in
   ``clamp(X + (0 if r else 1), 0, N)``. Those are the op's ``cu_seqlens`` once 0 and N are added
   at the ends (a boundary outside the row, or a repeated one, is an empty sequence). This is read
   from the graph's structure, op by op (:func:`find_packings`): only integer casts and shifts by
   a constant may come between the ids and ``eq``, which they leave unchanged.
2. **The mask is the dense mask times the packing, entry by entry.** Every op between ``eq`` and
   the attention is elementwise on the trailing ``[N, N]`` positions, and the attention reads them
   at one place, P: so P's entry (t, s) is a function of ``same[t, s]`` alone. Probes with ``same``
   random and its complement show that function is ``same * P_dense`` (:func:`check_packing`).
3. **The attention is linear in P.** With P replaced by ``W * P_dense`` for a random real W, the
   output is ``c ((Q K^T) * M * W) V`` (Schwartz-Zippel in W and the inputs), so in particular for
   every 0/1 block pattern W.

For everything else the packing mask is a constant, all true (one sequence): the recogniser finds
and checks the dense attention as usual, at every length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

from . import graph as g
from .candidate import Candidate, Reject, Stage, _to_canonical, size_key
from .checks import Fit, Match, _random_inputs, masked_expected
from .lengths import check_lengths

_INTEGER_DTYPES = (torch.int32, torch.int64)
# ops that keep each element at its place (broadcasting right-aligned): between ``eq`` and the attention
_POINTWISE = frozenset({
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "logical_xor",
    "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor", "__and__", "__or__", "__invert__", "__xor__",
    "where", "masked_fill", "mul", "div", "add", "sub", "rsub", "neg", "exp", "exp2", "pow", "abs", "clamp",
    "clamp_min", "clamp_max", "minimum", "maximum", "sqrt", "rsqrt", "reciprocal", "log", "sigmoid",
    "scalar_tensor",
})
# views that keep the trailing [N, N] positions where they are: add or drop leading dims, broadcast them
_ALIGNED_VIEWS = frozenset({"unsqueeze", "squeeze", "view", "_unsafe_view", "reshape", "expand", "alias",
                            "clone", "contiguous", "detach", "lift_fresh_copy"})
_ID_VIEWS = frozenset({"unsqueeze", "view", "_unsafe_view", "reshape", "alias", "slice", "expand", "clone",
                       "contiguous", "detach"})
_APPLICATIONS = frozenset({"mul", "where", "masked_fill"})  # how the attention reads the mask


@dataclass(frozen=True)
class Packing:
    """A mask ``same[t, s] = ids[t] == ids[s]`` whose ids are runs starting at ``boundaries + shift``."""

    same: fx.Node  # the eq: [..., N, N] bool, leading dims 1
    ids: fx.Node
    boundaries: fx.Node  # X: 1-D integers, the graph's value
    shift: int  # 0 (searchsorted right=True / bucketize right=True) or 1 (right=False)
    mask: frozenset  # ``same`` and the nodes computed from it and constants alone

    def all_true(self, ev: g.Evaluator) -> torch.Tensor:
        """``same`` for one sequence: every position reads every other."""
        val = g.tensor_val(self.same)
        return torch.ones(ev.shape(self.same), dtype=torch.bool, device=val.device)


def _argument(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _through_aligned_views(node: fx.Node) -> tuple[fx.Node, int]:
    """The 1-D tensor ``node`` views as a column (-1) or a row (+1) of a trailing [N, N] comparison:
    ``ids[:, None]``, ``ids.unsqueeze(-1)``, ``ids.view(1, N)``; (None, 0) otherwise."""
    val = g.tensor_val(node)
    if val is None or val.dim() < 2 or any(size_key(s) != 1 for s in val.shape[:-2]):
        return None, 0
    rows, cols = (size_key(s) for s in val.shape[-2:])
    orientation = -1 if cols == 1 and rows != 1 else 1 if rows == 1 and cols != 1 else 0
    current = node
    for _ in range(8):  # through views of all of the ids (a full slice is one) to the ids themselves
        current_val = g.tensor_val(current)
        name = g.op_name(current)
        source = current.args[0] if name in _ID_VIEWS and current.args else None
        if not isinstance(source, fx.Node) or g.tensor_val(source) is None:
            break
        if name == "slice":
            dim = _argument(current, 1, "dim", 0)
            if size_key(g.tensor_val(source).shape[dim]) != size_key(current_val.shape[dim]):
                return None, 0  # a part of the ids, not all of them
        current = source
    val = g.tensor_val(current)
    return (current, orientation) if val is not None and val.dim() == 1 else (None, 0)


def _is_positions(node: fx.Node, length) -> bool:
    """``arange(N)`` (0, 1, ..., N - 1), N the sequence length, possibly cast to another integer type."""
    for _ in range(3):
        val = g.tensor_val(node)
        if val is None or val.dtype not in _INTEGER_DTYPES or val.dim() != 1 or size_key(val.shape[0]) != length:
            return False
        name = g.op_name(node)
        if name in g.CAST_OPS:
            node = node.args[0]
            continue
        if name != "arange":
            return False
        overload = node.target._overloadname
        if overload == "default":
            return True
        if overload in ("start", "start_step", "start_out"):
            start = node.args[0]
            step = _argument(node, 2, "step", 1) if overload == "start_step" else 1
            return start == 0 and step == 1
        return False
    return False


def _ids_source(ids: fx.Node, length) -> tuple[Optional[tuple[fx.Node, int]], str]:
    """((boundaries, shift), "") where ``ids`` is a ``searchsorted`` / ``bucketize`` of the positions
    into boundaries (through integer casts and constant shifts, which keep ids equal or apart as
    they were); (None, why not) otherwise."""
    node = ids
    for _ in range(6):
        val = g.tensor_val(node)
        if val is None or val.dtype not in _INTEGER_DTYPES:
            return None, f"{node.name} ({g.describe(node)}) is not an integer tensor"
        name = g.op_name(node)
        if name in g.CAST_OPS or name in ("clone", "alias", "contiguous", "detach"):
            node = node.args[0]
            continue
        if name in ("add", "sub") and isinstance(node.args[1], int) and _argument(node, 2, "alpha", 1) in (1, -1):
            node = node.args[0]
            continue
        if name == "searchsorted" and node.target._overloadname == "Tensor":
            boundaries, positions = node.args[0], node.args[1]
            side = _argument(node, 4, "side", None)
            right = side == "right" if side is not None else bool(_argument(node, 3, "right", False))
            if _argument(node, 5, "sorter", None) is not None:
                return None, f"{node.name} sorts its boundaries with a sorter"
        elif name == "bucketize" and node.target._overloadname == "Tensor":
            positions, boundaries = node.args[0], node.args[1]
            right = bool(_argument(node, 3, "right", False))
        else:
            break
        bval = g.tensor_val(boundaries)
        if not isinstance(boundaries, fx.Node) or bval is None or bval.dim() != 1 or bval.is_floating_point():
            return None, f"{node.name} looks positions up in boundaries that are not a 1-D integer tensor"
        if not isinstance(positions, fx.Node) or not _is_positions(positions, length):
            return None, f"{node.name} looks up other values than the positions 0, 1, ..., N - 1"
        return (boundaries, 0 if right else 1), ""
    return None, (f"the sequence ids {ids.name} ({g.describe(ids)}) are not computed from sequence boundaries in "
                  "the graph (torch.searchsorted or torch.bucketize of the positions): ids given as data may not "
                  "be runs ([0, 1, 0]), which no cu_seqlens describes")


def find_packings(gm: fx.GraphModule, classes: dict) -> tuple[dict[fx.Node, Packing], dict[fx.Node, str]]:
    """The packing masks of ``gm`` (each ``same`` node with its :class:`Packing`), and the
    comparisons of sequence ids that are no proven packing, with the reason."""
    found, refused = {}, {}
    for node in gm.graph.nodes:
        if g.op_name(node) != "eq" or node.target._overloadname != "Tensor" or classes.get(node) != g.INPUT:
            continue
        val = g.tensor_val(node)
        if val is None or val.dim() < 2 or not all(isinstance(a, fx.Node) for a in node.args[:2]):
            continue
        (a, side_a), (b, side_b) = (_through_aligned_views(x) for x in node.args[:2])
        if a is None or a is not b or side_a * side_b != -1:
            continue
        length = size_key(val.shape[-1])
        if size_key(val.shape[-2]) != length:
            continue
        source, reason = _ids_source(a, length)
        if source is None:
            refused[node] = reason
            continue
        boundaries, shift = source
        found[node] = Packing(node, a, boundaries, shift, _mask_nodes(gm, node, classes))
    return found, refused


def _mask_nodes(gm: fx.GraphModule, same: fx.Node, classes: dict) -> frozenset:
    """``same`` and the nodes computed from it and constants alone, in one pass in graph order."""
    mask, started = {same}, False
    for node in gm.graph.nodes:
        if node is same:
            started = True
            continue
        if not started or node.op != "call_function" or classes.get(node) != g.INPUT:
            continue
        inputs = node.all_input_nodes
        if any(a in mask for a in inputs) and all(a in mask or classes.get(a) in (g.CONST, g.SYM) for a in inputs):
            mask.add(node)
    return frozenset(mask)


def reclassify(classes: dict, packings: dict[fx.Node, Packing]) -> dict:
    """``classes`` with every packing's mask nodes constants: evaluated with ``same`` all true."""
    classes = dict(classes)
    for packing in packings.values():
        classes.update((node, g.CONST) for node in packing.mask)
    return classes


def packing_of(region: list[fx.Node], packings: dict[fx.Node, Packing]) -> Optional[Packing]:
    """The packing whose mask ``region`` reads; None for none; Reject for two."""
    used = {p for p in packings.values() if any(a in p.mask for n in region for a in n.all_input_nodes)}
    if len(used) > 1:
        raise Reject("the attention reads the masks of two packings", Stage.SUPPORT)
    return next(iter(used), None)


# ----------------------------------------------------------------------------- checks


def check_structure(cand: Candidate, packing: Packing) -> fx.Node:
    """The one node P where the attention reads the packing mask, after checking that every mask
    node on the way keeps the trailing [N, N] positions in place; Reject otherwise."""
    length = cand.reading.length
    if cand.reading.batch != 1:
        raise Reject(f"a mask per packed sequence over a batch of {cand.reading.batch} rows: lightning::attn takes "
                     "packed sequences in a batch of one (cu_seqlens over the rows of one batch entry)", Stage.SUPPORT)
    if cand.state_in is not None:
        raise Reject(f"a state carried into a packed batch ({cand.state_in.name}) reaches every sequence of it, "
                     "where lightning::attn starts each sequence from its own state", Stage.SUPPORT)
    readers = [n for n in cand.region if any(a in packing.mask for a in n.all_input_nodes)]
    if len(readers) != 1:
        names = ", ".join(n.name for n in readers)
        raise Reject(f"the attention reads the packing mask {packing.same.name} at {len(readers)} places ({names}), "
                     "not at one product with the scores", Stage.PACKED)
    (applied,) = readers
    used, stack = set(), [a for a in applied.all_input_nodes if a in packing.mask]
    while stack:  # the mask nodes the attention depends on
        node = stack.pop()
        if node in used:
            continue
        used.add(node)
        stack.extend(a for a in node.all_input_nodes if a in packing.mask)
    for node in sorted(used | {applied}, key=lambda n: n.name):
        name = g.op_name(node)
        val = g.tensor_val(node)
        trailing = tuple(size_key(s) for s in val.shape[-2:]) if val is not None and val.dim() >= 2 else ()
        if node is applied:
            ok = name in _APPLICATIONS and trailing == (length, length)
        elif node is packing.same:
            ok = True
        else:
            ok = (name in _POINTWISE or name in g.CAST_OPS or name in _ALIGNED_VIEWS) and trailing == (length, length)
            if ok and name in _ALIGNED_VIEWS:
                source = g.tensor_val(node.args[0])
                ok = source is not None and source.dim() >= 2 and tuple(
                    size_key(s) for s in source.shape[-2:]) == (length, length)
        if not ok:
            raise Reject(f"the packing mask {packing.same.name} reaches the attention through {node.name} "
                         f"({g.describe(node)}), which does not keep each position (t, s) in its place",
                         Stage.PACKED)
    return applied


def check_packed(cand: Candidate, match: Match, ev: g.Evaluator) -> None:
    """Prove ``match`` (its candidate verified with the packing mask all true) for every packing,
    at every length: :func:`check_structure`, then :func:`check_packing` at the verified length and
    the others; record the packing in the match. Reject otherwise."""
    packing = cand.packing
    applied = check_structure(cand, packing)
    check_packing(cand, packing, applied, ev, match.fit, seed=5)
    check_lengths(cand, ev, lambda at_length: check_packing(cand, packing, applied, at_length, match.fit, seed=6))
    match.packing = packing
    match.notes.append(f"packed sequences: cu_seqlens from {packing.boundaries.name} (the boundaries of the sequence "
                       f"ids {packing.ids.name})")


def check_packing(cand: Candidate, packing: Packing, applied: fx.Node, ev: g.Evaluator, fit: Fit, seed: int) -> None:
    """At ``ev``'s sizes: P with ``same`` random (and its complement) is ``same * P_dense``, and the
    output with P replaced by ``W * P_dense`` (W random) is ``c ((Q K^T) * M * W) V``."""
    gen = torch.Generator().manual_seed(seed)
    qc, kc, vc, _ = _random_inputs(cand, ev, seed)
    shape = ev.shape(packing.same)
    n = shape[-1]
    dense_env = cand.env(ev, qc, kc, vc)
    dense = ev.run(cand.region, dense_env)
    p_dense = dense[applied]
    pattern = torch.rand(shape, generator=gen) < 0.5
    for same in (pattern, ~pattern):
        at = ev.with_overrides({packing.same: same.to(g.tensor_val(packing.same).device)})
        got = at.run(cand.region, cand.env(at, qc, kc, vc))[applied]
        want = torch.where(same.to(p_dense.device), p_dense, torch.zeros((), dtype=p_dense.dtype, device=p_dense.device))
        if not torch.allclose(got, want, rtol=cand.tolerance, atol=cand.tolerance * float(p_dense.abs().max())):
            raise Reject(f"with the sequences of a packed batch apart, {applied.name} ({g.describe(applied)}) is not the "
                         f"one-sequence value where two positions share a sequence and 0 where they do not",
                         Stage.PACKED)
    weights = torch.rand(n, n, generator=gen, dtype=torch.float64).to(p_dense.device)
    env = cand.env(ev, qc, kc, vc)
    env[applied] = p_dense * weights
    out = ev.run(cand.region, env)[cand.output]
    got = _to_canonical(out, cand.reading.out_layout)
    want = masked_expected(cand, fit, qc, kc, vc, weights)
    err = ((got - want).norm() / want.norm()).item()
    if not err <= cand.tolerance:
        raise Reject(f"with the masked scores {applied.name} weighted per position pair, the output is not "
                     f"c ((Q K^T) * M * W) V (relative error {err:.3g}): it reads the scores elsewhere too, so a "
                     "packed batch's sequences would not be kept apart", Stage.PACKED)
