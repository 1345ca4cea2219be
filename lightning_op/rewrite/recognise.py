"""Finding causal linear attention with per-head decay in an ATen-level FX graph, by its values.

One recogniser covers every spelling (``@``/``matmul``/``bmm``/``einsum``, masks from ``tril``,
``where``, ``masked_fill``, buffers or slopes, the cumsum form, the chunked block loop of
lightning-attention checkpoints) because it never matches a pattern of ops. Instead:

1. **Region.** From a candidate output ``o``, walk back through ops that are linear in each of
   their non-constant arguments (views, casts, products, sums, concatenation, masking with a
   constant mask; see ``graph.is_linear``). The walk stops at constants (anything computable from
   sizes, buffers and literals, evaluated exactly like the model does) and at *leaves* (softmax,
   activations, projections: anything else).
2. **Roles.** Probing the region in float64 with random leaves, a node whose doubling doubles
   ``o`` feeds exactly one factor of the trilinear form. The earliest such nodes, taken forward to
   a ``[B, H, N, D]`` or ``[B, N, H, D]`` (or ``[G, N, D]``) tensor, are q, k and v; the region
   between them and ``o`` must depend on nothing else.
3. **Checks.** Each reading of the region as q, k, v in their layouts is a
   :class:`~.candidate.Candidate`, checked apart from this matching (``checks.py``): does
   lightning::attn take its dtypes and head dims (``lightning_op.support``), do one-hot probes
   read off ``o_t = c * lam_h^(t-s) [t >= s]``, do random q, k, v give ``c * ((Q K^T) * M) V``, at
   the length traced and at the others a symbolic length can take (``lengths.py``).

Anything else (softmax, a bias, a non-causal or non-decay mask, a learnable decay) fails one of
these steps and is left alone, with the reason.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from . import graph as g
from .candidate import PROBE_SIZE, Candidate, Reading, Reject, Stage, probe_limit, readings, size_key
from .checks import Match, tolerance, verify
from .report import logger

_MAX_REGION_NODES = 20000
_MAX_ROLE_PROBES = 48


@dataclass
class Rejection:
    output: fx.Node
    region: frozenset = field(repr=False)
    reason: str = ""
    stage: Stage = Stage.MATCH


def _probe_bindings(gm: fx.GraphModule) -> dict:
    """Small values for the large size symbols of a dynamic graph (within each symbol's range)."""
    shape_env = g.shape_env_of(gm.graph)
    bindings = {}
    for sym, hint in g.backed_values(shape_env).items():
        if int(hint) > PROBE_SIZE:
            low, _ = g.symbol_range(shape_env, sym)
            bindings[sym] = max(PROBE_SIZE, low)
    return bindings


class Recogniser:
    """The matching half: the linear regions of one graph, the nodes in them that play q, k and v,
    and the readings of each region as a :class:`Candidate`, which :func:`checks.verify` checks."""

    def __init__(self, gm: fx.GraphModule, classes: dict, const_values: dict, written: set):
        self.classes = classes
        self.position = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.evaluator = g.Evaluator(gm, classes, const_values, _probe_bindings(gm))
        self.written = written  # g.written_in_place of the graph

    # --- regions

    def is_candidate(self, node: fx.Node) -> bool:
        val = g.tensor_val(node)
        return (
            val is not None and val.is_floating_point() and val.dim() in (3, 4)
            and self.classes.get(node) == g.INPUT and g.is_linear(node, self.classes)
        )

    def region(self, output: fx.Node):
        """(nodes in graph order, leaves) of the linear region ending at ``output``; None if too big."""
        region, leaves, stack = set(), set(), [output]
        while stack:
            node = stack.pop()
            if node in region:
                continue
            region.add(node)
            if len(region) > _MAX_REGION_NODES:
                return None
            for arg in node.all_input_nodes:
                cls = self.classes.get(arg)
                if cls in (g.CONST, g.SYM):
                    continue
                if g.is_linear(arg, self.classes):
                    stack.append(arg)
                else:
                    leaves.add(arg)
        return sorted(region, key=self.position.__getitem__), sorted(leaves, key=self.position.__getitem__)

    def between(self, inputs, output: fx.Node) -> list[fx.Node]:
        """The nodes computing ``output`` from ``inputs`` and constants; rejects any other dependency."""
        region, stack = set(), [output]
        while stack:
            node = stack.pop()
            if node in region or node in inputs:
                continue
            region.add(node)
            for arg in node.all_input_nodes:
                cls = self.classes.get(arg)
                if arg in inputs or cls in (g.CONST, g.SYM):
                    continue
                if cls == g.PARAM and not g.is_linear(arg, self.classes):
                    raise Reject(f"the attention depends on trainable parameters beyond q, k, v ({arg.name}): "
                                 "a learnable decay is not supported by lightning::attn", Stage.SUPPORT)
                if not g.is_linear(arg, self.classes):
                    raise Reject(f"the output depends on {arg.name} ({g.describe(arg)}) besides q, k and v")
                stack.append(arg)
        return sorted(region, key=self.position.__getitem__)

    # --- roles

    def _random(self, node: fx.Node, gen: torch.Generator) -> torch.Tensor:
        val = g.tensor_val(node)
        shape = self.evaluator.shape(node)
        if val.is_floating_point():
            return torch.randn(shape, generator=gen, dtype=torch.float64).to(val.device)
        return torch.ones(shape, dtype=val.dtype, device=val.device)

    def _roles(self, output, order, leaves) -> list[fx.Node]:
        """The earliest nodes that feed exactly one factor of the (trilinear) output."""
        gen = torch.Generator().manual_seed(1234)
        leaf_env = {leaf: self._random(leaf, gen) for leaf in leaves if g.tensor_val(leaf) is not None}
        base = self.evaluator.run(order, dict(leaf_env))
        f0 = base[output]
        if not isinstance(f0, torch.Tensor) or f0.norm() == 0 or not torch.isfinite(f0).all():
            raise Reject("the output is zero or not finite on random inputs")
        in_region = set(order) | set(leaves)
        roots, queue, seen, probes = [], [l for l in leaves if l in leaf_env and leaf_env[l].is_floating_point()], set(), 0
        while queue:
            node = queue.pop(0)
            if node in seen:
                continue
            seen.add(node)
            probes += 1
            if probes > _MAX_ROLE_PROBES:
                raise Reject("too many candidate inputs")
            degree = self._degree(node, output, order, base, f0)
            if degree == 1:
                roots.append(node)
            elif degree != 0:
                queue.extend(u for u in sorted(node.users, key=self.position.__getitem__) if u in in_region)
        return roots

    def _degree(self, node, output, order, base, f0) -> Optional[int]:
        downstream, stack, region = set(), [node], set(order)
        while stack:  # leaves are independent inputs of the probe: only region nodes follow the change
            n = stack.pop()
            for u in n.users:
                if u in region and u not in downstream:
                    downstream.add(u)
                    stack.append(u)
        if output not in downstream and node is not output:
            return 0
        env = {n: v for n, v in base.items() if n not in downstream}
        env[node] = _scaled(base[node], 2.0)
        f1 = self.evaluator.run(order, env)[output]
        norm = f0.norm()
        for d in range(5):
            if (f1 - (2.0 ** d) * f0).norm() <= 1e-9 * (2.0 ** d) * norm:
                return d
        return None

    def _descend(self, root: fx.Node, reading: Reading, region: set) -> Optional[tuple[fx.Node, str]]:
        """Follow the single-consumer chain from a role's first node towards its product, to a
        tensor in a known layout: the first of the chain's last run of such tensors. Usually
        that is the first one (so that a scale applied after it is recovered); past a head slice
        and its repetition (a key/value head shared by query heads, as ``repeat_kv`` does with
        ``expand``) it is the repeated tensor, which is what the product sees."""
        node, found, in_run = root, None, False
        while True:
            val = g.tensor_val(node)
            layouts = reading.layout_of(val.shape) if val is not None else []
            if layouts and not in_run:
                found = (node, layouts[0])
            in_run = bool(layouts)
            users = [u for u in node.users if u in region]
            if len(users) != 1 or g.is_product(users[0], self.classes):
                return found
            node = users[0]

    def _inputs(self, output, roots, reading: Reading, region: set) -> Optional[dict[fx.Node, str]]:
        """The three tensors the roles reach in ``reading``'s layouts, each with its layout, in
        the order of the roles; None where a role reaches none or there are not three."""
        layouts: dict[fx.Node, str] = {}
        for root in roots:
            if self.classes.get(root) == g.PARAM:
                continue  # a weight (x W: the role is the product) or a learnable mask (`between` says so)
            found = self._descend(root, reading, region)
            if found is None:
                return None
            node, layout = found
            layouts.setdefault(node, layout)
        return layouts if len(layouts) == 3 and output not in layouts else None

    # --- candidates

    def analyse(self, output: fx.Node) -> Optional[Match]:
        """The attention ending at ``output``, verified; None where there is no candidate; Reject
        (the reason found at the latest stage) where every reading failed a check."""
        found = self.region(output)
        if found is None:
            return None
        order, leaves = found
        if sum(1 for n in order if g.is_product(n, self.classes)) < 2:
            return None  # attention multiplies activations at least twice (q k^T and then v)
        if not leaves:
            return None
        try:
            written = [n for n in (*order, *leaves) if n in self.written]
            if written:
                # the entry points analyse a functionalized graph where a graph writes in place,
                # so this is what is left where that could not be made
                raise Reject(f"{written[0].name} ({g.describe(written[0])}) is written in place (a mask filled "
                             "row by row, say), which the probes cannot follow, and the graph could not be "
                             "functionalized", Stage.IN_PLACE)
            return self._analyse(output, order, leaves)
        except Exception as error:  # a Reject, or an internal error: both belong to this region
            error.region = frozenset(order)
            raise

    def _analyse(self, output, order, leaves) -> Optional[Match]:
        largest = self.evaluator.largest(order)
        if largest > probe_limit(g.tensor_val(output).device):
            raise Reject(
                f"too large to verify by probing at these static sizes ({largest} elements in one tensor); "
                "trace with a dynamic sequence length (torch.compile(dynamic=True), or an export Dim) "
                "so the region is verified at small lengths"
            )
        roots = self._roles(output, order, leaves)
        region = set(order) | set(leaves)
        latest: Optional[Reject] = None
        for reading in readings(output):
            layouts = self._inputs(output, roots, reading, region)
            if layouts is None:
                continue
            for inputs in _assignments(layouts, reading, self.position):
                try:
                    candidate = self._candidate(output, inputs, tuple(layouts[x] for x in inputs), reading)
                    return verify(candidate, self.evaluator)
                except Reject as reject:
                    if latest is None or reject.stage > latest.stage:
                        latest = reject
        if latest is not None:
            raise latest
        logger.debug("rewrite: %s is not trilinear in three [B, H, N, D]-like inputs (%d candidate inputs)",
                     output.name, len(roots))
        return None

    def _candidate(self, output, inputs, layouts, reading: Reading) -> Candidate:
        for node in inputs:
            if self.classes.get(node) != g.INPUT:
                raise Reject(f"{node.name} does not depend on the model's inputs (a learnable decay?)", Stage.SUPPORT)
        region = self.between(set(inputs), output)
        return Candidate(output, inputs, layouts, reading, region, tolerance(region, self.classes))


def _assignments(inputs, reading: Reading, position):
    """(q, k, v) orders to try: v's last dim is the output's, q's and k's agree; graph order first."""
    ordered = sorted(inputs, key=position.__getitem__)
    for q, k, v in itertools.permutations(ordered):
        sq, sk, sv = (g.tensor_val(x).shape for x in (q, k, v))
        if size_key(sv[-1]) == reading.value_dim and size_key(sq[-1]) == size_key(sk[-1]):
            yield q, k, v


def _scaled(x, factor):
    if isinstance(x, (list, tuple)):
        return type(x)(_scaled(y, factor) for y in x)
    return x * factor if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def find_matches(gm: fx.GraphModule, classes: dict, const_values: dict, on_match, written: set):
    """Scan ``gm`` from its end for attention regions; ``on_match(match)`` rewrites each at once
    (so later candidates see the rewritten graph). ``written``: ``graph.written_in_place(gm.graph)``.
    Returns the rejections worth reporting."""
    recogniser = Recogniser(gm, classes, const_values, written)
    rejections: list[Rejection] = []
    done: set[fx.Node] = set()
    for node in reversed(list(gm.graph.nodes)):
        if node in done or not recogniser.is_candidate(node):
            continue
        try:
            match = recogniser.analyse(node)
        except Reject as reject:
            rejections.append(Rejection(node, getattr(reject, "region", frozenset()), str(reject), reject.stage))
            continue
        except Exception as error:  # a bug here must not cost the user their compile
            logger.warning("rewrite: skipped a candidate at %s after an internal error: %r", node.name, error,
                           exc_info=True)
            rejections.append(Rejection(node, getattr(error, "region", frozenset()), f"internal error: {error!r}",
                                        Stage.INTERNAL))
            continue
        if match is None:
            continue
        done.update(match.region)
        on_match(match)
    # One reason per attention: overlapping regions are readings of the same one (its output,
    # or a transpose of it); the latest stage tells why. A region around a rewritten one
    # (its output plus a bias, say) is no news.
    kept: list[Rejection] = []
    for rejection in sorted(rejections, key=lambda r: (-r.stage, len(r.region))):
        if rejection.region & done or any(rejection.region & k.region for k in kept):
            continue
        kept.append(rejection)
    return kept
