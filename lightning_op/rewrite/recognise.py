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
3. **Values.** Probing with one-hot q, k, v reads off ``o_t = c * lam_h^(t-s) [t >= s]`` directly:
   the scale ``c`` and each head's decay ``lam_h``. Random q, k, v then check
   ``o == c * ((Q K^T) * M) V``. The region is a polynomial in q, k and v, so agreement on random
   inputs means identity (Schwartz-Zippel), up to the rounding of the model's own constant masks,
   which sets the tolerance.
4. **Lengths.** That identity holds at the length probed. A graph with a symbolic length runs at
   every length in its range, and its masks are functions of the length: a sliding window is
   causal attention up to its window and something else past it. So the region is probed again
   at a few small lengths, at the lower end of the range, and past every number its computation
   holds (a window, a mask buffer's length; or at the range's upper end where that is lower);
   where the whole region is too large to evaluate there, its masks alone must be the verified
   ones continued (see ``_check_lengths``).

Anything else (softmax, a bias, a non-causal or non-decay mask, a learnable decay) fails one of
these steps and is left alone, with the reason.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from .. import reference
from ..support import MAX_HEAD_DIM, MIN_HEAD_DIM
from . import graph as g
from .report import logger

_OP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# relative tolerance of the probes, by the least precise floating constant feeding the region
_TOLERANCE = {torch.float64: 1e-7, torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
_MAX_REGION_NODES = 20000
_MAX_ROLE_PROBES = 48
_ALT_LENGTHS = (37, 5, 130)  # further sequence lengths probed when N is symbolic
# Probing evaluates the region (O(N^2) for the parallel form) a few dozen times in float64:
# symbolic sizes above _PROBE_SIZE are probed at _PROBE_SIZE, and a static region whose largest
# tensor passes _MAX_PROBE_ELEMENTS on its device is left alone (with the advice to trace it with a
# dynamic length). On 2 CPU cores 2**25 elements took 25 s to verify; 2**22 takes about 3 s.
_PROBE_SIZE = 96
_MAX_PROBE_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}  # float64 probes: 512 MB a tensor on GPU
# Past that size a symbolic length's masks may still be checked alone at a long length (no
# products: a few passes over each mask), up to this many elements in one of their tensors.
_MAX_MASK_ELEMENTS = {"cpu": 1 << 25, "cuda": 1 << 28}


def _probe_bindings(gm: fx.GraphModule) -> dict:
    """Small values for the large size symbols of a dynamic graph (within each symbol's range)."""
    shape_env = g.shape_env_of(gm.graph)
    bindings = {}
    for sym, hint in g._backed_values(shape_env).items():
        if int(hint) > _PROBE_SIZE:
            bounds = shape_env.var_to_range.get(sym) if hasattr(shape_env, "var_to_range") else None
            low = _finite_int(bounds.lower, 2) if bounds is not None else 2
            bindings[sym] = max(_PROBE_SIZE, low)
    return bindings


class Reject(Exception):
    """The candidate is not causal linear attention with a decay (the message says why).

    ``depth`` says how far the checks got: when several readings of a region fail (which input
    is q, k or v; which axis is the sequence), the deepest failure is the one worth reporting.
    """

    def __init__(self, message: str, depth: int = 1):
        super().__init__(message)
        self.depth = depth


@dataclass
class Match:
    output: fx.Node
    inputs: tuple[fx.Node, fx.Node, fx.Node]  # q, k, v
    layouts: tuple[str, str, str]  # "bhnd", "bnhd" or "gnd" for q, k, v
    out_layout: str
    decay: Optional[tuple[float, ...]]  # per head, None when every lam is 1
    scale: float
    form: str  # "parallel", "cumsum" or "chunked"
    compute_dtype: torch.dtype
    region: list[fx.Node] = field(repr=False)


@dataclass
class Rejection:
    output: fx.Node
    region: frozenset = field(repr=False)
    reason: str = ""
    depth: int = 1


# ----------------------------------------------------------------------------- layouts


def _to_canonical(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2) if layout == "bnhd" else x.unsqueeze(0) if layout == "gnd" else x


def _from_canonical(x: torch.Tensor, layout: str) -> torch.Tensor:
    y = x.transpose(1, 2) if layout == "bnhd" else x[0] if layout == "gnd" else x
    return y.contiguous()


def _key(s):
    return s.node.expr if isinstance(s, torch.SymInt) else s


@dataclass(frozen=True)
class _Hypothesis:
    """How the output's dims map to batch, heads and sequence."""

    out_layout: str
    batch: object
    heads: object
    length: object
    value_dim: object

    def layout_of(self, shape) -> list[str]:
        keys = tuple(_key(s) for s in shape)
        if self.out_layout == "gnd":
            return ["gnd"] if len(keys) == 3 and keys[:2] == (self.heads, self.length) else []
        if len(keys) != 4:
            return []
        found = []
        if keys[:3] == (self.batch, self.heads, self.length):
            found.append("bhnd")
        if keys[:3] == (self.batch, self.length, self.heads):
            found.append("bnhd")
        return found


def _hypotheses(o: fx.Node) -> list[_Hypothesis]:
    shape = [_key(s) for s in g.tensor_val(o).shape]
    if len(shape) == 4:
        b, x, y, d = shape
        return [_Hypothesis("bhnd", b, x, y, d), _Hypothesis("bnhd", b, y, x, d)]
    if len(shape) == 3:
        return [_Hypothesis("gnd", 1, shape[0], shape[1], shape[2])]
    return []


# ----------------------------------------------------------------------------- recogniser


class Recogniser:
    def __init__(self, gm: fx.GraphModule, classes: dict, const_values: dict, written: set):
        self.gm, self.classes, self.const_values = gm, classes, const_values
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
                                 "a learnable decay is not supported by lightning::attn", depth=5)
                if not g.is_linear(arg, self.classes):
                    raise Reject(f"the output depends on {arg.name} ({_describe(arg)}) besides q, k and v")
                stack.append(arg)
        return sorted(region, key=self.position.__getitem__)

    # --- probing helpers

    def _random(self, node: fx.Node, gen: torch.Generator, ev: g.Evaluator) -> torch.Tensor:
        val = g.tensor_val(node)
        shape = ev.shape(node)
        if val.is_floating_point():
            return torch.randn(shape, generator=gen, dtype=torch.float64).to(val.device)
        return torch.ones(shape, dtype=val.dtype, device=val.device)

    def _roles(self, output, order, leaves) -> list[fx.Node]:
        """The earliest nodes that feed exactly one factor of the (trilinear) output."""
        gen = torch.Generator().manual_seed(1234)
        leaf_env = {leaf: self._random(leaf, gen, self.evaluator) for leaf in leaves if g.tensor_val(leaf) is not None}
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

    def _descend(self, root: fx.Node, hyp: _Hypothesis, region: set) -> Optional[tuple[fx.Node, str]]:
        """Follow the single-consumer chain from a role's first node towards its product, to a
        tensor in a known layout: the first of the chain's last run of such tensors. Usually
        that is the first one (so that a scale applied after it is recovered); past a head slice
        and its repetition (a key/value head shared by query heads, as ``repeat_kv`` does with
        ``expand``) it is the repeated tensor, which is what the product sees."""
        node, found, in_run = root, None, False
        while True:
            val = g.tensor_val(node)
            layouts = hyp.layout_of(val.shape) if val is not None else []
            if layouts and not in_run:
                found = (node, layouts[0])
            in_run = bool(layouts)
            users = [u for u in node.users if u in region]
            if len(users) != 1 or g.is_product(users[0], self.classes):
                return found
            node = users[0]

    # --- the analysis of one candidate

    def analyse(self, output: fx.Node) -> Optional[Match]:
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
                raise Reject(f"{written[0].name} ({_describe(written[0])}) is written in place (a mask filled "
                             "row by row, say), which the probes cannot follow, and the graph could not be "
                             "functionalized", depth=6)
            return self._analyse(output, order, leaves)
        except Exception as error:  # a Reject, or an internal error: both belong to this region
            error.region = frozenset(order)
            raise

    def _analyse(self, output, order, leaves) -> Optional[Match]:
        largest = max((math.prod(self.evaluator.shape(n)) for n in order if g.tensor_val(n) is not None), default=0)
        if largest > _MAX_PROBE_ELEMENTS.get(g.tensor_val(output).device.type, _MAX_PROBE_ELEMENTS["cpu"]):
            raise Reject(
                f"too large to verify by probing at these static sizes ({largest} elements in one tensor); "
                "trace with a dynamic sequence length (torch.compile(dynamic=True), or an export Dim) "
                "so the region is verified at small lengths"
            )
        roots = self._roles(output, order, leaves)
        region = set(order)
        first: Optional[Reject] = None
        for hyp in _hypotheses(output):
            inputs, layouts = [], {}
            for root in roots:
                if self.classes.get(root) == g.PARAM:
                    continue  # a weight (x W: the role is the product) or a learnable mask (`between` says so)
                found_input = self._descend(root, hyp, region | set(leaves))
                if found_input is None:
                    inputs = None
                    break
                node, layout = found_input
                if node not in layouts:
                    inputs.append(node)
                    layouts[node] = layout
            if not inputs or len(inputs) != 3 or output in inputs:
                continue
            for q, k, v in _assignments(inputs, hyp, self.position):
                try:
                    return self._verify(output, (q, k, v), tuple(layouts[x] for x in (q, k, v)), hyp)
                except Reject as reject:
                    if first is None or reject.depth > first.depth:
                        first = reject
        if first is not None:
            raise first
        logger.debug("rewrite: %s is not trilinear in three [B, H, N, D]-like inputs (%d candidate inputs)",
                     output.name, len(roots))
        return None

    def _verify(self, output, inputs, layouts, hyp: _Hypothesis) -> Match:
        for node in inputs:
            if self.classes.get(node) != g.INPUT:
                raise Reject(f"{node.name} does not depend on the model's inputs (a learnable decay?)", depth=5)
        order = self.between(set(inputs), output)
        q, k, v = (g.tensor_val(x) for x in inputs)
        if len({q.dtype, k.dtype, v.dtype}) != 1 or q.dtype not in _OP_DTYPES:
            raise Reject(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: lightning::attn takes one of fp16, bf16, fp32",
                         depth=5)
        out_dtype = g.tensor_val(output).dtype
        if out_dtype not in _OP_DTYPES:
            raise Reject(f"output dtype {out_dtype} is not supported by lightning::attn", depth=5)
        compute_dtype = torch.float32 if out_dtype == torch.float32 else q.dtype
        dims = [q.shape[-1], k.shape[-1], v.shape[-1]]
        if any(isinstance(d, torch.SymInt) for d in dims):
            raise Reject("symbolic head dims", depth=5)
        if not all(MIN_HEAD_DIM <= d <= MAX_HEAD_DIM for d in dims):
            raise Reject(f"head dims {dims[0]} (q, k), {dims[2]} (v) are outside lightning::attn's "
                         f"{MIN_HEAD_DIM}..{MAX_HEAD_DIM}", depth=5)
        if q.device.type not in ("cpu", "cuda"):
            raise Reject(f"device {q.device} is not supported", depth=5)
        dtypes = g.const_dtypes(order, self.classes)
        tol = max((_TOLERANCE[d] for d in dtypes), default=_TOLERANCE[torch.float64])

        ev = self.evaluator
        scale, lam = self._extract(output, inputs, layouts, hyp, order, ev, tol)
        decay64 = None if bool((lam == 1).all()) else (-torch.log(lam)).to(torch.float32).to(torch.float64)
        self._check_random(output, inputs, layouts, hyp, order, ev, scale, decay64, tol, seed=0)
        self._check_random(output, inputs, layouts, hyp, order, ev, scale, decay64, tol, seed=1)
        self._check_lengths(output, inputs, layouts, hyp, order, scale, decay64, tol)

        names = {g.op_name(n) for n in order}
        products = sum(1 for n in order if g.is_product(n, self.classes))
        form = "cumsum" if "cumsum" in names else "chunked" if "cat" in names and products > 2 else "parallel"
        decay = None if decay64 is None else tuple(float(x) for x in decay64)
        return Match(output, tuple(inputs), tuple(layouts), hyp.out_layout, decay, float(scale), form,
                     compute_dtype, order)

    def _evaluate(self, output, inputs, layouts, hyp, order, ev, qc, kc, vc) -> torch.Tensor:
        env = {node: _from_canonical(x, layout) for node, x, layout in zip(inputs, (qc, kc, vc), layouts)}
        out = ev.run(order, env)[output]
        return _to_canonical(out, hyp.out_layout)

    def _canonical_shapes(self, inputs, layouts, ev):
        shapes = []
        for node, layout in zip(inputs, layouts):
            s = ev.shape(node)
            shapes.append((1, *s) if layout == "gnd" else (s[0], s[2], s[1], s[3]) if layout == "bnhd" else s)
        return shapes

    def _extract(self, output, inputs, layouts, hyp, order, ev, tol):
        """One-hot probes: returns (scale c, lam per head) with o_t = c lam^(t-s) for t >= s."""
        (b, h, n, dk), _, (_, _, _, dv) = self._canonical_shapes(inputs, layouts, ev)
        if n < 2:
            raise Reject("sequence length 1: the decay cannot be read off")
        device = g.tensor_val(inputs[0]).device

        def column(s):
            qc = torch.zeros(b, h, n, dk, dtype=torch.float64, device=device)
            qc[..., 0] = 1
            kc = torch.zeros(b, h, n, dk, dtype=torch.float64, device=device)
            kc[:, :, s, 0] = 1
            vc = torch.zeros(b, h, n, dv, dtype=torch.float64, device=device)
            vc[:, :, s, 0] = 1
            out = self._evaluate(output, inputs, layouts, hyp, order, ev, qc, kc, vc)
            if tuple(out.shape) != (b, h, n, dv):
                raise Reject(f"output shape {tuple(out.shape)} does not match q, k, v", depth=0)
            if out[..., 1:].abs().max() > 1e-9 * out[..., 0].abs().max().clamp(min=1e-300):
                raise Reject("the output mixes value channels", depth=0)
            return out[..., 0].cpu()  # [B, H, N]

        first = column(0)
        c = first[:, :, 0]
        if bool((c == 0).any()):
            raise Reject("zero weight on the diagonal: not a causal decay mask")
        if (c - c[:1]).abs().max() > tol * c.abs().max():
            raise Reject("the mask differs between batch entries")
        c = c[0]  # [H]
        if (c - c.mean()).abs().max() > tol * c.abs().max():
            raise Reject(f"the scale differs between heads ({c.tolist()[:4]}...)")
        ratio = first[0] / c[:, None]  # lam^t, [H, N]
        t = torch.arange(n, dtype=torch.float64)
        lams = []
        for head in range(h):
            r = ratio[head]
            valid = (t >= 1) & (r > 1e-4) & torch.isfinite(r)
            if not bool(valid.any()):
                raise Reject("decay too strong to read off (lam ~ 0)")
            log_lam = float((t[valid] * torch.log(r[valid])).sum() / (t[valid] ** 2).sum())
            lams.append(math.exp(log_lam))
        lam = torch.tensor(lams, dtype=torch.float64)
        if bool((lam > 1 + tol).any()):
            raise Reject(f"growing weights (lam = {lam.max().item():.6g} > 1): not a decay", depth=2)
        lam = lam.clamp(max=1.0)
        lam = torch.where((1 - lam).abs() <= 1e-12, torch.ones_like(lam), lam)
        expected = lam[:, None] ** t
        if (ratio - expected).abs().max() > tol:
            raise Reject("the weights along the sequence are not c * lam^(t-s): not a decay mask", depth=2)
        s = n // 2
        if s >= 1:
            col = column(s)[0] / c[:, None]
            if col[:, :s].abs().max() > 1e-9:
                raise Reject("non-causal: a position attends to later positions", depth=3)
            if (col[:, s:] - lam[:, None] ** t[: n - s]).abs().max() > tol:
                raise Reject("the mask is not a function of t - s times [t >= s]: not a decay mask", depth=3)
        return float(c.mean()), lam

    def _check_random(self, output, inputs, layouts, hyp, order, ev, scale, decay64, tol, seed):
        shapes = self._canonical_shapes(inputs, layouts, ev)
        gen = torch.Generator().manual_seed(seed)
        device = g.tensor_val(inputs[0]).device
        qc, kc, vc = (torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in shapes)
        got = self._evaluate(output, inputs, layouts, hyp, order, ev, qc, kc, vc)
        # the chunked form in float64: O(N) memory, so long static lengths can be checked too
        want, _ = reference.attention_forward_chunked(qc, kc, vc, None if decay64 is None else decay64.to(device), scale)
        err = ((got - want).norm() / want.norm()).item()
        if not err <= tol:
            raise Reject(f"output differs from c * ((Q K^T) * M) V on random inputs (relative error {err:.3g})",
                         depth=4)

    # --- the other lengths a symbolic sequence length can take

    def _check_lengths(self, output, inputs, layouts, hyp, order, scale, decay64, tol):
        """Probe the region at the lengths a symbolic N can take beyond the one verified: a few
        small ones, the lower end of N's range, and one past every number the region and its masks
        are computed from (at 2 c + 2 for the largest such c, or at the upper end of N's range
        where that is lower). A mask is a function of N, so agreement at a few small lengths says
        nothing of a sliding window of 38 or 64 tokens, or of a window inside a mask buffer: past
        every number its computation holds, such a window shows. A length at which the graph
        cannot run (a buffer sliced past its end) proves nothing and is passed over; a static
        graph runs at its one length, where the region was probed at full size."""
        symbols = getattr(hyp.length, "free_symbols", set())
        if not symbols:
            return
        low, high = self._length_range(symbols)

        def clamp(length: int) -> int:
            return max(low, length if high is None else min(length, high))

        verified = {self._canonical_shapes(inputs, layouts, self.evaluator)[0][2]}

        def probe(length: int) -> Optional[Exception]:
            """None when the region agrees at ``length``; the error when it cannot run there."""
            ev = self._evaluator_at(symbols, length)
            try:
                self._check_random(output, inputs, layouts, hyp, order, ev, scale, decay64, tol, seed=2)
            except Reject as reject:
                raise Reject(f"at sequence length {length}, {reject}: what the region computes changes with the "
                             "length (a sliding window?)", depth=reject.depth) from None
            except Exception as error:  # this length may be invalid for the model (a buffer too short)
                return error
            verified.add(length)
            return None

        errors = [probe(n) for n in sorted({clamp(alt) for alt in _ALT_LENGTHS} | {low}) if n not in verified]
        if errors and all(error is not None for error in errors):
            raise Reject(f"could not check a second sequence length: {errors[-1]}", depth=4)

        region_numbers, mask_numbers = self._position_numbers(order)
        largest = max(region_numbers + mask_numbers, default=0)
        far = clamp(2 * largest + 2)
        if far <= max(verified):
            return
        device = g.tensor_val(output).device.type
        limit = _MAX_PROBE_ELEMENTS.get(device, _MAX_PROBE_ELEMENTS["cpu"])
        # where the graph cannot run at `far`, the longest length it can run at past the others
        fallbacks = sorted({clamp(c) for c in region_numbers + mask_numbers if max(verified) < clamp(c) < far},
                           reverse=True)
        error: Optional[Exception] = None
        for length in [far, *fallbacks[:3]]:
            elements = self._largest_at(order, symbols, length)
            if elements <= limit:
                error = probe(length)
            else:  # too large to probe whole: the region past its own numbers, its masks alone here
                region_far = clamp(2 * max(region_numbers, default=0) + 2)
                if region_far > max(verified):
                    if self._largest_at(order, symbols, region_far) > limit or probe(region_far) is not None:
                        raise Reject(f"to prove the mask for every sequence length the region must be probed at "
                                     f"length {region_far}, past the numbers it holds (up to "
                                     f"{max(region_numbers)}), where it is too large to evaluate or cannot run",
                                     depth=4)
                error = self._check_masks(order, symbols, length, largest, elements, tol)
            if error is None:
                return
        raise Reject(f"could not evaluate the region at a sequence length past the numbers its computation holds "
                     f"(up to {largest}, at {far}), so its mask is not proven for every length: {error}", depth=4)

    def _length_range(self, symbols) -> tuple[int, Optional[int]]:
        """The range the sequence length's symbols share (at least 2; None: no upper end)."""
        low, high = 2, None
        shape_env = self.evaluator.shape_env
        ranges = getattr(shape_env, "var_to_range", {}) if shape_env is not None else {}
        for sym in symbols:
            bounds = ranges.get(sym)
            if bounds is None:
                continue
            low = max(low, _finite_int(bounds.lower, 2))
            upper = _finite_int(bounds.upper, None)
            if upper is not None:
                high = upper if high is None else min(high, upper)
        return low, high

    def _evaluator_at(self, symbols, length: int) -> g.Evaluator:
        bindings = dict(self.evaluator.bindings)
        bindings.update({sym: length for sym in symbols})
        return g.Evaluator(self.gm, self.classes, self.const_values, bindings)

    def _largest_at(self, nodes, symbols, length: int) -> float:
        """Elements in the largest tensor among ``nodes`` with the length at ``length``."""
        ev = self._evaluator_at(symbols, length)
        try:
            return max((math.prod(ev.shape(n)) for n in nodes if g.tensor_val(n) is not None), default=0)
        except Exception:  # a size that cannot be evaluated: not affordable to find out
            return math.inf

    def _position_numbers(self, order) -> tuple[list[int], list[int]]:
        """The numbers that could be positions or lengths: those the region itself holds (an offset
        of ``tril``, a slice bound, what its symbolic sizes are computed with), and those its
        constant inputs (its masks) are computed from (a window, a mask buffer's length or values)."""
        sym_args = [a for n in order for a in n.all_input_nodes if self.classes.get(a) == g.SYM]
        const_args = [a for n in order for a in n.all_input_nodes if self.classes.get(a) == g.CONST]
        region = [c for n in order for c in g.literal_numbers(n, sizes=False)]
        region += self._numbers(g.constant_ancestry(sym_args, self.classes))
        return region, self._numbers(g.constant_ancestry(const_args, self.classes))

    def _numbers(self, nodes) -> list[int]:
        found = []
        for node in nodes:
            if node.op in ("placeholder", "get_attr"):
                if self.classes.get(node) == g.CONST:
                    found.extend(g.tensor_numbers(self.evaluator.const(node)))
            else:
                found.extend(g.literal_numbers(node))
        return found

    def _check_masks(self, order, symbols, length, largest, elements, tol) -> Optional[Exception]:
        """The region's constant inputs at ``length`` against their values at the verified length,
        for a region too large to probe whole there (``elements`` in its largest tensor). Each one
        that grows with the sequence must be a ``[..., N, N]`` function of ``t - s`` (a Toeplitz
        matrix, as every mask of a causal decay is) which, on each side of the diagonal, continues
        the geometric sequence it is at the verified length; every other one must keep its values.
        Returns the error where the graph cannot run at ``length`` (a mask buffer sliced past its
        end comes out short); raises Reject otherwise."""
        too_large = (f"to prove the mask for every sequence length the region must be probed at length {length}, "
                     f"past the numbers its computation holds (up to {largest}: a window? a mask buffer's length?), "
                     f"where it is too large to evaluate ({elements} elements in one tensor)")
        masks = list(dict.fromkeys(a for n in order for a in n.all_input_nodes if self.classes.get(a) == g.CONST
                                   and g.tensor_val(a) is not None))
        ev = self._evaluator_at(symbols, length)
        device = g.tensor_val(order[-1]).device.type
        limit = _MAX_MASK_ELEMENTS.get(device, _MAX_MASK_ELEMENTS["cpu"])
        ancestry = g.constant_ancestry(masks, self.classes)
        if self._largest_at(ancestry, symbols, length) > limit:
            raise Reject(f"{too_large}, and so are its masks", depth=4)
        for node in masks:
            try:
                known, shape, value = self.evaluator.shape(node), ev.shape(node), ev.const(node)
            except Exception as error:  # the graph cannot run at this length
                return error
            if tuple(value.shape) != shape:
                return RuntimeError(f"{node.name} is {tuple(value.shape)} at length {length}, not {shape}")
            verified = self.evaluator.const(node)
            reference = verified.to(torch.float64)
            value = value.to(torch.float64)
            if shape == known:
                if not _close(value, reference, tol):
                    raise Reject(f"{too_large}, and {node.name}'s values change with the length", depth=4)
                continue
            square = len(shape) >= 2 and shape[-1] == shape[-2] and known[-1] == known[-2]
            if not square or shape[:-2] != known[:-2]:
                raise Reject(f"{too_large}, and {node.name} ({_describe(node)}, {list(shape)}) grows with the "
                             "length other than as an [N, N] mask that could be checked alone", depth=4)
            if not (_is_toeplitz(reference, tol) and _is_toeplitz(value, tol)):
                raise Reject(f"{too_large}, and {node.name} ({_describe(node)}) is not a function of t - s", depth=4)
            for side, extended in zip(_sides(_by_diagonal(reference)), _sides(_by_diagonal(value))):
                rate = _geometric_rate(side, tol)
                if rate is None:
                    raise Reject(f"{too_large}, and {node.name} ({_describe(node)}) is no geometric sequence on "
                                 "each side of the diagonal, so its values at other lengths cannot be predicted",
                                 depth=4)
                steps = torch.arange(extended.shape[-1], dtype=torch.float64, device=extended.device)
                predicted = side[..., :1] * rate[..., None] ** steps
                if not _close(extended, predicted, tol, scale=side.abs().max()):
                    raise Reject(f"at sequence length {length}, {node.name} ({_describe(node)}) is not the mask it "
                                 "is at the verified length continued: the mask changes with the length (a sliding "
                                 "window?)", depth=4)
        return None


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


def _finite_int(bound, default: int) -> int:
    try:
        return int(bound)
    except Exception:  # an infinite bound
        return default


def _assignments(inputs, hyp, position):
    """(q, k, v) orders to try: v's last dim is the output's, q's and k's agree; graph order first."""
    ordered = sorted(inputs, key=position.__getitem__)
    for q, k, v in itertools.permutations(ordered):
        sq, sk, sv = (g.tensor_val(x).shape for x in (q, k, v))
        if _key(sv[-1]) == hyp.value_dim and _key(sq[-1]) == _key(sk[-1]):
            yield q, k, v


def _scaled(x, factor):
    if isinstance(x, (list, tuple)):
        return type(x)(_scaled(y, factor) for y in x)
    return x * factor if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _describe(node: fx.Node) -> str:
    name = g.op_name(node)
    if name is not None:
        return name
    return str(node.target) if node.op == "call_function" else node.op


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
            rejections.append(Rejection(node, getattr(reject, "region", frozenset()), str(reject), reject.depth))
            continue
        except Exception as error:  # a bug here must not cost the user their compile
            logger.warning("rewrite: skipped a candidate at %s after an internal error: %r", node.name, error,
                           exc_info=True)
            rejections.append(Rejection(node, getattr(error, "region", frozenset()), f"internal error: {error!r}", 9))
            continue
        if match is None:
            continue
        done.update(match.region)
        on_match(match)
    # One reason per attention: overlapping regions are readings of the same one (its output,
    # or a transpose of it); the deepest failure tells why. A region around a rewritten one
    # (its output plus a bias, say) is no news.
    kept: list[Rejection] = []
    for rejection in sorted(rejections, key=lambda r: (-r.depth, len(r.region))):
        if rejection.region & done or any(rejection.region & k.region for k in kept):
            continue
        kept.append(rejection)
    return kept
