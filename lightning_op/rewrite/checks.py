"""The checks of one candidate, apart from finding it (``recognise.py``): whether lightning::attn
takes its inputs, and whether its values are causal linear attention with a decay.

:func:`verify` runs them in order, cheapest and most telling first:

1. **Support.** The dtypes, head dims and device, as :func:`lightning_op.support.unsupported`
   states them for the op itself (plus what a graph adds: one dtype for q, k and v, known head dims).
2. **Reading off.** Probing with one-hot q, k, v reads off ``o_t = c_h * lam_h^(t-s) [t >= s]``
   directly: each head's weight ``c_h`` and decay ``lam_h`` (:func:`read_off`); for a state
   carried in, its weight ``A_h`` in ``c_h ... + A_h lam_h^(t+1) q_t S`` (:func:`read_off_state`).
3. **Identity.** Random q, k, v (and state) then check ``o == c * ((Q K^T) * M) V`` (plus the state's
   term) (:func:`check_random`). The region is a polynomial in its inputs, so agreement on random
   inputs means identity (Schwartz-Zippel), up to the rounding of the model's own constant masks,
   which sets the candidate's tolerance.
4. **Lengths.** For a symbolic sequence length, the same at the other lengths it can take
   (``lengths.py``).

A state the model returns beside the output is checked the same way against the op's final state
(:func:`check_final_state`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from .. import reference
from ..support import unsupported
from . import graph as g
from .candidate import Candidate, Reject, Stage, state_to_canonical
from .lengths import check_lengths


# relative tolerance of the probes, by the least precise floating constant feeding the region
_TOLERANCE = {torch.float64: 1e-7, torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def tolerance(region: list[fx.Node], classes: dict, also: Optional[torch.dtype] = None) -> float:
    """The relative tolerance of the probes of ``region``: the rounding its constant masks carry
    (and ``also``'s: the dtype of a decay passed live, which the model builds its mask in)."""
    dtypes = g.const_dtypes(region, classes) | ({also} if also in _TOLERANCE else set())
    return max((_TOLERANCE[d] for d in dtypes), default=_TOLERANCE[torch.float64])


@dataclass(frozen=True)
class Fit:
    """What the one-hot probes read off, per head h: ``o_t = weights[h] lam_h^(t-s) (q_t . k_s) v_s``
    summed over s <= t and, for a state S carried in, ``+ state_weights[h] lam_h^(t+1) q_t S``."""

    weights: torch.Tensor  # float64 [H] on the CPU: a position's weight on itself, per head
    decay: Optional[torch.Tensor]  # float64 [H] on the CPU, rounded through float32 as the op takes it; None: no decay
    state_weights: Optional[torch.Tensor] = None  # float64 [H]: the carried state's weight; None: no state in

    def factors(self, tol: float) -> tuple[float, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """How the op computes it: ``(scale, q_factor, v_factor)`` for ``attn(q * q_factor[h], k,
        v * v_factor[h], decay, scale, initial_state)``, a factor None where it is 1. A weight
        common to every head is the op's scale; weights that differ by head stay in q (and where a
        carried state is weighted apart from the new tokens, the ratio goes into v)."""
        outer = self.weights if self.state_weights is None else self.state_weights
        if _uniform(outer, tol):
            scale, q_factor = float(outer.mean()), None
        else:
            scale, q_factor = 1.0, outer
        ratio = self.weights / outer
        v_factor = None if bool(((ratio - 1).abs() <= tol).all()) else ratio
        return scale, q_factor, v_factor

    def head_weights(self, tol: float) -> Optional[tuple[float, ...]]:
        """The weight per head where it differs between heads (for the report), else None."""
        return None if _uniform(self.weights, tol) else _floats(self.weights)


def _uniform(values: torch.Tensor, tol: float) -> bool:
    return bool((values - values.mean()).abs().max() <= tol * values.abs().max())


def _floats(x: Optional[torch.Tensor]) -> Optional[tuple[float, ...]]:
    return None if x is None else tuple(float(v) for v in x)


@dataclass
class FinalState:
    """A state the model returns beside the output, verified to be ``factor[h]`` times the op's
    final state (factor None: 1)."""

    node: fx.Node
    layout: str  # one of candidate.STATE_LAYOUTS
    factor: Optional[tuple[float, ...]]
    region: list[fx.Node] = field(repr=False)  # graph order: computed from k, v (and the state in) alone


@dataclass
class Match:
    """A verified candidate: what the replacement needs."""

    output: fx.Node
    inputs: tuple[fx.Node, fx.Node, fx.Node]  # q, k, v
    layouts: tuple[str, str, str]  # "bhnd", "bnhd" or "gnd" for q, k, v
    out_layout: str
    decay: Optional[tuple[float, ...]]  # per head, None when every lam is 1
    scale: float  # the op's scale
    form: str  # "parallel", "cumsum" or "chunked"
    compute_dtype: torch.dtype
    region: list[fx.Node] = field(repr=False)
    q_factor: Optional[tuple[float, ...]] = None  # per head, multiplies q (weights that differ by head)
    v_factor: Optional[tuple[float, ...]] = None  # per head, multiplies v (a carried state weighted apart)
    head_weights: Optional[tuple[float, ...]] = None  # per head where they differ, for the report
    state_in: Optional[fx.Node] = None  # the op's initial_state
    state_layout: Optional[str] = None
    final_states: list[FinalState] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # states left computed as they were, and why
    fit: Optional[Fit] = field(default=None, repr=False)
    decay_source: Optional[fx.Node] = None  # the decay passed live: computed from trainable parameters
    decay_form: Optional[str] = None  # "slope": the source is the decay; "lam": it is exp(-decay)
    kv_heads: Optional[int] = None  # k and v taken before their repetition: the op's grouped heads
    shared_states: bool = False  # grouped, and the decay passed per kv head (a group shares its state)
    packing: Optional[object] = None  # packing.Packing: the op's cu_seqlens come from its boundaries


def verify(cand: Candidate, ev: g.Evaluator) -> Match:
    """The candidate as a :class:`Match`, or :class:`Reject` saying which check it failed."""
    compute_dtype = check_support(cand)
    fit = read_off(cand, ev)
    if cand.state_in is not None:
        fit = read_off_state(cand, ev, fit)
    decay_form = None if cand.decay_source is None else live_decay_form(cand, ev, fit)
    check_random(cand, ev, fit, seed=0)
    check_random(cand, ev, fit, seed=1)
    check_lengths(cand, ev, lambda at_length: check_random(cand, at_length, fit, seed=2))
    if decay_form is not None:
        check_live_decay(cand, ev, fit, decay_form, seed=3)
        check_lengths(cand, ev, lambda at_length: check_live_decay(cand, at_length, fit, decay_form, seed=4))
    decay = None if fit.decay is None else tuple(float(x) for x in fit.decay)
    scale, q_factor, v_factor = fit.factors(cand.tolerance)
    return Match(cand.output, cand.inputs, cand.layouts, cand.reading.out_layout, decay, scale,
                 _form(cand, ev.classes), compute_dtype, cand.region, _floats(q_factor), _floats(v_factor),
                 fit.head_weights(cand.tolerance), cand.state_in, cand.state_layout, fit=fit,
                 decay_source=cand.decay_source, decay_form=decay_form)


def check_support(cand: Candidate) -> torch.dtype:
    """Whether lightning::attn takes the candidate's q, k, v and output (the op's own rule); returns
    the dtype the op should compute in."""
    q, k, v = (g.tensor_val(x) for x in cand.inputs)
    out_dtype = g.tensor_val(cand.output).dtype
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise Reject(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} differ: lightning::attn takes one dtype for "
                     "all three", Stage.SUPPORT)
    dims = (("q and k", q.shape[-1]), ("v", v.shape[-1]))
    for what, refused in (
        ("this dtype", unsupported(dtypes=(("q, k and v", q.dtype), ("the output", out_dtype)))),
        ("these head dims", unsupported(head_dims=dims)),
        ("this device", unsupported(device=q.device)),
    ):
        if refused is not None:
            raise Reject(f"lightning::attn does not take {what}: {refused.reason}", Stage.SUPPORT)
    if any(isinstance(size, torch.SymInt) for _, size in dims):
        raise Reject("symbolic head dims", Stage.SUPPORT)
    return torch.float32 if out_dtype == torch.float32 else q.dtype


def _numbers(values, limit: int = 6) -> str:
    """A few measured values, for a message."""
    values = [float(x) for x in values]
    shown = ", ".join(f"{x:.4g}" for x in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def read_off(cand: Candidate, ev: g.Evaluator) -> Fit:
    """One-hot probes: the weight c_h and lam_h per head with o_t = c_h lam_h^(t-s) for t >= s.
    Messages say what was measured in the model's terms: the weight a position t (the query)
    gives a position s (the key and value), in the heads and batch entries the candidate reads."""
    (b, h, n, dk), _, (_, _, _, dv) = cand.canonical_shapes(ev)
    if n < 2:
        raise Reject("sequence length 1: the decay cannot be read off")
    device, tol = cand.device, cand.tolerance

    def column(s):
        """The output when q is 1 in key channel 0 at every position and k and v are 1 in channel 0
        at position s alone: o_t[0] is the weight position t gives position s."""
        qc = torch.zeros(b, h, n, dk, dtype=torch.float64, device=device)
        qc[..., 0] = 1
        kc = torch.zeros(b, h, n, dk, dtype=torch.float64, device=device)
        kc[:, :, s, 0] = 1
        vc = torch.zeros(b, h, n, dv, dtype=torch.float64, device=device)
        vc[:, :, s, 0] = 1
        out = cand.run(ev, qc, kc, vc)
        if tuple(out.shape) != (b, h, n, dv):
            raise Reject(f"output shape {tuple(out.shape)} does not match q, k, v ([B, H, N, Dv] = "
                         f"{[b, h, n, dv]})", Stage.SHAPES)
        stray = out[..., 1:].abs()
        if stray.max() > 1e-9 * out[..., 0].abs().max().clamp(min=1e-300):
            head, at = divmod(int(stray.amax((0, 3)).argmax()), n)
            raise Reject(f"value channel 0 of position {s} reaches other channels of the output (head {head}, "
                         f"position {at}: {float(stray.max()):.4g}): the output mixes value channels", Stage.SHAPES)
        return out[..., 0].cpu()  # [B, H, N]

    first = column(0)
    c = first[:, :, 0]  # [B, H]: position 0's weight on itself
    if bool((c == 0).any()):
        batch, head = (int(i) for i in (c == 0).nonzero()[0])
        raise Reject(f"zero weight on the diagonal: position 0 gives itself weight 0 (head {head}, batch {batch}): "
                     "not a causal decay mask")
    if (c - c[:1]).abs().max() > tol * c.abs().max():
        head = int((c - c[:1]).abs().amax(0).argmax())
        raise Reject(f"a position's weight on itself differs between batch entries: {_numbers(c[:, head])} in "
                     f"head {head}")
    c = c[0]  # [H]
    ratio = first[0] / c[:, None]  # lam^t, [H, N]
    t = torch.arange(n, dtype=torch.float64)
    lams = []
    for head in range(h):
        r = ratio[head]
        valid = (t >= 1) & (r > 1e-4) & torch.isfinite(r)
        if not bool(valid.any()):
            raise Reject(f"in head {head} position 0 has weight {float(c[head]):.4g} on itself and "
                         f"{float(first[0, head, 1]):.4g} from the next position: decay too strong to read off "
                         "(lam ~ 0)")
        log_lam = float((t[valid] * torch.log(r[valid])).sum() / (t[valid] ** 2).sum())
        lams.append(math.exp(log_lam))
    lam = torch.tensor(lams, dtype=torch.float64)
    if bool((lam > 1 + tol).any()):
        head = int(lam.argmax())
        raise Reject(f"in head {head} position 0's weight grows along the sequence (lam = {float(lam[head]):.6g} > 1; "
                     f"given by t = 0, 1, ...: {_numbers(first[0, head])}): not a decay", Stage.DECAY)
    lam = lam.clamp(max=1.0)
    lam = torch.where((1 - lam).abs() <= 1e-12, torch.ones_like(lam), lam)
    expected = lam[:, None] ** t
    misfit = (ratio - expected).abs()
    if misfit.max() > tol:
        head, at = divmod(int(misfit.argmax()), n)
        raise Reject(f"in head {head} position t = {at} gives position 0 weight {float(first[0, head, at]):.4g}, where "
                     f"c * lam^t predicts {float(c[head] * expected[head, at]):.4g} (c = {float(c[head]):.4g}, lam = "
                     f"{float(lam[head]):.6g}; given by t = 0, 1, ...: {_numbers(first[0, head])}): not "
                     "c * lam^(t-s), not a decay mask", Stage.DECAY)
    s = n // 2
    if s >= 1:
        col = column(s)[0] / c[:, None]
        if col[:, :s].abs().max() > 1e-9:
            head, at = divmod(int(col[:, :s].abs().argmax()), s)
            raise Reject(f"position t = {at} gives the later position {s} weight {float(col[head, at] * c[head]):.4g} "
                         f"in head {head}: non-causal", Stage.CAUSAL)
        shifted = (col[:, s:] - lam[:, None] ** t[: n - s]).abs()
        if shifted.max() > tol:
            head, at = divmod(int(shifted.argmax()), n - s)
            raise Reject(f"in head {head} position t = {s + at} gives position {s} weight "
                         f"{float(col[head, s + at] * c[head]):.4g}, where position {at} gives position 0 "
                         f"{float(first[0, head, at]):.4g}: the mask is not a function of t - s times [t >= s], "
                         "not a decay mask", Stage.CAUSAL)
    decay = None if bool((lam == 1).all()) else (-torch.log(lam)).to(torch.float32).to(torch.float64)
    return Fit(c, decay)


def read_off_state(cand: Candidate, ev: g.Evaluator, fit: Fit) -> Fit:
    """The carried state's weight A_h per head: with k = v = 0, q 1 in key channel 0 and the state
    1 in (key 0, value 0), o_t must be ``A_h lam_h^(t+1)`` in value channel 0 and zero elsewhere."""
    b, h, dk, dv = cand.state_shape(ev)
    n = cand.canonical_shapes(ev)[0][2]
    device, tol = cand.device, cand.tolerance
    qc = torch.zeros(b, h, n, dk, dtype=torch.float64, device=device)
    qc[..., 0] = 1
    kc = torch.zeros_like(qc)
    vc = torch.zeros(b, h, n, dv, dtype=torch.float64, device=device)
    state = torch.zeros(b, h, dk, dv, dtype=torch.float64, device=device)
    state[:, :, 0, 0] = 1
    out = cand.run(ev, qc, kc, vc, state).cpu()
    what = f"the state carried in ({cand.state_in.name})"
    if out[..., 1:].abs().max() > 1e-9 * out[..., 0].abs().max().clamp(min=1e-300):
        raise Reject(f"{what} reaches other channels of the output than its value channel: not the state of this "
                     "attention", Stage.VALUES)
    lam = torch.ones(h, dtype=torch.float64) if fit.decay is None else torch.exp(-fit.decay)
    powers = lam[:, None] ** torch.arange(1, n + 1, dtype=torch.float64)  # lam^(t+1), [H, N]
    weights = out[0, :, 0, 0] / powers[:, 0]  # [H]
    if bool((weights == 0).any()):
        raise Reject(f"{what} does not reach the output in head {int((weights == 0).nonzero()[0])}", Stage.VALUES)
    predicted = weights[None, :, None] * powers[None]
    misfit = (out[..., 0] - predicted).abs() / weights.abs()[None, :, None]
    if misfit.max() > tol:
        batch, rest = divmod(int(misfit.argmax()), h * n)
        head, at = divmod(rest, n)
        raise Reject(f"{what} has weight {float(out[batch, head, at, 0]):.4g} at t = {at} in head {head} (batch "
                     f"{batch}), where A * lam^(t+1) predicts {float(predicted[0, head, at]):.4g}: not the op's "
                     "initial state", Stage.VALUES)
    return Fit(fit.weights, fit.decay, weights)


def _head_scaled(x: torch.Tensor, factor: Optional[torch.Tensor]) -> torch.Tensor:
    return x if factor is None else x * factor.to(x.device)[None, :, None, None]


def _expected(cand: Candidate, fit: Fit, q, k, v, state=None):
    """(output, final state) of what the rewritten graph computes, in float64, [B, H, ...]."""
    scale, q_factor, v_factor = fit.factors(cand.tolerance)
    decay = None if fit.decay is None else fit.decay.to(q.device)
    return reference.attention_forward_chunked(_head_scaled(q, q_factor), k, _head_scaled(v, v_factor), decay,
                                               scale, state)


def masked_expected(cand: Candidate, fit: Fit, q, k, v, weights: torch.Tensor) -> torch.Tensor:
    """What the op computes from the fit with every score (t, s) also weighted by ``weights[t, s]``
    ([N, N], float64): ``c ((Q K^T) * M * W) V``, written out in float64, [B, H, N, Dv]."""
    scale, q_factor, v_factor = fit.factors(cand.tolerance)
    q, v = _head_scaled(q, q_factor), _head_scaled(v, v_factor)
    decay = None if fit.decay is None else fit.decay.to(q.device)
    mask = reference.decay_mask(decay, q.shape[2], dtype=torch.float64, device=q.device)
    return scale * ((q @ k.transpose(-1, -2)) * mask * weights) @ v


def _random_inputs(cand: Candidate, ev: g.Evaluator, seed: int):
    """Random [B, H, N, D] q, k, v and, where the model carries a state in, a [B, H, Dk, Dv] state."""
    gen = torch.Generator().manual_seed(seed)
    qc, kc, vc = (torch.randn(s, generator=gen, dtype=torch.float64).to(cand.device)
                  for s in cand.canonical_shapes(ev))
    state = None
    if cand.state_in is not None:
        state = torch.randn(cand.state_shape(ev), generator=gen, dtype=torch.float64).to(cand.device)
    return qc, kc, vc, state


def check_random(cand: Candidate, ev: g.Evaluator, fit: Fit, seed: int) -> None:
    """The region against what the op computes from the fit, on random q, k, v (and a random state
    carried in) at ``ev``'s sizes."""
    qc, kc, vc, state = _random_inputs(cand, ev, seed)
    got = cand.run(ev, qc, kc, vc, state)
    want, _ = _expected(cand, fit, qc, kc, vc, state)
    err = ((got - want).norm() / want.norm()).item()
    if not err <= cand.tolerance:
        h, n = want.shape[1:3]
        batch, rest = divmod(int((got - want).abs().amax(-1).argmax()), h * n)
        raise Reject(f"output differs from c * ((Q K^T) * M) V on random inputs (relative error {err:.3g}, largest "
                     f"in head {rest // n} at position {rest % n}, batch {batch})", Stage.VALUES)


def check_final_state(cand: Candidate, ev: g.Evaluator, fit: Fit, node: fx.Node, layout: str,
                      region: list[fx.Node], tolerance: float) -> FinalState:
    """``node``, computed by ``region`` from k, v (and the state carried in), as a per-head factor
    times the op's final state, on random inputs at ``ev``'s sizes and at the other lengths a
    symbolic one takes; Reject otherwise."""

    def measure(at: g.Evaluator, seed: int):
        qc, kc, vc, state = _random_inputs(cand, at, seed)
        got = at.run(region, cand.env(at, qc, kc, vc, state))[node]
        _, want = _expected(cand, fit, qc, kc, vc, state)
        got = state_to_canonical(got, layout)
        if got.shape != want.shape:
            raise Reject(f"{node.name} has shape {tuple(got.shape)} where the state has {tuple(want.shape)}",
                         Stage.SHAPES)
        return got, want

    def agrees(got, want, factor):
        scaled = factor.to(want.device)[None, :, None, None] * want
        err = ((got - scaled).norm() / scaled.norm()).item()
        if not err <= tolerance:
            raise Reject(f"{node.name} is not the final state times a weight per head on random inputs (relative "
                         f"error {err:.3g})", Stage.VALUES)

    got, want = measure(ev, 0)
    factor = ((got * want).sum((0, 2, 3)) / (want * want).sum((0, 2, 3)).clamp(min=1e-300)).cpu()
    if bool((factor == 0).any()):
        raise Reject(f"{node.name} is zero in head {int((factor == 0).nonzero()[0])}", Stage.VALUES)
    agrees(got, want, factor)
    agrees(*measure(ev, 1), factor)
    check_lengths(dataclasses.replace(cand, output=node, region=region), ev,
                  lambda at: agrees(*measure(at, 2), factor))
    one = bool(((factor - 1).abs() <= tolerance).all())
    return FinalState(node, layout, None if one else _floats(factor), region)


# ----------------------------------------------------------------------------- a decay passed live

# What a decay computed from trainable parameters may be built with, by the range of its values.
# The op takes slopes >= 0 (lam <= 1) and refuses others; the model would compute a growing mask
# from them. So a source is passed live only where every value the parameters can take gives a
# slope >= 0: a slope made nonnegative by its last op, or a lam in (0, 1].
_NONNEGATIVE_OPS = frozenset({"exp", "softplus", "sigmoid", "abs", "relu", "sqrt", "square"})
_MOVES = g.VIEW_OPS | g.CAST_OPS | {"repeat_interleave"}


def _through_moves(node: fx.Node) -> fx.Node:
    while g.op_name(node) in _MOVES and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _nonnegative(node: fx.Node) -> bool:
    node = _through_moves(node)
    name = g.op_name(node)
    if name in ("clamp", "clamp_min"):
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        return isinstance(low, (int, float)) and low >= 0
    if name == "pow" and len(node.args) > 1 and isinstance(node.args[1], (int, float)):
        return node.args[1] % 2 == 0
    return name in _NONNEGATIVE_OPS


def _nonpositive(node: fx.Node) -> bool:
    node = _through_moves(node)
    return g.op_name(node) == "neg" and _nonnegative(node.args[0])


def _in_unit_interval(node: fx.Node) -> bool:
    """Whether every value of ``node`` is in (0, 1]: a sigmoid, or exp of something <= 0."""
    node = _through_moves(node)
    name = g.op_name(node)
    return name == "sigmoid" or (name == "exp" and _nonpositive(node.args[0]))


def live_decay_form(cand: Candidate, ev: g.Evaluator, fit: Fit) -> str:
    """How the decay source gives the op's decay, from its current value against the decay read
    off: ``"slope"`` (it is the decay) or ``"lam"`` (it is exp(-decay)); Reject where it is neither,
    or where the parameters could make it a slope below 0."""
    source = cand.decay_source
    value = ev.const(source).detach().to(torch.float64).reshape(-1).cpu()
    decay = torch.zeros_like(value) if fit.decay is None else fit.decay
    what = f"{source.name} ({g.describe(source)}, computed from trainable parameters)"
    for form, expected, in_range in (("slope", decay, _nonnegative), ("lam", torch.exp(-decay), _in_unit_interval)):
        if value.shape == expected.shape and bool(((value - expected).abs() <= 1e-4 * expected.abs() + 1e-7).all()):
            if not in_range(source):
                raise Reject(f"the decay is {what}, which the parameters could make a slope below 0 (it is not built "
                             "through exp, softplus, sigmoid, abs, ...): lightning::attn refuses negative slopes",
                             Stage.SUPPORT)
            return form
    raise Reject(f"{what} is neither the decay read off ({_numbers(decay)}) nor exp(-decay)", Stage.DECAY)


def check_live_decay(cand: Candidate, ev: g.Evaluator, fit: Fit, form: str, seed: int) -> None:
    """The region at random parameter values: with the decay source at random decays (as slopes,
    or as lam = exp(-slope)) and random q, k, v, it must compute the op with those decays and the
    weights read off at the current values (which must therefore not depend on the parameters)."""
    gen = torch.Generator().manual_seed(seed)
    heads = len(fit.weights)
    decay = 0.02 + 0.3 * torch.rand(heads, generator=gen, dtype=torch.float64)
    shape = ev.shape(cand.decay_source)
    value = (decay if form == "slope" else torch.exp(-decay)).reshape(shape).to(cand.device)
    qc, kc, vc, state = _random_inputs(cand, ev, seed)
    got = cand.run(ev, qc, kc, vc, state, decay_value=value)
    want, _ = _expected(cand, Fit(fit.weights, decay, fit.state_weights), qc, kc, vc, state)
    err = ((got - want).norm() / want.norm()).item()
    if not err <= cand.tolerance:
        raise Reject(f"with {cand.decay_source.name} at other values (decays {_numbers(decay)}), the output is not "
                     f"the op's with those decays (relative error {err:.3g}): the parameters change more than the "
                     "decay", Stage.VALUES)


def check_repeat(ev: g.Evaluator, chain: list[fx.Node], source: fx.Node, source_layout: str, target: fx.Node,
                 target_layout: str, groups: int) -> bool:
    """Whether ``chain`` (graph order) computes ``target`` from ``source`` as the op's grouping reads
    it: query head h sees kv head ``h // groups`` (``repeat_interleave`` on the head axis; Llama's
    ``repeat_kv``), each in its layout, at ``ev``'s sizes. The chain only moves elements (views,
    expands, repeats, casts: exact in float64) and is linear, so one random source decides."""
    gen = torch.Generator().manual_seed(7)
    val = g.tensor_val(source)
    x = torch.randn(ev.shape(source), generator=gen, dtype=torch.float64).to(val.device)
    got = ev.run(chain, {source: x})[target]
    if not isinstance(got, torch.Tensor):
        return False
    got = got.transpose(1, 2) if target_layout == "bnhd" else got
    want = (x.transpose(1, 2) if source_layout == "bnhd" else x).repeat_interleave(groups, dim=1)
    return got.shape == want.shape and torch.equal(got, want)


def _form(cand: Candidate, classes: dict) -> str:
    """How the model spells it: a cumulative sum, a block loop (concatenated chunks), or one product."""
    names = {g.op_name(n) for n in cand.region}
    products = sum(1 for n in cand.region if g.is_product(n, classes))
    return "cumsum" if "cumsum" in names else "chunked" if "cat" in names and products > 2 else "parallel"
