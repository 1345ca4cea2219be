"""The graph rewrite: a zoo of linear-attention spellings that must run on lightning::attn after
the rewrite (through the dynamo backend and the export pass, static and dynamic shapes, with and
without gradients), and look-alikes that must be left alone. What is checked is what runs: the
returned program's graph, or the graphs a compile hands on, must call the op (or not), and their
outputs must be eager's; the report says why.

The rewrite itself is exercised with ``aot_eager`` behind it (seconds per compile); the
Inductor-backed ``backend="lightning"`` runs in the few tests marked slow.
"""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_op
from lightning_op.rewrite import InductorPass, clear_report, counters, make_backend, report

HIDDEN, HEADS, HEAD_DIM = 32, 2, 16


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()  # the zoo shares forward code: stay under dynamo's recompile limit
    clear_report()
    yield
    torch._dynamo.reset()


def _positions(n, device=None):
    i = torch.arange(n, device=device)
    return i[:, None] - i[None, :]


def _gammas(heads):
    return 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float32))


class Projected(nn.Module):
    """x [B, N, C] -> q, k, v [B, N, H, D] (silu feature map on q, k) -> ``attend`` -> [B, N, C]."""

    def __init__(self, heads=HEADS, head_dim=HEAD_DIM, hidden=HIDDEN):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(hidden, 3 * heads * head_dim)
        self.out = nn.Linear(heads * head_dim, hidden)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        o = self.attend(F.silu(q), F.silu(k), v)  # [B, N, H, D]
        return self.out(o.reshape(b, n, -1))


# ----------------------------------------------------------------------------- positives


class TrilBufferMaskedFill(Projected):
    """``@``, a bool tril buffer sliced to N, masked_fill, the scale on q; no decay."""

    def __init__(self):
        super().__init__()
        self.register_buffer("causal", torch.tril(torch.ones(128, 128, dtype=torch.bool)))

    def attend(self, q, k, v):
        n = q.shape[1]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        return (scores.masked_fill(~self.causal[:n, :n], 0.0) @ v).transpose(1, 2)


class DecayMaskInForward(Projected):
    """``torch.matmul``, a decay mask built in forward from slopes, exp and a comparison."""

    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", lightning_op.slopes(HEADS))

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        diff = _positions(q.shape[2], q.device)
        mask = torch.exp(-self.slopes[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
        return torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * mask, v).transpose(1, 2)


class RetentionEinsum(Projected):
    """RetNet-style: einsum in the [B, N, H, D] layout, gamma ** (i - j) under ``where``, scale on scores."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gammas", _gammas(HEADS))

    def attend(self, q, k, v):
        diff = _positions(q.shape[1], q.device)
        mask = torch.where(diff >= 0, self.gammas[:, None, None] ** diff.float(), torch.zeros(()))
        scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(self.head_dim)
        return torch.einsum("bhnm,bmhd->bnhd", scores * mask, v)


class FlatBmmBufferDecay(Projected):
    """[B*H, N, D] with ``bmm``; a per-head decay mask buffer sliced to N."""

    def __init__(self):
        super().__init__()
        lam = torch.exp(-lightning_op.slopes(HEADS))
        diff = _positions(128)
        self.register_buffer("mask", lam[:, None, None] ** diff.clamp(min=0) * (diff >= 0))

    def attend(self, q, k, v):
        b, n, h, d = q.shape
        q, k, v = (t.transpose(1, 2).reshape(b * h, n, d) for t in (q, k, v))
        scores = torch.bmm(q, k.transpose(1, 2)).view(b, h, n, n) * self.mask[:, :n, :n]
        return torch.bmm(scores.view(b * h, n, n), v).view(b, h, n, d).transpose(1, 2)


class TriuFloatMask(Projected):
    """A float ``triu`` mask applied by masked_fill with a bool view of it; scale on k."""

    def attend(self, q, k, v):
        n = q.shape[1]
        above = torch.ones(n, n, device=q.device).triu(1)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        scores = q @ (k * 0.5).transpose(-1, -2)
        return (scores.masked_fill(above.bool(), 0.0) @ v).permute(0, 2, 1, 3)


class CumsumForm(Projected):
    """The cumsum form: running sum of k (x) v over the sequence, contracted with q."""

    def attend(self, q, k, v):
        kv = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=1)  # [B, N, H, D, D]
        return torch.einsum("bnhd,bnhde->bnhe", q, kv) * self.head_dim ** -0.5


class BlockLoop(Projected):
    """The chunked block loop of Lightning Attention checkpoints, written independently: intra-block
    masked attention plus q times the carried state, the state decayed and updated, cat at the end."""

    block = 16

    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", lightning_op.slopes(HEADS)[:, None, None])

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        b, h, n, d = q.shape
        state = torch.zeros(b, h, d, v.shape[-1], dtype=q.dtype, device=q.device)
        outs = []
        for start in range(0, n, self.block):
            qb, kb, vb = (t[:, :, start:start + self.block] for t in (q, k, v))
            m = qb.shape[2]
            idx = torch.arange(m, device=q.device, dtype=q.dtype)
            diff = idx[:, None] - idx[None, :]
            intra_mask = torch.exp(-self.slopes * diff).masked_fill(diff < 0, 0)
            q_decay = torch.exp(-self.slopes * (idx[:, None] + 1))
            k_decay = torch.exp(-self.slopes * (m - 1 - idx[:, None]))
            outs.append((qb @ kb.transpose(-1, -2) * intra_mask) @ vb + (qb * q_decay) @ state)
            state = torch.exp(-self.slopes * m) * state + (kb * k_decay).transpose(-1, -2) @ vb
        return torch.cat(outs, dim=2).transpose(1, 2)


class NormalisedLinear(Projected):
    """Causal linear attention divided by q . cumsum(k) (positive features): the numerator is
    causal linear attention and is rewritten; the ratio stays as it is."""

    def attend(self, q, k, v):
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=1)
        num = torch.einsum("bnhd,bnhde->bnhe", q, kv)
        den = torch.einsum("bnhd,bnhd->bnh", q, torch.cumsum(k, dim=1))
        return num / den[..., None]


class CumsumElementwise(Projected):
    """The cumsum form contracted by an elementwise product and a sum (q and k split from one
    projection: their shared ancestry is no gating)."""

    def attend(self, q, k, v):
        kv = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=1)  # [B, N, H, D, D]
        return (q.unsqueeze(-1) * kv).sum(-2)


class RecurrentLoopStacked(Projected):
    """The token-by-token recurrence, unrolled, outputs stacked (an einsum per step)."""

    def attend(self, q, k, v):
        b, n, h, d = q.shape
        gamma = _gammas(h)[None, :, None, None]
        state = torch.zeros(b, h, d, v.shape[-1])
        outs = []
        for t in range(n):
            state = gamma * state + k[:, t, :, :, None] * v[:, t, :, None, :]
            outs.append(torch.einsum("bhd,bhde->bhe", q[:, t], state))
        return torch.stack(outs, dim=1)


class GroupedKeyValueHeads(Projected):
    """One key/value head repeated for both query heads (repeat_interleave), a pow decay mask."""

    def attend(self, q, k, v):
        k, v = (t[:, :, :1].repeat_interleave(HEADS, dim=2) for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        distance = _positions(q.shape[2], q.device).to(q.dtype)
        mask = _gammas(HEADS)[:, None, None] ** distance.clamp(min=0) * (distance >= 0)
        return ((q @ k.transpose(-1, -2)) * mask @ v).transpose(1, 2)


class BaddbmmScaledScores(Projected):
    """Heads flattened into the batch, the scaled scores from ``baddbmm`` with ``beta=0`` over an
    uninitialised tensor (as Megatron- and BLOOM-style code writes it), a tril mask, then bmm."""

    def attend(self, q, k, v):
        b, n, h, d = q.shape
        qf, kf, vf = (t.permute(0, 2, 1, 3).reshape(b * h, n, d) for t in (q, k, v))
        scores = torch.baddbmm(torch.empty(b * h, n, n), qf, kf.transpose(1, 2), beta=0.0, alpha=d ** -0.5)
        out = torch.bmm(scores * torch.tril(torch.ones(n, n)), vf)
        return out.view(b, h, n, d).permute(0, 2, 1, 3)


class ChunksAsATensorDimension(Projected):
    """The chunked form vectorised over chunks (as naive chunk references write it): the sequence
    padded and reshaped into [B, H, chunks, L, D], all intra-chunk products at once, per-chunk
    states, and a loop over chunks for their decayed prefix only."""

    chunk = 8

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        b, h, n, d = q.shape
        pad = (-n) % self.chunk
        chunks = (n + pad) // self.chunk
        q, k, v = (F.pad(t, (0, 0, 0, pad)).reshape(b, h, chunks, self.chunk, d) for t in (q, k, v))
        log_gamma = torch.log(_gammas(h))[None, :, None, None]
        idx = torch.arange(self.chunk, dtype=torch.float32)
        intra = torch.exp(log_gamma[..., None] * (idx[:, None] - idx[None, :])) * (idx[:, None] >= idx[None, :])
        q_decay = torch.exp(log_gamma * (idx[:, None] + 1))
        k_decay = torch.exp(log_gamma * (self.chunk - 1 - idx[:, None]))
        out = ((q @ k.transpose(-1, -2)) * intra) @ v
        chunk_states = (k * k_decay[:, :, None]).transpose(-1, -2) @ v
        state, inter = torch.zeros(b, h, d, d), []
        for c in range(chunks):
            inter.append((q[:, :, c] * q_decay) @ state)
            state = state * torch.exp(log_gamma * self.chunk) + chunk_states[:, :, c]
        out = out + torch.stack(inter, dim=2)
        return out.reshape(b, h, chunks * self.chunk, d)[:, :, :n].transpose(1, 2)


class KeyValueHeadsRepeatedByExpand(Projected):
    """One key/value head shared by the query heads through ``expand`` and ``reshape`` after the
    transpose (as Llama's ``repeat_kv`` does), a power-of-0.95 decay mask."""

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        b, _, n, d = k.shape
        k, v = (t[:, :1, None].expand(b, 1, HEADS, n, d).reshape(b, HEADS, n, d) for t in (k, v))
        i = torch.arange(n)
        mask = 0.95 ** (i[:, None] - i[None, :]).clamp(min=0).float() * (i[:, None] >= i[None, :])
        return (((q @ k.transpose(-2, -1)) * mask) @ v).transpose(1, 2)


class SlopesFromAListInForward(Projected):
    """Slopes made in forward from a Python list (exported as a lifted constant, then ``detach_``),
    the mask from ``masked_fill(-inf)`` and ``exp``, as TransNormer-style code does."""

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        slopes = torch.tensor([0.25, 0.0625])[:, None, None]
        distance = _positions(q.shape[2], q.device).float()
        log_mask = (-slopes * distance).masked_fill(distance < 0, float("-inf"))
        return (torch.matmul(q, k.transpose(-1, -2)) * torch.exp(log_mask)).matmul(v).transpose(1, 2)


POSITIVES = {
    "tril_buffer_masked_fill": (TrilBufferMaskedFill, None, HEAD_DIM ** -0.5),
    "decay_mask_in_forward": (DecayMaskInForward, lightning_op.slopes(HEADS), 1.0),
    "retention_einsum": (RetentionEinsum, -torch.log(_gammas(HEADS)), HEAD_DIM ** -0.5),
    "flat_bmm_buffer_decay": (FlatBmmBufferDecay, lightning_op.slopes(HEADS), 1.0),
    "triu_float_mask": (TriuFloatMask, None, 0.5),
    "cumsum_form": (CumsumForm, None, HEAD_DIM ** -0.5),
    "normalised_numerator": (NormalisedLinear, None, 1.0),
    "block_loop": (BlockLoop, lightning_op.slopes(HEADS), 1.0),
    "slopes_from_a_list": (SlopesFromAListInForward, torch.tensor([0.25, 0.0625]), 1.0),
    "cumsum_elementwise": (CumsumElementwise, None, 1.0),
    "baddbmm_scaled_scores": (BaddbmmScaledScores, None, HEAD_DIM ** -0.5),
    "recurrent_loop_stacked": (RecurrentLoopStacked, -torch.log(_gammas(HEADS)), 1.0),
    "grouped_key_value_heads": (GroupedKeyValueHeads, -torch.log(_gammas(HEADS)), 1.0),
    "key_value_heads_repeated_by_expand": (KeyValueHeadsRepeatedByExpand, torch.full((HEADS,), -math.log(0.95)), 1.0),
}


# ----------------------------------------------------------------------------- negatives


class SoftmaxCausal(Projected):
    def attend(self, q, k, v):
        n = q.shape[1]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)).masked_fill(_positions(n, q.device) < 0, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2)


class SoftmaxAlibi(Projected):
    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        diff = _positions(q.shape[2], q.device)
        bias = -lightning_op.slopes(HEADS)[:, None, None] * diff.clamp(min=0)
        scores = (q @ k.transpose(-1, -2) + bias).masked_fill(diff < 0, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2)


class NonCausal(Projected):
    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return ((q @ k.transpose(-1, -2)) * 0.25 @ v).transpose(1, 2)


class LowerTriangularNotDecay(Projected):
    """Lower-triangular, positive, and not lam^(i-j): random weights."""

    def __init__(self):
        super().__init__()
        weights = torch.rand(128, 128, generator=torch.Generator().manual_seed(0)) + 0.5
        self.register_buffer("mask", torch.tril(weights))

    def attend(self, q, k, v):
        n = q.shape[1]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return ((q @ k.transpose(-1, -2)) * self.mask[:n, :n] @ v).transpose(1, 2)


class HarmonicMask(Projected):
    """1 / (i - j + 1) below the diagonal: causal, decaying, but not geometric."""

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        diff = _positions(q.shape[2], q.device)
        mask = torch.where(diff >= 0, 1.0 / (diff.clamp(min=0) + 1), torch.zeros(()))
        return ((q @ k.transpose(-1, -2)) * mask @ v).transpose(1, 2)


class RowNormalisedDecay(Projected):
    """torchscale's retention mask: the decay mask divided by the root of its row sums."""

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        diff = _positions(q.shape[2], q.device)
        mask = torch.where(diff >= 0, _gammas(HEADS)[:, None, None] ** diff.float(), torch.zeros(()))
        mask = mask / mask.sum(dim=-1, keepdim=True).sqrt()
        return ((q @ k.transpose(-1, -2)) * mask @ v).transpose(1, 2)


class StrictlyCausal(Projected):
    def attend(self, q, k, v):
        n = q.shape[1]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        mask = torch.ones(n, n, device=q.device).tril(-1)
        return ((q @ k.transpose(-1, -2)) * mask @ v).transpose(1, 2)


class LearnableDecay(Projected):
    def __init__(self):
        super().__init__()
        self.log_slopes = nn.Parameter(torch.log(lightning_op.slopes(HEADS)))

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        diff = _positions(q.shape[2], q.device)
        mask = torch.exp(-self.log_slopes.exp()[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
        return ((q @ k.transpose(-1, -2)) * mask @ v).transpose(1, 2)


POSITIVES["learnable_decay"] = (LearnableDecay, lightning_op.slopes(HEADS), 1.0)  # passed live: test_rewrite_forms


class BiasOnScores(Projected):
    def attend(self, q, k, v):
        n = q.shape[1]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2) + 0.1) * torch.ones(n, n, device=q.device).tril()
        return (scores @ v).transpose(1, 2)


class GrowingMask(Projected):
    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        diff = _positions(q.shape[2], q.device)
        mask = torch.exp(0.05 * diff.clamp(min=0)) * (diff >= 0)
        return ((q @ k.transpose(-1, -2)) * mask @ v).transpose(1, 2)


class BaddbmmWithBias(Projected):
    """``baddbmm`` adding a constant bias to the scores: ((Q K^T + B) * M) V is no linear attention."""

    def attend(self, q, k, v):
        b, n, h, d = q.shape
        qf, kf, vf = (t.permute(0, 2, 1, 3).reshape(b * h, n, d) for t in (q, k, v))
        bias = 0.1 * torch.ones(b * h, n, n)
        scores = torch.baddbmm(bias, qf, kf.transpose(1, 2), beta=1.0, alpha=1.0)
        out = torch.bmm(scores * torch.tril(torch.ones(n, n)), vf)
        return out.view(b, h, n, d).permute(0, 2, 1, 3)


class TinyHeads(TrilBufferMaskedFill):
    def __init__(self):
        nn.Module.__init__(self)
        self.heads, self.head_dim = 4, 8
        self.qkv = nn.Linear(HIDDEN, 3 * 32)
        self.out = nn.Linear(32, HIDDEN)
        self.register_buffer("causal", torch.tril(torch.ones(128, 128, dtype=torch.bool)))


NEGATIVES = {  # model, a phrase the reason must contain (None: not even a candidate)
    "softmax_causal": (SoftmaxCausal, None),
    "softmax_alibi": (SoftmaxAlibi, None),
    "non_causal": (NonCausal, "causal"),
    "lower_triangular_not_decay": (LowerTriangularNotDecay, "decay"),
    "harmonic_mask": (HarmonicMask, "decay"),
    "row_normalised_decay": (RowNormalisedDecay, ""),
    "strictly_causal": (StrictlyCausal, "diagonal"),
    "bias_on_scores": (BiasOnScores, None),
    "growing_mask": (GrowingMask, "lam"),
    "head_dim_8": (TinyHeads, "head dims"),
    "baddbmm_with_bias": (BaddbmmWithBias, None),
}


# ----------------------------------------------------------------------------- helpers


def _model(cls, dtype=torch.float32):
    torch.manual_seed(0)
    return cls().to(dtype)


def _compiled(model, dynamic):
    """``torch.compile`` with the rewrite and aot_eager behind it, and the list the graph modules
    the rewrite hands to aot_eager (what runs) are appended to."""
    graphs = []

    def keep(gm, example_inputs, **kwargs):
        compiled = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs, **kwargs)
        graphs.append(gm)  # once compiled: a graph whose compile makes dynamo trace again never runs
        return compiled

    return torch.compile(model, backend=make_backend(keep), dynamic=dynamic, fullgraph=True), graphs


def _run(model, x, entry, dynamic):
    """(the model's output through ``entry``, the graph modules that computed it): "dynamo"
    (see ``_compiled``) or "export" (the program ``lightning_op.rewrite`` returned)."""
    if entry == "dynamo":
        compiled, graphs = _compiled(model, dynamic)
        return compiled(x), graphs
    shapes = ({1: torch.export.Dim.AUTO},) if dynamic else None  # a block loop specialises N
    ep = lightning_op.rewrite(torch.export.export(model, (x,), dynamic_shapes=shapes))
    return ep.module()(x), [ep.graph_module]


def _rewritten():
    return [r for r in report() if r.rewritten]


def _op_calls(graphs) -> int:
    """How many ``lightning::attn`` calls the graphs make."""
    return sum(node.op == "call_function" and node.target in (torch.ops.lightning.attn.default,
                                                              torch.ops.lightning.attn)
               for gm in graphs for node in gm.graph.nodes)


# fp32 programs against eager: the op and the model's own matmuls sum in different orders
_TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _assert_runs_on_the_op(graphs, got, want, calls=1):
    """What a rewrite must deliver, whatever its report says: the graphs that ran (a returned
    program's, or those a compile ran) call the op ``calls`` times, and their output is eager's."""
    assert _op_calls(graphs) == calls, [gm.graph for gm in graphs]
    tol = _TOLERANCE[want.dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


ENTRIES = [("dynamo", True), ("dynamo", False), ("export", True), ("export", False)]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("entry,dynamic", ENTRIES, ids=[f"{e}-{'dynamic' if d else 'static'}" for e, d in ENTRIES])
@pytest.mark.parametrize("name", list(POSITIVES))
def test_positive_spellings_are_rewritten_and_match_eager(name, entry, dynamic):
    cls, decay, scale = POSITIVES[name]
    model = _model(cls).eval()
    x = torch.randn(2, 45, HIDDEN)
    with torch.no_grad():
        got, graphs = _run(model, x, entry, dynamic)
        _assert_runs_on_the_op(graphs, got, model(x))
    done = _rewritten()
    assert len(done) == 1, report()
    record = done[0]
    assert record.stage == entry
    assert record.scale == pytest.approx(scale, rel=1e-4)
    if decay is None:
        assert record.decay is None
    else:
        torch.testing.assert_close(torch.tensor(record.decay), decay, rtol=1e-4, atol=1e-6)
    if entry == "dynamo" and dynamic:  # the symbolic length holds for other lengths too
        compiled, graphs = _compiled(model, dynamic=True)
        with torch.no_grad():
            for n in _OTHER_LENGTHS.get(cls, (7, 64, 200)):
                y = torch.randn(1, n, HIDDEN)
                got = compiled(y)
                _assert_runs_on_the_op(graphs[-1:], got, model(y))  # a loop recompiles for each length


# a mask buffer of 128 bounds N; loops unrolled for each N are slow to trace at long lengths (the
# token loop at one more length; the block loop at 64 too, for whole blocks only)
_OTHER_LENGTHS = {TrilBufferMaskedFill: (7, 64, 127), FlatBmmBufferDecay: (7, 64, 127), BlockLoop: (7, 64),
                  RecurrentLoopStacked: (7,)}


def _assert_left_alone(cls, entry, phrase, dynamic=True):
    """``cls``'s output through ``entry`` equals eager, nothing was rewritten, and a reason holds
    ``phrase`` (None: nothing was even a candidate)."""
    model = _model(cls).eval()
    x = torch.randn(2, 45, HIDDEN)
    with torch.no_grad():
        got, graphs = _run(model, x, entry, dynamic=dynamic)
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)
    assert _op_calls(graphs) == 0 and not _rewritten(), report()
    reasons = [r.reason for r in report()]
    if phrase is None:
        assert not reasons
    else:
        assert any(phrase in reason for reason in reasons), reasons


@pytest.mark.parametrize("entry", ["dynamo", "export"])
@pytest.mark.parametrize("name", list(NEGATIVES))
def test_look_alikes_are_left_alone(name, entry):
    cls, phrase = NEGATIVES[name]
    _assert_left_alone(cls, entry, phrase)


def _assert_same_gradients(compiled, model):
    """One training step through ``compiled`` and through eager ``model``: same input and weight grads."""
    x = torch.randn(2, 40, HIDDEN, requires_grad=True)
    compiled(x).square().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    x.grad = None
    model(x).square().sum().backward()
    for a, b in zip(got, [x.grad] + [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls,dynamic", [(BlockLoop, False), (RetentionEinsum, True)])
def test_training_graph_runs_forward_and_backward_on_the_ops(cls, dynamic):
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    model = _model(cls)
    backend = make_backend(aot_autograd(fw_compiler=record, bw_compiler=record))
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)
    _assert_same_gradients(compiled, model)
    targets = {node.target for gm in graphs for node in gm.graph.nodes}
    assert torch.ops.lightning.attn.default in targets
    assert torch.ops.lightning.attn_bwd.default in targets
    assert len(_rewritten()) == 1


def test_exported_training_program_trains_through_the_op():
    model = _model(RetentionEinsum)
    x = torch.randn(2, 30, HIDDEN)
    ep = lightning_op.rewrite(torch.export.export(model, (x,)))
    module = ep.module()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = module(x1), model(x2)
    _assert_runs_on_the_op([ep.graph_module], y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_with_rounded_mask_buffer(dtype):
    model = _model(FlatBmmBufferDecay, dtype).eval()  # the mask buffer itself is in half precision
    x = torch.randn(2, 45, HIDDEN, dtype=dtype)
    with torch.no_grad():
        got, graphs = _run(model, x, "dynamo", dynamic=False)
        want = model.float()(x.float())
    assert len(_rewritten()) == 1 and _op_calls(graphs) == 1, report()
    assert (got.float() - want).norm() / want.norm() < (3e-2 if dtype == torch.bfloat16 else 5e-3)


def test_float64_model_is_left_alone_with_a_reason():
    model = _model(DecayMaskInForward, torch.float64).eval()
    x = torch.randn(2, 45, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        got, graphs = _run(model, x, "export", dynamic=False)
        torch.testing.assert_close(got, model(x))
    assert not _rewritten() and _op_calls(graphs) == 0
    assert any("dtype" in r.reason for r in report()), report()


def test_core_aten_program_after_run_decompositions():
    model = _model(RetentionEinsum).eval()
    x = torch.randn(2, 33, HIDDEN)
    ep = torch.export.export(model, (x,), dynamic_shapes=({1: torch.export.Dim("n", min=2, max=100)},))
    ep = lightning_op.rewrite(ep.run_decompositions())
    assert len(_rewritten()) == 1, report()
    with torch.no_grad():
        for n in (33, 100):
            y = torch.randn(2, n, HIDDEN)
            _assert_runs_on_the_op([ep.graph_module], ep.module()(y), model(y))


def test_rewritten_program_saves_and_loads():
    model = _model(BlockLoop).eval()
    x = torch.randn(1, 40, HIDDEN)
    ep = lightning_op.rewrite(torch.export.export(model, (x,)))
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    with torch.no_grad():
        _assert_runs_on_the_op([loaded.graph_module], loaded.module()(x), model(x))


def test_two_layers_are_both_rewritten_and_logged(caplog):
    model = nn.Sequential(_model(DecayMaskInForward), nn.GELU(), _model(CumsumForm)).eval()
    x = torch.randn(2, 20, HIDDEN)
    with caplog.at_level(logging.INFO, logger="lightning_op.rewrite"), torch.no_grad():
        got, graphs = _run(model, x, "export", dynamic=False)
        _assert_runs_on_the_op(graphs, got, model(x), calls=2)
    assert counters()["rewritten"] == 2
    assert sum("rewrote" in m for m in caplog.messages) == 2
    assert {r.form for r in _rewritten()} == {"parallel", "cumsum"}


def test_internal_error_leaves_graph_alone(monkeypatch, caplog):
    from lightning_op.rewrite import recognise

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(recognise.Recogniser, "analyse", broken)
    model = _model(DecayMaskInForward).eval()
    x = torch.randn(2, 20, HIDDEN)
    with caplog.at_level(logging.WARNING, logger="lightning_op.rewrite"), torch.no_grad():
        got, graphs = _run(model, x, "dynamo", dynamic=False)
        torch.testing.assert_close(got, model(x))
        assert _op_calls(graphs) == 0
        ep = torch.export.export(model, (x,))
        assert lightning_op.rewrite(ep) is ep
    assert not _rewritten()
    assert any("boom" in m for m in caplog.messages)


def test_rewrite_rejects_non_programs():
    with pytest.raises(TypeError, match="ep must be a torch.export.ExportedProgram, got Linear"):
        lightning_op.rewrite(nn.Linear(2, 2))


def test_report_accessor_and_record_text():
    model = _model(CumsumForm).eval()
    x = torch.randn(1, 20, HIDDEN)
    with torch.no_grad():
        got, graphs = _run(model, x, "export", dynamic=False)
        _assert_runs_on_the_op(graphs, got, model(x))
    (record,) = lightning_op.rewrite_report()
    assert "rewrote cumsum linear attention" in str(record)
    assert "test_rewrite.py" in record.location
    clear_report()
    assert lightning_op.rewrite_report() == []


# ----------------------------------------------------------------------------- Inductor


@pytest.fixture
def handed_to_inductor(monkeypatch):
    """The graphs ``backend="lightning"`` hands to Inductor in place of dynamo's (its rewrites)."""
    from lightning_op.rewrite import passes

    graphs, rewrite = [], passes.rewrite_dynamo_graph

    def keep(gm, *args):
        rewritten = rewrite(gm, *args)
        if rewritten is not None:
            graphs.append(rewritten)
        return rewritten

    monkeypatch.setattr(passes, "rewrite_dynamo_graph", keep)
    return graphs


@pytest.mark.slow
def test_lightning_backend_with_inductor_trains_and_matches_eager(handed_to_inductor):
    model = _model(BlockLoop)
    compiled = torch.compile(model, backend="lightning")
    _assert_same_gradients(compiled, model)
    assert len(_rewritten()) == 1 and _op_calls(handed_to_inductor) == 1


@pytest.mark.slow
def test_lightning_backend_dynamic_inference_leaves_softmax_alone(handed_to_inductor):
    model = nn.Sequential(_model(RetentionEinsum), _model(SoftmaxCausal)).eval()
    compiled = torch.compile(model, backend="lightning", dynamic=True, options={"max_autotune": False})
    with torch.no_grad():
        for n in (21, 50, 200):
            x = torch.randn(2, n, HIDDEN)
            _assert_runs_on_the_op(handed_to_inductor, compiled(x), model(x))
    assert len(_rewritten()) == 1


@pytest.mark.slow
def test_inductor_pass_in_a_users_own_config():
    from torch._inductor import config

    targets = []

    class Recorded(InductorPass):  # the graph as the pass leaves it, which Inductor then compiles
        def __call__(self, graph):
            super().__call__(graph)
            targets.extend(node.target for node in graph.nodes)

    model = _model(TriuFloatMask).eval()  # Inductor passes buffers without values: a mask built in forward
    x = torch.randn(2, 24, HIDDEN)
    with config.patch(joint_custom_pre_pass=Recorded(), fx_graph_cache=False), torch.no_grad():
        got = torch.compile(model)(x)
    assert targets.count(torch.ops.lightning.attn.default) == 1
    torch.testing.assert_close(got, model(x), rtol=_TOLERANCE[torch.float32], atol=_TOLERANCE[torch.float32])
    assert [r.stage for r in _rewritten()] == ["inductor"]


def test_inductor_pass_uuid_is_stable_bytes():
    assert InductorPass().uuid() == InductorPass().uuid()
    assert isinstance(InductorPass().uuid(), bytes)


def test_long_dynamic_sequence_is_probed_at_a_small_length():
    """Probing costs O(N^2) per evaluation: a dynamic length is verified at small sizes, fast."""
    import time

    model = _model(DecayMaskInForward)
    x = torch.randn(1, 4096, HIDDEN)
    ep = torch.export.export(model, (x,), dynamic_shapes=({1: torch.export.Dim("n", min=2, max=65536)},))
    start = time.perf_counter()
    rewritten = lightning_op.rewrite(ep)
    assert time.perf_counter() - start < 20  # 25 s when probed at N = 4096 on 2 cores
    assert [r.rewritten for r in report()] == [True]
    with torch.no_grad():
        _assert_runs_on_the_op([rewritten.graph_module], rewritten.module()(x), model(x))


def test_long_static_sequence_is_left_alone_with_advice():
    model = _model(DecayMaskInForward)
    ep = torch.export.export(model, (torch.randn(1, 4096, HIDDEN),))
    assert lightning_op.rewrite(ep) is ep
    (record,) = report()
    assert not record.rewritten and "dynamic sequence length" in record.reason


# ----------------------------------------------------------------------------- in-place writes


class MaskFilledRowByRow(Projected):
    """A causal mask of ones whose rows are then overwritten in place with decays: read along the
    graph's edges, without the writes, it looks like a plain causal mask (decay none)."""

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        n = q.shape[2]
        mask = torch.ones(HEADS, n, n).tril()
        for row in range(n):
            mask[:, row, : row + 1] = torch.exp(-0.3 * torch.arange(row, -1, -1, dtype=torch.float32))
        return ((q @ k.transpose(-1, -2)) * mask @ v).transpose(1, 2)


class ScoresMaskedInPlace(Projected):
    """The scores decayed and masked in place (``mul_``, ``masked_fill_``), then times v."""

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        i = torch.arange(q.shape[2])
        scores = q @ k.transpose(-1, -2)
        scores.mul_(_gammas(HEADS)[:, None, None] ** (i[:, None] - i[None, :]).clamp(min=0))
        scores.masked_fill_(i[:, None] < i[None, :], 0.0)
        return (scores @ v).transpose(1, 2)


class HarmonicRowByRow(Projected):
    """Causal, filled row by row in place, but 1 / (1 + t - s) is no decay."""

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        n = q.shape[2]
        mask = torch.zeros(n, n)
        for row in range(n):
            mask[row, : row + 1] = 1.0 / (1.0 + torch.arange(row, -1, -1, dtype=torch.float32))
        return ((q @ k.transpose(-1, -2)) * mask @ v).transpose(1, 2)


class RecurrentLoopWrittenInPlace(Projected):
    """The token-by-token recurrence of reference implementations, each output row written in
    place into a preallocated tensor, contracted by elementwise products and sums."""

    def attend(self, q, k, v):
        b, n, h, d = q.shape
        gamma = _gammas(h)[None, :, None, None]
        state = torch.zeros(b, h, d, v.shape[-1])
        out = torch.zeros_like(v)
        for t in range(n):
            state = gamma * state + k[:, t, :, :, None] * v[:, t, :, None, :]
            out[:, t] = (q[:, t, :, :, None] * state).sum(-2)
        return out


def _row_filled_decay_mask(n, slope):
    """One head's mask, a row at a time: -inf above the diagonal, -slope * distance on and below
    it, exponentiated (how TransNormer-style code builds it, with a Python float slope)."""
    log_mask = torch.full((n, n), float("-inf")).triu(1)
    for row in range(n):
        log_mask[row, : row + 1] = -slope * torch.arange(row, -1, -1, dtype=torch.float32)
    return torch.exp(log_mask)


class SlopesReadWithItem(Projected):
    """Slopes kept in a buffer and read one by one with ``.item()``, masks filled row by row."""

    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", lightning_op.slopes(HEADS))

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        mask = torch.stack([_row_filled_decay_mask(q.shape[2], s.item()) for s in self.slopes])
        scores = (torch.matmul(q, k.transpose(2, 3)).float() * mask).to(q.dtype)
        return torch.matmul(scores, v).transpose(1, 2)


IN_PLACE = {
    "mask_filled_row_by_row": (MaskFilledRowByRow, torch.full((HEADS,), 0.3), 1.0),
    "scores_masked_in_place": (ScoresMaskedInPlace, -torch.log(_gammas(HEADS)), 1.0),
    "recurrent_loop_written_in_place": (RecurrentLoopWrittenInPlace, -torch.log(_gammas(HEADS)), 1.0),
    "slopes_read_with_item": (SlopesReadWithItem, lightning_op.slopes(HEADS), 1.0),
}


# the backend traces only graphs with a contraction op (matmul, einsum, cumsum, ...) to ATen: an
# elementwise recurrence goes through export alone
IN_PLACE_CASES = [(name, entry) for name in IN_PLACE for entry in ("dynamo", "export")
                  if (name, entry) != ("recurrent_loop_written_in_place", "dynamo")]


@pytest.mark.parametrize("name,entry", IN_PLACE_CASES, ids=[f"{n}-{e}" for n, e in IN_PLACE_CASES])
def test_in_place_writes_are_functionalized_then_rewritten(name, entry):
    cls, decay, scale = IN_PLACE[name]
    model = _model(cls).eval()
    x = torch.randn(2, 20, HIDDEN)
    # dynamo breaks its graph at .item() unless it captures scalars (the mask would arrive as an input)
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        got, graphs = _run(model, x, entry, dynamic=False)
        _assert_runs_on_the_op(graphs, got, model(x))
    (record,) = _rewritten()
    assert record.stage == f"{entry}, functionalized"
    assert record.scale == pytest.approx(scale, rel=1e-4)
    torch.testing.assert_close(torch.tensor(record.decay), decay, rtol=1e-4, atol=1e-6)


def test_training_through_a_mask_written_in_place():
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    model = _model(MaskFilledRowByRow)
    compiled = torch.compile(model, backend=make_backend(aot_autograd(fw_compiler=keep, bw_compiler=keep)),
                             fullgraph=True)
    _assert_same_gradients(compiled, model)
    targets = {node.target for gm in graphs for node in gm.graph.nodes}
    assert torch.ops.lightning.attn.default in targets and torch.ops.lightning.attn_bwd.default in targets
    assert len(_rewritten()) == 1


@pytest.mark.parametrize("entry", ["dynamo", "export"])
def test_a_row_filled_mask_that_is_no_decay_is_left_alone(entry):
    _assert_left_alone(HarmonicRowByRow, entry, "not a decay", dynamic=False)


@pytest.mark.parametrize("entry", ["dynamo", "export"])
def test_writes_are_refused_where_the_graph_cannot_be_functionalized(entry, monkeypatch):
    """Without functionalization the probes would see the mask before its writes (a plain causal
    mask here) and the rewrite would compute the wrong attention: it must refuse, saying why."""
    from lightning_op.rewrite import passes

    def fail(*args, **kwargs):
        raise RuntimeError("no functionalization in this test")

    original_trace = passes._trace
    monkeypatch.setattr(passes, "_trace", lambda gm, fakes, mode, functional: fail() if functional
                        else original_trace(gm, fakes, mode, functional))
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", fail)
    _assert_left_alone(MaskFilledRowByRow, entry, "written in place", dynamic=False)


def test_written_in_place_finds_the_reads_after_a_write():
    from lightning_op.rewrite import graph as g

    def f(x):
        mask = torch.ones(4, 4)
        row = mask[1]  # a view: writing it writes mask
        early = mask.sum(0)  # read before the write: what the edges say
        row.copy_(x[0])
        y = x.detach_() * 2  # detach_ writes no value
        return early + mask.sum(1) + y.sum(0)

    gm = torch.fx.experimental.proxy_tensor.make_fx(f, pre_dispatch=True)(torch.randn(4, 4))
    written = g.written_in_place(gm.graph)
    sums = [n for n in gm.graph.nodes if n.target == torch.ops.aten.sum.dim_IntList]
    early, late = sums[0], sums[1]  # mask.sum(0) before the copy, mask.sum(1) after it
    assert late in written and early not in written
    assert any(n.target == torch.ops.aten.copy_.default for n in written)
    assert not any(n.target in (torch.ops.aten.ones.default, torch.ops.aten.mul.Tensor) for n in written)


@pytest.mark.parametrize("entry", ["dynamo", "export"])
def test_chunks_as_a_tensor_dimension(entry):
    """Static: rewritten. Traced with a dynamic length, the loop over chunks is unrolled for this
    length's chunk count while N stays symbolic, so the graph is wrong at other lengths; the
    second-length probe sees that and the region is left alone (the output stays the model's)."""
    model = _model(ChunksAsATensorDimension).eval()
    x = torch.randn(2, 45, HIDDEN)
    with torch.no_grad():
        got, graphs = _run(model, x, entry, dynamic=False)
        _assert_runs_on_the_op(graphs, got, model(x))
    (record,) = _rewritten()
    torch.testing.assert_close(torch.tensor(record.decay), -torch.log(_gammas(HEADS)), rtol=1e-4, atol=1e-6)
    clear_report()
    torch._dynamo.reset()
    _assert_left_alone(ChunksAsATensorDimension, entry, "differs", dynamic=True)
