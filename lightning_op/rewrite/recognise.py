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
   between them and ``o`` must depend on nothing else, but for a state carried in (a leaf shaped
   like one, at zero while roles are found: the output is affine in it).
3. **Checks.** Each reading of the region as q, k, v (and state) in their layouts is a
   :class:`~.candidate.Candidate`, checked apart from this matching (``checks.py``): does
   lightning::attn take its dtypes and head dims (``lightning_op.support``), do one-hot probes
   read off ``o_t = c_h * lam_h^(t-s) [t >= s]`` (and the state's ``A_h lam_h^(t+1)``), do random
   inputs give what the op will compute, at the length traced and at the others a symbolic length
   can take (``lengths.py``).
4. **States out.** Tensors shaped like a state, computed linearly from k and v alone and used
   beyond the region, are checked against the op's final state (:meth:`Recogniser._final_states`).

Anything else (softmax, a bias, a non-causal or non-decay mask, a learnable or data-dependent decay)
fails one of these steps and is left alone, with the reason in the model's terms.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from . import graph as g
from .candidate import (PROBE_SIZE, Candidate, Reading, Reject, Stage, probe_limit, readings, size_key,
                        state_layouts)
from .checks import Match, check_final_state, check_repeat, tolerance, verify
from .packing import Packing, check_packed, find_packings, packing_of, reclassify
from .report import logger

_MAX_REGION_NODES = 20000
_MAX_ROLE_PROBES = 64
_MAX_CARRIED_STATES = 3  # leaves tried as a state carried in, one at a time
_MAX_FINAL_STATES = 4  # states returned beside one output that are checked against the op's final state
_MAX_REPEAT_CHAIN = 8  # ops walked back from k or v looking for the tensor before a repetition of its heads
# Ops that only move or copy the elements of their one data argument: what repeats kv heads
# (repeat_interleave; unsqueeze, expand and reshape as Llama's repeat_kv; an index_select of heads).
_ELEMENT_MOVES = g.VIEW_OPS | g.CAST_OPS | {"repeat_interleave", "index_select"}
_OTHER_LENGTH = 37  # a second length at which a symbolic repetition is checked
_MAX_DECAY_SOURCES = 4  # tensors of one number per head tried as a learnable decay passed live


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
        # a mask per packed sequence is a constant here, all true (one sequence); packing.py proves the rest
        self.packings, self.unproven_packings = find_packings(gm, classes)
        self.classes = classes = reclassify(classes, self.packings)
        self.position = {n: i for i, n in enumerate(gm.graph.nodes)}
        overrides = {p.same: p.all_true for p in self.packings.values()}
        self.evaluator = g.Evaluator(gm, classes, const_values, _probe_bindings(gm), overrides=overrides)
        self.written = written  # g.written_in_place of the graph

    # --- regions

    def is_candidate(self, node: fx.Node) -> bool:
        val = g.tensor_val(node)
        return (
            val is not None and val.is_floating_point() and val.dim() in (3, 4)
            and self.classes.get(node) == g.INPUT and g.is_linear(node, self.classes)
            and not _filled_further(node)
        )

    def region(self, output: fx.Node):
        """(nodes in graph order, leaves) of the linear region ending at ``output``; None if too big.
        What a replacement emitted (no class: the op's output, laid out as the model had it) is a
        leaf: already attention, and probed as one value."""
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
                if cls is not None and g.is_linear(arg, self.classes):
                    stack.append(arg)
                else:
                    leaves.add(arg)
        return sorted(region, key=self.position.__getitem__), sorted(leaves, key=self.position.__getitem__)

    def between(self, inputs, output: fx.Node, decay_source: Optional[fx.Node] = None) -> list[fx.Node]:
        """The nodes computing ``output`` from ``inputs`` and constants; rejects any other dependency.
        With a ``decay_source`` (one of ``inputs``), what is computed from it and constants alone (a
        mask built from a learnable decay) belongs to the region, whatever its ops."""
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
                if cls == g.PARAM and decay_source is not None and arg.op != "placeholder":
                    stack.append(arg)  # a function of the decay source, or it reaches another parameter
                    continue
                if cls == g.PARAM and not g.is_linear(arg, self.classes):
                    beyond = f"q, k, v and the decay {decay_source.name}" if decay_source is not None else "q, k, v"
                    raise Reject(f"the attention depends on trainable parameters beyond {beyond} ({arg.name}): "
                                 "lightning::attn takes a learnable decay, one number per head, but no other "
                                 "learnable weight or mask", Stage.SUPPORT)
                if not g.is_linear(arg, self.classes):
                    self._refuse_unproven_packing([arg])
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

    def _carried_states(self, output, leaves) -> tuple[list[fx.Node], list[fx.Node]]:
        """The leaves that could be a state the model carries in: tensors of the model's data shaped
        [B, H, x, y] ([G, x, y] beside a [G, N, D] output) with neither x nor y the sequence length;
        and, apart, those shaped [B, H, N, N] at a static length N that equals the head dims (where
        q, k or v look the same). The output is affine in such a state, not trilinear, so roles are
        found with it at zero and the checks then read off its weight (``checks.read_off_state``)."""
        clear, alike = [], []
        for leaf in leaves:
            val = g.tensor_val(leaf)
            if val is None or not val.is_floating_point() or self.classes.get(leaf) != g.INPUT:
                continue
            keys = tuple(size_key(s) for s in val.shape)
            for reading in readings(output):
                if not reading.plausible():
                    continue
                lead = (reading.heads,) if reading.out_layout == "gnd" else (reading.batch, reading.heads)
                rest = keys[len(lead):]
                if keys[:len(lead)] != lead or len(rest) != 2:
                    continue
                if reading.length not in rest:
                    clear.append(leaf)
                elif isinstance(reading.length, int) and rest == (reading.length, reading.length):
                    alike.append(leaf)
                break
        return clear[:_MAX_CARRIED_STATES], alike[:_MAX_CARRIED_STATES]

    def _roles(self, output, order, leaves, carried: Optional[fx.Node] = None) -> list[fx.Node]:
        """The earliest nodes that feed exactly one factor of the (trilinear) output, with the
        state carried in (if any) at zero."""
        gen = torch.Generator().manual_seed(1234)
        leaf_env = {leaf: self._random(leaf, gen) for leaf in leaves if g.tensor_val(leaf) is not None}
        if carried is not None:
            leaf_env[carried] = torch.zeros_like(leaf_env[carried])
        base = self.evaluator.run(order, dict(leaf_env))
        f0 = base[output]
        if not isinstance(f0, torch.Tensor) or f0.norm() == 0:
            return []  # a constant zero (a state before the first token): no attention
        if not torch.isfinite(f0).all():
            first = next(n for n in order if isinstance(base[n], torch.Tensor) and base[n].is_floating_point()
                         and not torch.isfinite(base[n]).all())
            raise Reject(f"the output is not finite on random inputs (from {first.name}, {g.describe(first)})")
        in_region = set(order) | set(leaves)
        roots, queue, seen, probes = [], [l for l in leaves if l in leaf_env and leaf_env[l].is_floating_point()], set(), 0
        while queue:
            node = queue.pop(0)
            if node in seen:
                continue
            seen.add(node)
            probes += 1
            if probes > _MAX_ROLE_PROBES:
                self._factors_beside(output, roots, in_region, leaves)  # a gate per token: many factors
                raise Reject(f"q, k and v not found among the first {_MAX_ROLE_PROBES} nodes probed (the output is a "
                             "product of many factors)")
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
        region = set(order) | set(leaves)
        latest: Optional[tuple[Reject, Reading]] = None
        clear, alike = self._carried_states(output, leaves)
        for carried in [*clear, *alike, None]:  # a q, k or v taken for a state zeroes the output: cheap
            roots = self._roles(output, order, leaves, carried)
            for reading in readings(output):
                layouts = self._inputs(output, roots, reading, region)
                if layouts is None:
                    continue
                for inputs in _assignments(layouts, reading, self.position):
                    try:
                        candidates = self._candidates(output, inputs, tuple(layouts[x] for x in inputs), reading,
                                                      carried)
                        for candidate in candidates:
                            try:
                                match = verify(candidate, self.evaluator)
                                if candidate.packing is not None:
                                    check_packed(candidate, match, self.evaluator)
                            except Reject:
                                if candidate is candidates[-1]:
                                    raise
                                continue
                            self._final_states(candidate, match)
                            self._ungroup(candidate, match)
                            return match
                    except Reject as reject:
                        # of readings failing at the same stage, the first plausible one tells most
                        if latest is None or (reject.stage, reading.plausible()) > (latest[0].stage,
                                                                                    latest[1].plausible()):
                            latest = (reject, reading)
            if latest is not None:
                break  # the region has q, k and v with this state (or none): what they fail at is the news
        if latest is not None:
            reject, reading = latest
            raise Reject(f"{reject} ({reading.describe()})", reject.stage)
        self._factors_beside(output, roots, region, leaves)
        logger.debug("rewrite: %s is not trilinear in three [B, H, N, D]-like inputs (%d candidate inputs)",
                     output.name, len(roots))
        return None

    def _candidates(self, output, inputs, layouts, reading: Reading, carried: Optional[fx.Node]) -> list[Candidate]:
        """The candidates of one assignment of q, k and v: with the state carried in read in each
        layout its shape allows (or without one). Raises Reject when there is none."""
        for node in inputs:
            if self.classes.get(node) != g.INPUT:
                raise Reject(f"{node.name} does not depend on the model's inputs (a learnable decay?)", Stage.SUPPORT)
        state_options: list[Optional[str]] = [None]
        sources = set(inputs)
        if carried is not None:
            q, _, v = (g.tensor_val(x) for x in inputs)
            state_options = state_layouts(g.tensor_val(carried).shape, reading, size_key(q.shape[-1]),
                                          size_key(v.shape[-1]))
            if not state_options:
                raise Reject(f"the output depends on {carried.name} ({g.describe(carried)}, "
                             f"{list(g.tensor_val(carried).shape)}) besides q, k and v, and it is shaped like no "
                             "state of theirs")
            sources.add(carried)
        try:
            regions = [(self.between(sources, output), None)]
        except Reject as reject:
            if reject.stage != Stage.SUPPORT:
                raise
            regions = self._live_decay_regions(sources, output, reading, reject)
        candidates = []
        for region, source in regions:
            tol = tolerance(region, self.classes, None if source is None else g.tensor_val(source).dtype)
            packing = packing_of(region, self.packings)
            candidates.extend(Candidate(output, inputs, layouts, reading, region, tol, carried, layout, source, packing)
                              for layout in state_options)
        return candidates

    def _live_decay_regions(self, sources: set, output: fx.Node, reading: Reading,
                            refused: Reject) -> list[tuple[list[fx.Node], fx.Node]]:
        """(region, decay source) pairs where the attention's dependence on trainable parameters
        goes through one tensor of one number per head (``softplus(p)``, ``log_p.exp()``,
        ``sigmoid(p)``, viewed as [H, 1, 1] or not): a decay the op can take live. Nearest to the
        output first, each one whose region reaches no parameter but through it; whether its
        values are the decay is for the checks. Re-raises ``refused`` where there is none."""
        heads = reading.heads
        if not isinstance(heads, int):
            raise refused
        parameters, stack, seen = [], [output], set()
        while stack:  # the parameter-dependent nodes the region reads, and what they are computed from
            node = stack.pop()
            for arg in node.all_input_nodes:
                if arg in seen or arg in sources or self.classes.get(arg) not in (g.INPUT, g.PARAM):
                    continue
                seen.add(arg)
                if self.classes.get(arg) == g.PARAM:
                    parameters.append(arg)
                stack.append(arg)
        options = [n for n in sorted(parameters, key=self.position.__getitem__, reverse=True)
                   if _one_per_head(g.tensor_val(n), heads)]
        found = []
        for source in options[:_MAX_DECAY_SOURCES]:
            try:
                found.append((self.between(sources | {source}, output, decay_source=source), source))
            except Reject as reject:
                refused = reject
        if not found:
            raise refused
        return found

    def _factors_beside(self, output, roots, region: set, leaves) -> None:
        """Reject, saying why, where the output is a product of q, k and v with further factors of
        the model's data (roots that are no q, k or v, or else the region's other leaves): weights
        between positions or along the sequence computed from the inputs as q, k and v are (a decay
        or gate that depends on the data), or given as inputs of the graph (a mask passed to the
        model, or computed before a graph break)."""
        for reading in readings(output):
            if not reading.plausible():
                continue
            qkv, extra = [], []
            for root in roots:
                if self.classes.get(root) != g.INPUT:
                    continue
                found = self._descend(root, reading, region)
                if found is not None and found[0] is output:
                    continue  # past where the factors meet: no factor
                shape = [size_key(s) for s in g.tensor_val(root).shape]
                # a mask ([..., N, N]), or a factor broadcast over the features (a gate, a step size)
                if shape.count(reading.length) >= 2 or found is None or g.tensor_val(found[0]).shape[-1] == 1:
                    extra.append(root)
                else:
                    qkv.append(root)
            if not extra:  # q, k, v and what they are computed from (x for v = x W + b) are no news
                behind = _ancestors(qkv, region)
                extra = [leaf for leaf in leaves if leaf not in behind and self.classes.get(leaf) == g.INPUT
                         and g.tensor_val(leaf) is not None and g.tensor_val(leaf).is_floating_point()]
            if len(qkv) != 3 or not extra:
                continue
            self._refuse_unproven_packing(extra)
            described = ", ".join(f"{n.name} ({g.describe(n)}, {list(g.tensor_val(n).shape)})" for n in extra[:3])
            described += f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            extra_sources = _sources(extra, self.classes)
            if extra_sources & _sources(qkv, self.classes):
                raise Reject(f"besides q, k and v the output is a product with {described}, computed from the model's "
                             "inputs as q, k and v are (a decay or gate that depends on the data): lightning::attn "
                             "takes a fixed decay per head", Stage.SUPPORT)
            names = ", ".join(n.name for n in sorted(extra_sources, key=self.position.__getitem__))
            raise Reject(f"besides q, k and v the output is a product with {described}, which comes from inputs of "
                         f"this graph ({names}), so its values are unknown where the graph is rewritten: a mask "
                         "passed to the model, or one computed before a graph break (at Tensor.item() under "
                         "torch.compile; compiling with `from lightning_op.rewrite import compile`, or with "
                         "fullgraph=True, keeps it in the graph)")

    def _refuse_unproven_packing(self, nodes) -> None:
        """Reject, saying why, where ``nodes`` are computed from a comparison of sequence ids that
        is no proven packing (``packing.find_packings``)."""
        if not self.unproven_packings:
            return
        behind = _ancestors(nodes, set(self.position))
        for same, reason in self.unproven_packings.items():
            if same in behind:
                raise Reject(f"the output is masked per packed sequence ({same.name}), and {reason}", Stage.PACKED)

    # --- final states

    def _descendants(self, node: fx.Node) -> set[fx.Node]:
        """The nodes computed from ``node`` through linear ops."""
        found, stack = set(), [node]
        while stack:
            for user in stack.pop().users:
                if user not in found and self.classes.get(user) == g.INPUT and g.is_linear(user, self.classes):
                    found.add(user)
                    stack.append(user)
        return found

    def _final_states(self, cand: Candidate, match: Match) -> None:
        """Find the states the model returns beside ``match``'s output (computed from k and v, and the
        state carried in, alone), and keep in ``match`` those that are the op's final state times a
        weight per head; each other state-shaped one gets a note saying why it keeps its computation."""
        if cand.packing is not None:
            return  # a state summed over the sequences of a packed batch is none of the op's states
        q, k, v = cand.inputs
        region = set(cand.region)
        sources = {k, v} | ({cand.state_in} if cand.state_in is not None else set())
        key_dim, value_dim = (size_key(g.tensor_val(x).shape[-1]) for x in (q, v))
        shaped = {}
        for node in (self._descendants(k) & self._descendants(v)) - self._descendants(q):
            val = g.tensor_val(node)
            layouts = state_layouts(val.shape, cand.reading, key_dim, value_dim) if val is not None else []
            if layouts:
                shaped[node] = layouts
        # the outermost: a state whose value is used beyond the region and beyond other such states (a
        # transpose of it); a use for its shape alone (zeros_like) is no use of its value
        outermost = [n for n in shaped if any(u not in region and u not in shaped and g.op_name(u) not in
                                              g.SHAPE_ONLY_OPS for u in n.users)]
        start = max(self.position[x] for x in (*cand.inputs, *sources))
        claimed: set[fx.Node] = set()
        for node in sorted(outermost, key=self.position.__getitem__, reverse=True)[:_MAX_FINAL_STATES]:
            if node in claimed:
                continue
            try:
                state_region = self.between(sources, node)
            except Reject as reject:
                logger.debug("rewrite: %s is no state of %s: %s", node.name, cand.output.name, reject)
                continue
            if min(self.position[u] for u in node.users) <= start:
                match.notes.append(f"{node.name} keeps its computation: it is used before q, k and v are all computed")
                continue
            reasons = []
            for layout in shaped[node]:
                try:
                    final = check_final_state(cand, self.evaluator, match.fit, node, layout, state_region,
                                              max(cand.tolerance, tolerance(state_region, self.classes)))
                except Exception as error:  # a Reject, or a region that cannot run on the probes
                    reasons.append(str(error) if isinstance(error, Reject) else f"it could not be checked ({error!r})")
                    continue
                match.final_states.append(final)
                claimed.update(state_region)
                break
            else:
                if any(u.op == "output" for u in node.users):  # returned beside the output: worth a note
                    match.notes.append(f"{node.name} ({g.describe(node)}, {list(g.tensor_val(node).shape)}) keeps "
                                       f"its computation: {reasons[-1]}")
                logger.debug("rewrite: %s is no final state of %s: %s", node.name, cand.output.name, reasons[-1])


    # --- grouped heads

    def _ungroup(self, cand: Candidate, match: Match) -> None:
        """Where k and v are both repetitions of fewer heads in the op's grouping (query head h reads
        kv head ``h // (H / Hkv)``: ``repeat_interleave``, Llama's ``repeat_kv``), give the op the
        tensors before the repetition, so the repeat leaves the graph once nothing else reads it.
        Where the decay is the same in every head of a group and no state enters or leaves, it is
        passed per kv head, so each group shares one state. The op computes the same either way
        (``reference.attention_quadratic`` repeats k and v): only the repetition is checked here.
        A repetition of another order (``.repeat``, which tiles: head h reads h mod Hkv) is not
        the op's grouping and stays in the graph, feeding the op H heads."""
        if cand.reading.out_layout == "gnd":
            return
        found = [self._repeated_from(node, layout, cand) for node, layout in zip(cand.inputs[1:], cand.layouts[1:])]
        if any(f is None for f in found) or found[0][2] != found[1][2]:
            return
        (k, k_layout, kv_heads), (v, v_layout, _) = found
        heads = len(match.fit.weights)
        groups = heads // kv_heads
        decay, tol = match.decay, cand.tolerance
        per_group = decay is None or all(abs(decay[h] - decay[h - h % groups]) <= tol * max(decay) for h in
                                         range(heads))
        match.inputs = (match.inputs[0], k, v)
        match.layouts = (match.layouts[0], k_layout, v_layout)
        match.kv_heads = kv_heads
        # a decay passed live has one number per query head: each keeps its state
        match.shared_states = (per_group and match.state_in is None and not match.final_states
                               and match.decay_source is None)

    def _repeated_from(self, node: fx.Node, layout: str, cand: Candidate) -> Optional[tuple[fx.Node, str, int]]:
        """(source, its layout, its heads Hkv) where ``node`` is ``source`` with each of its heads
        repeated H / Hkv times in a row, computed through ops that only move elements; None else.
        The nearest such source is taken (a slice of heads before the repeat stays the op's input)."""
        val = g.tensor_val(node)
        heads = size_key(val.shape[1 if layout == "bhnd" else 2])
        if not isinstance(heads, int):
            return None
        evaluators = [self.evaluator, *self._other_lengths(cand)]
        chain, current = [node], node
        for _ in range(_MAX_REPEAT_CHAIN):
            data = [a for a in current.all_input_nodes if self.classes.get(a) not in (g.CONST, g.SYM)]
            if g.op_name(current) not in _ELEMENT_MOVES or len(data) != 1 or current.args[0] is not data[0]:
                return None
            source = data[0]
            order = sorted(chain, key=self.position.__getitem__)
            for source_layout, kv_heads in _grouped_layouts(g.tensor_val(source), val, layout, heads):
                try:
                    if all(check_repeat(ev, order, source, source_layout, node, layout, heads // kv_heads)
                           for ev in evaluators):
                        return source, source_layout, kv_heads
                except Exception as error:  # a chain that cannot run on the probe: no proof, so no grouping
                    logger.debug("rewrite: %s could not be checked as a repetition: %r", node.name, error)
            chain.append(source)
            current = source
        return None

    def _other_lengths(self, cand: Candidate) -> list[g.Evaluator]:
        """An evaluator at a second sequence length where the length is symbolic."""
        symbols = getattr(cand.reading.length, "free_symbols", set())
        if not symbols:
            return []
        low, high = 2, None
        for sym in symbols:
            sym_low, sym_high = g.symbol_range(self.evaluator.shape_env, sym)
            low = max(low, sym_low)
            high = sym_high if high is None or sym_high is None else min(high, sym_high)
        length = max(low, _OTHER_LENGTH if high is None else min(_OTHER_LENGTH, high))
        return [self.evaluator.rebound({sym: length for sym in symbols})]


def _one_per_head(val: Optional[torch.Tensor], heads: int) -> bool:
    """A floating tensor holding one number per head along one axis ([H], [H, 1, 1], [1, H, 1, 1])."""
    if val is None or not val.is_floating_point():
        return False
    sizes = [size_key(s) for s in val.shape]
    return heads in sizes and all(s == 1 for i, s in enumerate(sizes) if i != sizes.index(heads))


def _grouped_layouts(source: Optional[torch.Tensor], target: torch.Tensor, layout: str, heads: int):
    """(layout, Hkv) readings of ``source`` as ``target`` ([B, H, N, D] or [B, N, H, D] in ``layout``)
    with fewer heads Hkv dividing H, the other dims equal."""
    if source is None or source.dim() != 4:
        return []
    keys = [size_key(s) for s in source.shape]
    b, n, d = (size_key(target.shape[i]) for i in ((0, 2, 3) if layout == "bhnd" else (0, 1, 3)))
    found = []
    for source_layout, (sb, sh, sn, sd) in (("bhnd", keys), ("bnhd", (keys[0], keys[2], keys[1], keys[3]))):
        if (sb, sn, sd) == (b, n, d) and isinstance(sh, int) and 0 < sh < heads and heads % sh == 0:
            found.append((source_layout, sh))
    return found


def _assignments(inputs, reading: Reading, position):
    """(q, k, v) orders to try: v's last dim is the output's, q's and k's agree; graph order first."""
    ordered = sorted(inputs, key=position.__getitem__)
    for q, k, v in itertools.permutations(ordered):
        sq, sk, sv = (g.tensor_val(x).shape for x in (q, k, v))
        if size_key(sv[-1]) == reading.value_dim and size_key(sq[-1]) == size_key(sk[-1]):
            yield q, k, v


# Writes into a part of a tensor, functionalized: the result is the tensor with the part written.
_SCATTERS = frozenset({"select_scatter", "slice_scatter", "diagonal_scatter", "as_strided_scatter"})


def _filled_further(node: fx.Node) -> bool:
    """Whether ``node`` is a tensor being filled part by part (an output written row by row) whose
    every use writes another part into it (``select_scatter(node, ...)``, or a view of the part
    that ``copy`` overwrites, or none): not a result yet, only the last version is."""

    def fills(use):
        if g.op_name(use) in _SCATTERS:
            return use.args[0] is node
        return g.op_name(use) in g.VIEW_OPS and all(g.op_name(u) == "copy" and u.args[0] is use for u in use.users)

    return bool(node.users) and all(fills(u) for u in node.users)


def _ancestors(nodes, within: set) -> set[fx.Node]:
    """``nodes`` and the nodes of ``within`` they are computed from."""
    found, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack.extend(a for a in node.all_input_nodes if a in within)
    return found


def _sources(nodes, classes: dict) -> set[fx.Node]:
    """The graph inputs of the model's data (placeholders of class input) that ``nodes`` are computed from."""
    found, seen, stack = set(), set(), list(nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder" and classes.get(node) == g.INPUT:
            found.add(node)
        stack.extend(node.all_input_nodes)
    return found


def _scaled(x, factor):
    if isinstance(x, (list, tuple)):
        return type(x)(_scaled(y, factor) for y in x)
    return x * factor if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def find_matches(gm: fx.GraphModule, classes: dict, const_values: dict, on_match, written: set):
    """Scan ``gm`` from its end for attention regions; ``on_match(match)`` rewrites each at once
    (so later candidates see the rewritten graph, its dead nodes gone). ``written``:
    ``graph.written_in_place(gm.graph)``. Returns the rejections worth reporting; a candidate
    around a rewritten one that got as far as the probes (a state carried in that is not the op's)
    becomes a note of that match."""
    recogniser = Recogniser(gm, classes, const_values, written)
    rejections: list[Rejection] = []
    matches: list[Match] = []
    done: set[fx.Node] = set()
    alive = set(gm.graph.nodes)
    for node in reversed(list(gm.graph.nodes)):
        if node in done or node not in alive or not recogniser.is_candidate(node):
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
        for final in match.final_states:
            done.update(final.region)
        matches.append(match)
        on_match(match)
        gm.graph.eliminate_dead_code()  # what the replacement left unused is no candidate
        alive = set(gm.graph.nodes)
        recogniser.position = {n: i for i, n in enumerate(gm.graph.nodes)}  # the replacement's nodes too
    # One reason per attention: overlapping regions are readings of the same one (its output,
    # or a transpose of it); the latest stage tells why. A region around a rewritten one
    # (its output plus a bias, say) is no news, unless it failed the probes themselves.
    kept: list[Rejection] = []
    for rejection in sorted(rejections, key=lambda r: (-r.stage, len(r.region))):
        if rejection.region & done:
            if Stage.MATCH < rejection.stage < Stage.INTERNAL:  # internal errors are logged as warnings
                around = next(m for m in matches if rejection.region & set(m.region)
                              or any(rejection.region & set(f.region) for f in m.final_states))
                if not around.notes or not around.notes[-1].startswith("a larger region"):
                    around.notes.append(f"a larger region around it was left alone: {rejection.reason}")
            continue
        if any(rejection.region & k.region for k in kept):
            continue
        kept.append(rejection)
    return kept
