"""The rewrite into the op's grouped and learnable forms (issue 23, item 6): k and v repeated for
grouped query heads reach the op un-repeated, and a decay computed from a trainable parameter is
passed to the op live, so it trains.

Each positive runs through ``lightning_op.rewrite`` (export) and ``torch.compile`` (the rewrite with
aot_eager behind it) and is compared with the model itself: outputs, and gradients where it trains.
Beside each, a look-alike that must stay as it was (or be mapped as it computes).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_op
from lightning_op.rewrite import clear_report, report
from test_rewrite_gaps import _run  # both entry points, with the graphs each runs

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LENGTH = 32, 4, 2, 16, 20
GROUP = HEADS // KV_HEADS
GAMMAS = (0.9, 0.95, 0.97, 0.99)  # one per query head: the heads of a group differ
KV_GAMMAS = (0.9, 0.97)  # one per kv head: its query heads share it


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    clear_report()
    yield
    torch._dynamo.reset()


def _decay_mask(gammas, n):
    """gamma_h ** (t - s) on and below the diagonal, zero above: [H, N, N]."""
    i = torch.arange(n)
    diff = i[:, None] - i[None, :]
    return torch.tensor(gammas)[:, None, None] ** diff.clamp(min=0) * (diff >= 0)


def repeat_kv(x, n_rep):
    """Llama's repeat_kv: [B, Hkv, N, D] -> [B, Hkv * n_rep, N, D], each kv head n_rep times in a row."""
    b, kv_heads, n, d = x.shape
    return x[:, :, None, :, :].expand(b, kv_heads, n_rep, n, d).reshape(b, kv_heads * n_rep, n, d)


class GroupedAttention(nn.Module):
    """x [B, N, C] -> q [B, N, H, D], k, v [B, N, Hkv, D] (silu on q and k) -> ``attend`` -> [B, N, C]."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(HIDDEN, HEADS * HEAD_DIM)
        self.kv = nn.Linear(HIDDEN, 2 * KV_HEADS * HEAD_DIM)
        self.out = nn.Linear(HEADS * HEAD_DIM, HIDDEN)

    def forward(self, x):
        b, n, _ = x.shape
        q = F.silu(self.q(x)).view(b, n, HEADS, HEAD_DIM)
        k, v = self.kv(x).view(b, n, 2, KV_HEADS, HEAD_DIM).unbind(2)
        return self.out(self.attend(q, F.silu(k), v).reshape(b, n, -1))


# ----------------------------------------------------------------------------- 1. grouped heads


class LlamaRepeatKV(GroupedAttention):
    """Llama's ``repeat_kv`` after the transpose ([B, H, N, D]), a decay per query head."""

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = repeat_kv(k, GROUP), repeat_kv(v, GROUP)
        scores = (q @ k.transpose(-1, -2)) * HEAD_DIM ** -0.5
        return ((scores * _decay_mask(GAMMAS, q.shape[2])) @ v).transpose(1, 2)


class RepeatInterleaveKVDecay(GroupedAttention):
    """``repeat_interleave`` on dim 1 ([B, H, N, D]); the decay per kv head, repeated like k and v."""

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = k.repeat_interleave(GROUP, dim=1), v.repeat_interleave(GROUP, dim=1)
        mask = _decay_mask(KV_GAMMAS, q.shape[2]).repeat_interleave(GROUP, dim=0)
        return (((q @ k.transpose(-1, -2)) * mask) @ v).transpose(1, 2)


class ExpandBNHD(GroupedAttention):
    """The repeat in [B, N, H, D] (``expand`` on a new axis after the kv heads, then ``reshape``),
    einsum, a plain causal mask (no decay)."""

    def attend(self, q, k, v):
        b, n, _, d = k.shape
        k, v = (t[:, :, :, None].expand(b, n, KV_HEADS, GROUP, d).reshape(b, n, HEADS, d) for t in (k, v))
        scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * torch.ones(n, n).tril()
        return torch.einsum("bhnm,bmhd->bnhd", scores, v)


class TiledRepeat(GroupedAttention):
    """``.repeat(1, G, 1, 1)`` tiles the kv heads (query head h reads kv head h mod Hkv), which is
    not the op's grouping (h // G): the repeat must stay, or the heads would be mixed up."""

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = k.repeat(1, GROUP, 1, 1), v.repeat(1, GROUP, 1, 1)
        return (((q @ k.transpose(-1, -2)) * _decay_mask(GAMMAS, q.shape[2])) @ v).transpose(1, 2)


# ----------------------------------------------------------------------------- helpers


def _model(cls, *args):
    torch.manual_seed(0)
    return cls(*args).eval()


def _inputs(length=LENGTH, seed=1):
    return (torch.randn(2, length, HIDDEN, generator=torch.Generator().manual_seed(seed)),)


def _op_nodes(graphs, op=torch.ops.lightning.attn.default):
    return [node for gm in graphs for node in gm.graph.nodes if node.op == "call_function" and node.target is op]


def _ops(graphs) -> set:
    return {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}


def _assert_same(got, want, tol=2e-5):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _assert_same_training(run, model, args):
    """One step through ``run`` and through ``model``: same output, input and parameter gradients."""
    results = []
    for fn in (run, model):
        model.zero_grad()
        leaves = [a.clone().requires_grad_() for a in args]
        out = fn(*leaves)
        out.square().sum().backward()
        grads = [leaf.grad for leaf in leaves] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((out, grads))
    (got, got_grads), (want, want_grads) = results
    _assert_same(got, want, tol=1e-4)
    assert len(got_grads) == len(want_grads)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _rewritten():
    return [r for r in report() if r.rewritten]


ENTRIES = ["export", "dynamo"]


# ----------------------------------------------------------------------------- 1. grouped heads


def _assert_grouped(graphs, kv_heads, decay_heads):
    """The op reads k and v with ``kv_heads`` heads and takes ``decay_heads`` decays (None: no
    decay), and nothing in the graphs repeats heads any more."""
    (node,) = _op_nodes(graphs)
    q, k, v, decay = (node.args[i].meta["val"] if node.args[i] is not None else None for i in range(4))
    assert (q.shape[1], k.shape[1], v.shape[1]) == (HEADS, kv_heads, kv_heads)
    assert (None if decay is None else decay.shape[0]) == decay_heads
    repeats = {"aten.repeat_interleave.self_int", "aten.expand.default", "aten.repeat.default"} & _ops(graphs)
    assert not repeats, repeats


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("cls,decay,shared", [
    (LlamaRepeatKV, [-math.log(g) for g in GAMMAS], False),
    (RepeatInterleaveKVDecay, [-math.log(g) for g in KV_GAMMAS for _ in range(GROUP)], True),
    (ExpandBNHD, None, True),
], ids=["llama_repeat_kv", "repeat_interleave_kv_decay", "expand_bnhd"])
def test_repeated_kv_heads_reach_the_op_grouped(cls, decay, shared, entry):
    model = _model(cls)
    run, graphs = _run(model, _inputs(), entry)
    with torch.no_grad():
        _assert_same(run(*_inputs()), model(*_inputs()))
    decay_heads = None if decay is None else KV_HEADS if shared else HEADS
    _assert_grouped(graphs, KV_HEADS, decay_heads)
    (record,) = _rewritten()
    assert record.kv_heads == KV_HEADS and record.shared_states == shared
    assert record.decay == (None if decay is None else pytest.approx(decay, rel=1e-5))
    assert f"{KV_HEADS} kv heads" in str(record)


@pytest.mark.parametrize("entry", ENTRIES)
def test_grouped_heads_train_and_hold_at_other_lengths(entry):
    model = _model(LlamaRepeatKV).train()
    run, graphs = _run(model, _inputs(), entry, dynamic=True, train=entry == "dynamo")
    for n in (LENGTH, 37):
        _assert_same_training(run, model, _inputs(n))
    assert _op_nodes(graphs) and all(n.args[1].meta["val"].shape[1] == KV_HEADS for n in _op_nodes(graphs))
    if entry == "dynamo":
        assert _op_nodes(graphs, torch.ops.lightning.attn_bwd.default)


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_tiled_repeat_keeps_its_repeat(entry):
    """Tiling is not the op's grouping: rewritten with the repeated k and v (H heads), which is
    what the model computes; the report claims no grouping."""
    model = _model(TiledRepeat)
    run, graphs = _run(model, _inputs(), entry)
    with torch.no_grad():
        _assert_same(run(*_inputs()), model(*_inputs()))
    (node,) = _op_nodes(graphs)
    assert node.args[1].meta["val"].shape[1] == HEADS
    (record,) = _rewritten()
    assert record.kv_heads is None


# ----------------------------------------------------------------------------- 2. a learnable decay


def _distance(n):
    i = torch.arange(n)
    return i[:, None] - i[None, :]


class SoftplusDecayRepeatKV(GroupedAttention):
    """A decay per query head trained through softplus (slopes = softplus(p)), the mask built in
    forward from it, k and v repeated by ``repeat_kv``: the op takes the live slopes and k, v grouped."""

    def __init__(self):
        super().__init__()
        self.decay_param = nn.Parameter(torch.tensor([-3.0, -2.0, -4.0, -1.5]))

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = repeat_kv(k, GROUP), repeat_kv(v, GROUP)
        slopes = F.softplus(self.decay_param)
        diff = _distance(q.shape[2])
        mask = torch.exp(-slopes[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
        return (((q @ k.transpose(-1, -2)) * mask) @ v).transpose(1, 2)


class SigmoidGammaEinsum(GroupedAttention):
    """RetNet-style gamma ** (t - s) with gamma = sigmoid(p) trained ([B, N, H, D], einsum, k and v
    repeated by ``repeat_interleave``): the op takes -log(gamma) live."""

    def __init__(self):
        super().__init__()
        self.gamma_logit = nn.Parameter(torch.tensor([2.5, 3.0, 3.5, 4.0]))

    def attend(self, q, k, v):
        k, v = k.repeat_interleave(GROUP, dim=2), v.repeat_interleave(GROUP, dim=2)
        gamma = torch.sigmoid(self.gamma_logit)
        diff = _distance(q.shape[1])
        mask = torch.where(diff >= 0, gamma[:, None, None] ** diff.clamp(min=0), 0.0)
        return torch.einsum("bhnm,bmhd->bnhd", torch.einsum("bnhd,bmhd->bhnm", q, k) * mask, v)


class RawSlopeParameter(GroupedAttention):
    """The slopes are the parameter itself: training can make one negative, where the model's mask
    grows and the op refuses it, so it is left alone."""

    def __init__(self):
        super().__init__()
        self.slopes = nn.Parameter(torch.tensor([0.05, 0.1, 0.02, 0.2]))

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = repeat_kv(k, GROUP), repeat_kv(v, GROUP)
        diff = _distance(q.shape[2])
        mask = torch.exp(-self.slopes[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
        return (((q @ k.transpose(-1, -2)) * mask) @ v).transpose(1, 2)


class DecayPerToken(GroupedAttention):
    """A decay computed from the input per token (a gate, as gated linear attention has): not one
    decay per head."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, HEADS)

    def forward(self, x):
        b, n, _ = x.shape
        q = F.silu(self.q(x)).view(b, n, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = (repeat_kv(t.transpose(1, 2), GROUP) for t in self.kv(x).view(b, n, 2, KV_HEADS, HEAD_DIM).unbind(2))
        cum = torch.cumsum(F.logsigmoid(self.gate(x)).transpose(1, 2), dim=-1)  # [B, H, N]
        diff = _distance(n)
        mask = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(diff < 0, float("-inf")))
        o = ((q @ F.silu(k).transpose(-1, -2)) * mask) @ v
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


def _step(parameter, size=0.5):
    """A large step on the decay's parameter alone: a decay baked in at its old value would show."""
    with torch.no_grad():
        parameter -= size * parameter.grad.sign()


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("cls,parameter,form", [
    (SoftplusDecayRepeatKV, "decay_param", "slope"),
    (SigmoidGammaEinsum, "gamma_logit", "lam"),
], ids=["softplus_slopes", "sigmoid_gamma"])
def test_a_learnable_decay_is_passed_live_and_trains(cls, parameter, form, entry):
    model = _model(cls).train()
    run, graphs = _run(model, _inputs(), entry, dynamic=entry == "export", train=entry == "dynamo")
    _assert_same_training(run, model, _inputs())
    assert getattr(model, parameter).grad.abs().min() > 0  # every head's decay gets a gradient
    _step(getattr(model, parameter))  # the rewritten model reads the parameter as it is now
    _assert_same_training(run, model, _inputs(seed=2))
    (record,) = _rewritten()
    assert record.live_decay is not None and record.kv_heads == KV_HEADS and not record.shared_states
    (node,) = {n for n in _op_nodes(graphs)}
    decay = node.args[3]
    assert isinstance(decay, torch.fx.Node) and decay.meta["val"].shape == (HEADS,)
    if entry == "dynamo":
        (backward,) = _op_nodes(graphs, torch.ops.lightning.attn_bwd.default)
        assert backward.kwargs.get("decay_grad", backward.args[-1] if len(backward.args) > 10 else None)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("cls,phrase", [
    (RawSlopeParameter, "below 0"),
    (DecayPerToken, "depends on the data"),
], ids=["raw_slope_parameter", "decay_per_token"])
def test_decays_the_op_cannot_take_live_are_left_alone(cls, phrase, entry):
    model = _model(cls)
    run, graphs = _run(model, _inputs(), entry)
    with torch.no_grad():
        _assert_same(run(*_inputs()), model(*_inputs()))
    assert not _op_nodes(graphs) and not _rewritten(), report()
    reasons = [r.reason for r in report()]
    assert any(phrase in reason for reason in reasons), reasons


# ----------------------------------------------------------------------------- 3. packed sequences


class PackedBySequenceIds(GroupedAttention):
    """Sequences packed in one row, masked per sequence: the decay mask times [ids_t == ids_s]. The
    ids are an input, so the mask's values are data the probes cannot prove for every input (ids
    that are not contiguous runs would be no cu_seqlens at all): left alone, not rewritten to
    cu_seqlens."""

    def forward(self, x, seq_ids):
        b, n, _ = x.shape
        q = F.silu(self.q(x)).view(b, n, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = (repeat_kv(t.transpose(1, 2), GROUP) for t in self.kv(x).view(b, n, 2, KV_HEADS, HEAD_DIM).unbind(2))
        same_sequence = seq_ids[:, None, :, None] == seq_ids[:, None, None, :]  # [B, 1, N, N]
        o = ((q @ F.silu(k).transpose(-1, -2)) * (_decay_mask(GAMMAS, n) * same_sequence)) @ v
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_mask_per_packed_sequence_is_left_alone(entry):
    model = _model(PackedBySequenceIds)
    args = (*_inputs(), torch.tensor([[0] * 7 + [1] * 13] * 2))
    run, graphs = _run(model, args, entry)
    with torch.no_grad():
        _assert_same(run(*args), model(*args))
    assert not _op_nodes(graphs) and not _rewritten(), report()
    reasons = [r.reason for r in report()]
    assert any("besides q, k and v" in reason for reason in reasons), reasons
