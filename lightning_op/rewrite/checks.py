"""The checks of one candidate, apart from finding it (``recognise.py``): whether lightning::attn
takes its inputs, and whether its values are causal linear attention with a decay.

:func:`verify` runs them in order, cheapest and most telling first:

1. **Support.** The dtypes, head dims and device, as :func:`lightning_op.support.unsupported`
   states them for the op itself (plus what a graph adds: one dtype for q, k and v, known head dims).
2. **Reading off.** Probing with one-hot q, k, v reads off ``o_t = c * lam_h^(t-s) [t >= s]``
   directly: the scale ``c`` and each head's decay ``lam_h`` (:func:`read_off`).
3. **Identity.** Random q, k, v then check ``o == c * ((Q K^T) * M) V`` (:func:`check_random`).
   The region is a polynomial in q, k and v, so agreement on random inputs means identity
   (Schwartz-Zippel), up to the rounding of the model's own constant masks, which sets the
   candidate's tolerance.
4. **Lengths.** For a symbolic sequence length, the same at the other lengths it can take
   (``lengths.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from .. import reference
from ..support import unsupported
from . import graph as g
from .candidate import Candidate, Reject, Stage
from .lengths import check_lengths


# relative tolerance of the probes, by the least precise floating constant feeding the region
_TOLERANCE = {torch.float64: 1e-7, torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def tolerance(region: list[fx.Node], classes: dict) -> float:
    """The relative tolerance of the probes of ``region``: the rounding its constant masks carry."""
    return max((_TOLERANCE[d] for d in g.const_dtypes(region, classes)), default=_TOLERANCE[torch.float64])


@dataclass
class Match:
    """A verified candidate: what the replacement needs."""

    output: fx.Node
    inputs: tuple[fx.Node, fx.Node, fx.Node]  # q, k, v
    layouts: tuple[str, str, str]  # "bhnd", "bnhd" or "gnd" for q, k, v
    out_layout: str
    decay: Optional[tuple[float, ...]]  # per head, None when every lam is 1
    scale: float
    form: str  # "parallel", "cumsum" or "chunked"
    compute_dtype: torch.dtype
    region: list[fx.Node] = field(repr=False)


@dataclass(frozen=True)
class Fit:
    """What the one-hot probes read off: ``o_t = scale * exp(-decay)^(t-s)`` for t >= s."""

    scale: float
    decay: Optional[torch.Tensor]  # float64 [H] on the CPU, rounded through float32 as the op takes it; None: no decay


def verify(cand: Candidate, ev: g.Evaluator) -> Match:
    """The candidate as a :class:`Match`, or :class:`Reject` saying which check it failed."""
    compute_dtype = check_support(cand)
    fit = read_off(cand, ev)
    check_random(cand, ev, fit, seed=0)
    check_random(cand, ev, fit, seed=1)
    check_lengths(cand, ev, lambda at_length: check_random(cand, at_length, fit, seed=2))
    decay = None if fit.decay is None else tuple(float(x) for x in fit.decay)
    return Match(cand.output, cand.inputs, cand.layouts, cand.reading.out_layout, decay, fit.scale,
                 _form(cand, ev.classes), compute_dtype, cand.region)


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


def read_off(cand: Candidate, ev: g.Evaluator) -> Fit:
    """One-hot probes: the scale c and lam per head with o_t = c lam^(t-s) for t >= s."""
    (b, h, n, dk), _, (_, _, _, dv) = cand.canonical_shapes(ev)
    if n < 2:
        raise Reject("sequence length 1: the decay cannot be read off")
    device, tol = cand.device, cand.tolerance

    def column(s):
        qc = torch.zeros(b, h, n, dk, dtype=torch.float64, device=device)
        qc[..., 0] = 1
        kc = torch.zeros(b, h, n, dk, dtype=torch.float64, device=device)
        kc[:, :, s, 0] = 1
        vc = torch.zeros(b, h, n, dv, dtype=torch.float64, device=device)
        vc[:, :, s, 0] = 1
        out = cand.run(ev, qc, kc, vc)
        if tuple(out.shape) != (b, h, n, dv):
            raise Reject(f"output shape {tuple(out.shape)} does not match q, k, v", Stage.SHAPES)
        if out[..., 1:].abs().max() > 1e-9 * out[..., 0].abs().max().clamp(min=1e-300):
            raise Reject("the output mixes value channels", Stage.SHAPES)
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
        raise Reject(f"growing weights (lam = {lam.max().item():.6g} > 1): not a decay", Stage.DECAY)
    lam = lam.clamp(max=1.0)
    lam = torch.where((1 - lam).abs() <= 1e-12, torch.ones_like(lam), lam)
    expected = lam[:, None] ** t
    if (ratio - expected).abs().max() > tol:
        raise Reject("the weights along the sequence are not c * lam^(t-s): not a decay mask", Stage.DECAY)
    s = n // 2
    if s >= 1:
        col = column(s)[0] / c[:, None]
        if col[:, :s].abs().max() > 1e-9:
            raise Reject("non-causal: a position attends to later positions", Stage.CAUSAL)
        if (col[:, s:] - lam[:, None] ** t[: n - s]).abs().max() > tol:
            raise Reject("the mask is not a function of t - s times [t >= s]: not a decay mask", Stage.CAUSAL)
    decay = None if bool((lam == 1).all()) else (-torch.log(lam)).to(torch.float32).to(torch.float64)
    return Fit(float(c.mean()), decay)


def check_random(cand: Candidate, ev: g.Evaluator, fit: Fit, seed: int) -> None:
    """The region against ``fit.scale * ((Q K^T) * M) V`` on random q, k, v at ``ev``'s sizes."""
    shapes = cand.canonical_shapes(ev)
    gen = torch.Generator().manual_seed(seed)
    device = cand.device
    qc, kc, vc = (torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in shapes)
    got = cand.run(ev, qc, kc, vc)
    # the chunked form in float64: O(N) memory, so long static lengths can be checked too
    decay = None if fit.decay is None else fit.decay.to(device)
    want, _ = reference.attention_forward_chunked(qc, kc, vc, decay, fit.scale)
    err = ((got - want).norm() / want.norm()).item()
    if not err <= cand.tolerance:
        raise Reject(f"output differs from c * ((Q K^T) * M) V on random inputs (relative error {err:.3g})",
                     Stage.VALUES)


def _form(cand: Candidate, classes: dict) -> str:
    """How the model spells it: a cumulative sum, a block loop (concatenated chunks), or one product."""
    names = {g.op_name(n) for n in cand.region}
    products = sum(1 for n in cand.region if g.is_product(n, classes))
    return "cumsum" if "cumsum" in names else "chunked" if "cat" in names and products > 2 else "parallel"
