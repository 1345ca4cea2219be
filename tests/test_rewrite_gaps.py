"""The rewrite on what it used to miss (issue 23): weights that differ by head, outputs written into
uninitialised tensors, slopes read with ``.item()`` under ``torch.compile``, elementwise recurrences
under the backend, states carried in and returned, and refusals that say what they measured.

Each positive runs through ``lightning_op.rewrite`` (export) and ``torch.compile`` (the rewrite with
aot_eager behind it), and is compared with the model itself: outputs, and gradients where it trains.
Beside each, a look-alike that must stay as it was, with its reason.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_op
from lightning_op.rewrite import clear_report, make_backend, report

HIDDEN, HEADS, HEAD_DIM, LENGTH = 32, 2, 16, 20
SHORT = 10  # loops that are refused analyse every row: they run shorter
GAMMAS = (0.9, 0.97)
DECAY = [-math.log(g) for g in GAMMAS]


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    clear_report()
    yield
    torch._dynamo.reset()


def _gammas():
    return torch.tensor(GAMMAS)


def _decay_mask(n):
    """gamma_h ** (t - s) on and below the diagonal, zero above: [H, N, N]."""
    i = torch.arange(n)
    diff = i[:, None] - i[None, :]
    return _gammas()[:, None, None] ** diff.clamp(min=0) * (diff >= 0)


class Attention(nn.Module):
    """x [B, N, C] -> q, k, v [B, N, H, D] (silu on q and k) -> ``attend`` -> [B, N, C]. Models that
    carry a state take it as ``forward(x, state)`` and return ``(y, state)``."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HEADS * HEAD_DIM)
        self.out = nn.Linear(HEADS * HEAD_DIM, HIDDEN)

    def forward(self, x, state=None):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, HEAD_DIM).unbind(2)
        o = self.attend(F.silu(q), F.silu(k), v, *(() if state is None else (state,)))
        if isinstance(o, tuple):
            return self.out(o[0].reshape(b, n, -1)), o[1]
        return self.out(o.reshape(b, n, -1))


# ----------------------------------------------------------------------------- 1. weights per head


class HeadTemperature(Attention):
    """A temperature per head on the scores, a decay mask built in forward ([B, H, N, D])."""

    def __init__(self):
        super().__init__()
        self.register_buffer("temperature", torch.tensor([0.5, 2.0]))

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) * self.temperature[:, None, None]
        return ((scores * _decay_mask(q.shape[2])) @ v).transpose(1, 2)


class FrozenHeadOutputScale(Attention):
    """The cumsum form ([B, N, H, D]), its output scaled per head by a frozen parameter."""

    def __init__(self):
        super().__init__()
        self.head_scale = nn.Parameter(torch.tensor([3.0, 0.25]), requires_grad=False)

    def attend(self, q, k, v):
        kv = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=1)
        return torch.einsum("bnhd,bnhde->bnhe", q, kv) * self.head_scale[:, None]


class StepSSD(Attention):
    """A Mamba-2-style state-space layer in chunked form: x times a step dt per head, a decay
    exp(A dt) per step, C and B as q and k. With a constant dt (a buffer) it is decayed linear
    attention with weights dt per head; with dt computed from the input it is not."""

    chunk = 8

    def __init__(self, data_dependent=False):
        super().__init__()
        self.data_dependent = data_dependent
        self.to_dt = nn.Linear(HIDDEN, HEADS)
        self.register_buffer("A", -torch.tensor([0.5, 2.0]))
        self.register_buffer("dt", torch.tensor([0.1, 0.02]))

    def forward(self, x):
        b, n, _ = x.shape
        xs, B, C = self.qkv(x).view(b, n, 3, HEADS, HEAD_DIM).unbind(2)
        dt = F.softplus(self.to_dt(x)) if self.data_dependent else self.dt.expand(b, n, HEADS)
        log_decay = (self.A * dt).transpose(1, 2)  # [B, H, N]
        xs = xs * dt[..., None]
        c, width = n // self.chunk, self.chunk
        xs, B, C = (t.reshape(b, c, width, HEADS, HEAD_DIM) for t in (xs, B, C))
        within = torch.cumsum(log_decay.reshape(b, HEADS, c, width), dim=-1)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        weights = torch.exp((within[..., :, None] - within[..., None, :]).masked_fill(~causal, float("-inf")))
        y = torch.einsum("bcthn,bcshn,bhcts,bcshp->bcthp", C, B, weights, xs)
        chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", B, torch.exp(within[..., -1:] - within), xs)
        state, entering = torch.zeros_like(chunk_states[:, 0]), []
        for i in range(c):
            entering.append(state)
            state = torch.exp(within[:, :, i, -1])[..., None, None] * state + chunk_states[:, i]
        y = y + torch.einsum("bcthn,bchpn,bhct->bcthp", C, torch.stack(entering, 1), torch.exp(within))
        return self.out(y.reshape(b, n, HEADS, HEAD_DIM).reshape(b, n, -1))


class PositionGain(Attention):
    """v times a constant per position, not per head: no decay mask ([B, N, H, D])."""

    def attend(self, q, k, v):
        v = v * torch.linspace(0.5, 1.5, v.shape[1])[None, :, None, None]
        kv = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=1)
        return torch.einsum("bnhd,bnhde->bnhe", q, kv)


class ExclusiveCumsum(Attention):
    """The cumsum form shifted by one token: a position does not see itself ([B, N, H, D])."""

    def attend(self, q, k, v):
        kv = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=1) - k.unsqueeze(-1) * v.unsqueeze(-2)
        return torch.einsum("bnhd,bnhde->bnhe", q, kv)


class LearnedHeadScale(FrozenHeadOutputScale):
    """The output scale per head is trained: baking it would drop its gradient."""

    def __init__(self):
        super().__init__()
        self.head_scale.requires_grad_(True)


# ----------------------------------------------------------------------------- 2. uninitialised outputs


class TokenLoopInto(Attention):
    """The token-by-token recurrence, contracted elementwise, each row written into an output
    allocated without values (``empty_like``, ``torch.empty`` or ``new_empty``)."""

    def __init__(self, allocate="empty_like", rows=0):
        super().__init__()
        self.allocate, self.rows = allocate, rows  # rows: how many trailing rows stay unwritten

    def attend(self, q, k, v):
        b, n, h, d = q.shape
        out = {"empty_like": lambda: torch.empty_like(v), "empty": lambda: torch.empty(b, n, h, d),
               "new_empty": lambda: v.new_empty(b, n, h, d)}[self.allocate]()
        state = torch.zeros(b, h, d, d)
        for t in range(n - self.rows):
            state = _gammas()[None, :, None, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
            out[:, t] = (q[:, t, :, :, None] * state).sum(-2)
        return out


class PiecesInto(Attention):
    """Blocks written into ``zeros_like``; the state of earlier blocks enters undecayed, so the whole
    is no decayed attention, but each block's own part is."""

    block = 8

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        b, h, n, d = q.shape
        out, state = torch.zeros_like(v), torch.zeros(b, h, d, d)
        for start in range(0, n, self.block):
            qb, kb, vb = (t[:, :, start:start + self.block] for t in (q, k, v))
            own = (qb @ kb.transpose(-1, -2) * _decay_mask(qb.shape[2])) @ vb
            out[:, :, start:start + qb.shape[2]] = own + qb @ state
            state = state + kb.transpose(-1, -2) @ vb
        return out.transpose(1, 2)


class BlockLoop(Attention):
    """The chunked block loop of lightning-attention checkpoints, blocks written into
    ``torch.empty``, the state carried in (when given) and returned."""

    block = 8

    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", lightning_op.slopes(HEADS)[:, None, None])

    def attend(self, q, k, v, state=None):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        b, h, n, d = q.shape
        state = torch.zeros(b, h, d, d) if state is None else state
        out = torch.empty(b, h, n, d)
        for start in range(0, n, self.block):
            qb, kb, vb = (t[:, :, start:start + self.block] for t in (q, k, v))
            m = qb.shape[2]
            idx = torch.arange(m, dtype=q.dtype)
            diff = idx[:, None] - idx[None, :]
            intra = torch.exp(-self.slopes * diff).masked_fill(diff < 0, 0)
            q_decay = torch.exp(-self.slopes * (idx[:, None] + 1))
            k_decay = torch.exp(-self.slopes * (m - 1 - idx[:, None]))
            out[:, :, start:start + m] = (qb @ kb.transpose(-1, -2) * intra) @ vb + (qb * q_decay) @ state
            state = torch.exp(-self.slopes * m) * state + (kb * k_decay).transpose(-1, -2) @ vb
        return out.transpose(1, 2), state


# ----------------------------------------------------------------------------- 3, 4, 5. compile routes and states


class SlopesReadWithItem(Attention):
    """Slopes kept in a buffer and read one by one with ``.item()`` into the mask."""

    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", lightning_op.slopes(HEADS))

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        i = torch.arange(q.shape[2])
        distance = (i[:, None] - i[None, :]).float()
        mask = torch.stack([torch.exp(-s.item() * distance.clamp(min=0)) * (distance >= 0) for s in self.slopes])
        return ((q @ k.transpose(-1, -2)) * mask @ v).transpose(1, 2)


class TokenLoop(Attention):
    """The recurrence contracted elementwise (no matmul anywhere), the state carried in (when given)
    and returned (``returned``: "final", the state before the last token, or none)."""

    def __init__(self, returned="final"):
        super().__init__()
        self.returned = returned

    def attend(self, q, k, v, state=None):
        b, n, h, d = q.shape
        state = torch.zeros(b, h, d, d) if state is None else state
        outs, states = [], []
        for t in range(n):
            state = _gammas()[None, :, None, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
            outs.append((q[:, t, :, :, None] * state).sum(-2))
            states.append(state)
        o = torch.stack(outs, dim=1)
        return o if self.returned == "none" else (o, states[-1] if self.returned == "final" else states[-2])


class GatedTokenLoop(Attention):
    """The same recurrence with a decay computed from the data (a gate per token and head, as gated
    linear attention has)."""

    def __init__(self):
        super().__init__()
        self.to_gate = nn.Linear(HIDDEN, HEADS)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, HEAD_DIM).unbind(2)
        return self.out(self.attend(F.silu(q), F.silu(k), v, torch.sigmoid(self.to_gate(x))).reshape(b, n, -1))

    def attend(self, q, k, v, gate):  # gate: [B, N, H]
        b, n, h, d = q.shape
        state, outs = torch.zeros(b, h, d, d), []
        for t in range(n):
            state = gate[:, t, :, None, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
            outs.append((q[:, t, :, :, None] * state).sum(-2))
        return torch.stack(outs, dim=1)


class CumsumWithState(Attention):
    """The cumsum form, the state carried in added to every prefix, the last prefix returned."""

    def attend(self, q, k, v, state=None):
        kv = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=1)  # [B, N, H, D, D]
        if state is not None:
            kv = kv + state[:, None]
        return torch.einsum("bnhd,bnhde->bnhe", q, kv) * 0.25, kv[:, -1]


class UndecayedCarriedState(Attention):
    """A decayed mask for the new tokens, but the state carried in reaches every position
    undecayed: the op would decay it. Its decayed part alone is attention."""

    def attend(self, q, k, v, state):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        new = ((q @ k.transpose(-1, -2)) * _decay_mask(q.shape[2])) @ v
        return (new + q @ state).transpose(1, 2)


# ----------------------------------------------------------------------------- helpers


def _model(cls, *args):
    torch.manual_seed(0)
    return cls(*args).eval()


def _inputs(with_state, length=LENGTH):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, length, HIDDEN, generator=gen)
    return (x, torch.randn(2, HEADS, HEAD_DIM, HEAD_DIM, generator=gen)) if with_state else (x,)


def _compiled(model, backend=None, dynamic=False, train=False):
    """``torch.compile`` through the rewrite with aot_eager (or ``aot_autograd`` keeping the forward
    and backward graphs when training) behind it; the graphs it ran are appended to the list."""
    graphs = []

    def keep(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return gm

    def keep_rewritten(gm, example_inputs, **kwargs):
        compiled = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs, **kwargs)
        graphs.append(gm)  # once compiled: a graph whose compile makes dynamo trace again never runs
        return compiled

    if train:
        from torch._dynamo.backends.common import aot_autograd

        inner = aot_autograd(fw_compiler=keep, bw_compiler=keep)
    else:
        inner = keep_rewritten
    compile_ = backend or (lambda m, inner_: torch.compile(m, backend=make_backend(inner_), dynamic=dynamic))
    return compile_(model, inner), graphs


def _run(model, args, entry, dynamic=False, train=False):
    """(a callable running the rewritten model, the graphs it runs) through ``entry``: "export"
    (``lightning_op.rewrite`` of ``torch.export``) or "dynamo" (see ``_compiled``)."""
    if entry == "dynamo":
        return _compiled(model, dynamic=dynamic, train=train)
    shapes = None
    if dynamic:
        shapes = ({1: torch.export.Dim("n", min=4, max=256)},) + (None,) * (len(args) - 1)
    ep = lightning_op.rewrite(torch.export.export(model, args, dynamic_shapes=shapes))
    return ep.module(), [ep.graph_module]


def _calls(graphs, op=torch.ops.lightning.attn.default) -> int:
    return sum(node.op == "call_function" and node.target is op for gm in graphs for node in gm.graph.nodes)


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def _assert_same(got, want, tol=2e-5):
    for a, b in zip(_outputs(got), _outputs(want)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _assert_same_training(run, model, args):
    """One step through ``run`` and through ``model``: same outputs, input and weight gradients
    (a loss on every output: the state's gradient flows too)."""
    results = []
    for fn in (run, model):
        model.zero_grad()
        leaves = [a.clone().requires_grad_() for a in args]
        outs = _outputs(fn(*leaves))
        sum(o.square().sum() for o in outs).backward()
        grads = [leaf.grad for leaf in leaves] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((outs, grads))
    (got, got_grads), (want, want_grads) = results
    _assert_same(got, want, tol=1e-4)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _rewritten():
    return [r for r in report() if r.rewritten]


def _check(model, args, entry, dynamic=False):
    """Run ``model`` rewritten through ``entry``, inference; assert it calls the op once and agrees."""
    run, graphs = _run(model, args, entry, dynamic)
    with torch.no_grad():
        _assert_same(run(*args), model(*args))
    assert _calls(graphs) == 1, report()
    (record,) = _rewritten()
    return record, graphs


def _check_left_alone(model, args, entry, phrase, compare=slice(None)):
    """``model`` through ``entry`` computes what it computes (over positions ``compare``), calls no
    op, and a reason holds ``phrase``."""
    run, graphs = _run(model, args, entry)
    with torch.no_grad():
        got, want = _outputs(run(*args)), _outputs(model(*args))
    for a, b in zip(got, want):
        torch.testing.assert_close(a[:, compare], b[:, compare], rtol=1e-5, atol=1e-5)
    assert _calls(graphs) == 0 and not _rewritten(), report()
    reasons = [r.reason for r in report()]
    assert any(phrase in reason for reason in reasons), reasons
    return reasons


ENTRIES = ["export", "dynamo"]


# ----------------------------------------------------------------------------- 1. weights per head


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("cls,weights,decay", [
    (HeadTemperature, (0.5, 2.0), DECAY),
    (FrozenHeadOutputScale, (3.0, 0.25), None),
    (StepSSD, (0.1, 0.02), (0.05, 0.04)),  # weights dt, decay -A dt
], ids=["temperature", "frozen_output_scale", "ssd_constant_step"])
def test_weights_per_head_are_kept_in_q(cls, weights, decay, entry):
    model = _model(cls)
    record, graphs = _check(model, _inputs(False, 24), entry)
    assert record.head_weights == pytest.approx(weights, rel=1e-5) and record.scale == 1.0
    assert record.decay == (None if decay is None else pytest.approx(decay, rel=1e-5))
    assert "scale per head [" in str(record)


@pytest.mark.parametrize("entry", ENTRIES)
def test_weights_per_head_train_and_hold_at_other_lengths(entry):
    model = _model(HeadTemperature).train()
    run, graphs = _run(model, _inputs(False), entry, dynamic=True, train=entry == "dynamo")
    for n in (LENGTH, 37):
        _assert_same_training(run, model, _inputs(False, n))
    assert _calls(graphs) >= 1 and [r.head_weights for r in _rewritten()][0] == pytest.approx((0.5, 2.0))
    if entry == "dynamo":
        assert _calls(graphs, torch.ops.lightning.attn_bwd.default) >= 1


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("cls,phrase", [
    (PositionGain, "not a function of t - s"),
    (lambda: StepSSD(data_dependent=True), "depends on the data"),
], ids=["per_position_gain", "ssd_step_from_the_data"])
def test_weights_that_are_not_per_head_constants_are_left_alone(cls, phrase, entry):
    _check_left_alone(_model(cls), _inputs(False, 24), entry, phrase)


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_trained_weight_per_head_stays_outside_the_op_and_trains(entry):
    """Baked into the op, the scale would get no gradient: the attention before it is rewritten."""
    model = _model(LearnedHeadScale).train()
    run, graphs = _run(model, _inputs(False), entry, train=entry == "dynamo")
    _assert_same_training(run, model, _inputs(False))
    (record,) = _rewritten()
    assert _calls(graphs) == 1 and record.head_weights is None and record.scale == 1.0


# ----------------------------------------------------------------------------- 2. uninitialised outputs


@pytest.mark.parametrize("allocate,entry", [("empty_like", "export"), ("empty_like", "dynamo"), ("empty", "dynamo"),
                                            ("new_empty", "export")])
def test_outputs_written_into_uninitialised_tensors(allocate, entry):
    record, _ = _check(_model(TokenLoopInto, allocate), _inputs(False), entry)
    assert record.decay == pytest.approx(DECAY, rel=1e-5)


@pytest.mark.parametrize("entry", ENTRIES)
def test_the_pieces_of_a_refused_loop_written_into_a_tensor_train(entry, caplog):
    """Functionalized, the writes are ``aten.copy``, which autograd cannot differentiate: where the
    rewrite replaces pieces and leaves the writes, it makes them differentiable (else the rewritten
    graph fails to compile behind the backend and the original runs, and an exported program fails
    its backward). Candidates around the pieces are probed without internal errors (``zeros_like(v)``
    keeps v's layout, which a later ``view`` needs)."""
    model = _model(PiecesInto).train()
    args = _inputs(False, 16)  # two blocks
    with caplog.at_level(logging.WARNING, logger="lightning_op.rewrite"):
        run, graphs = _run(model, args, entry, train=entry == "dynamo")
        _assert_same_training(run, model, args)
    assert _calls(graphs) == 2 and len(_rewritten()) == 2, report()
    if entry == "dynamo":
        assert _calls(graphs, torch.ops.lightning.attn_bwd.default) == 2
    assert not caplog.messages, caplog.messages  # no internal error, no failed compile


@pytest.mark.parametrize("entry", ENTRIES)
def test_an_output_left_partly_unwritten_is_left_alone(entry):
    """The last row is never written: what it holds is undefined, so the op's row there is not the
    model's. The probes see it as zeros, where attention is not."""
    _check_left_alone(_model(TokenLoopInto, "empty_like", 1), _inputs(False, SHORT), entry,
                      f"position t = {SHORT - 1} gives position 0 weight 0", compare=slice(0, SHORT - 1))


# ----------------------------------------------------------------------------- 3. .item() under torch.compile


def test_compile_entry_point_rewrites_slopes_read_with_item():
    from lightning_op.rewrite import compile as compile_rewritten

    model = _model(SlopesReadWithItem).train()
    assert not torch._dynamo.config.capture_scalar_outputs
    compiled, graphs = _compiled(model, backend=lambda m, inner: compile_rewritten(m, inner=inner), train=True)
    _assert_same_training(compiled, model, _inputs(False))
    assert _calls(graphs) == 1 and _calls(graphs, torch.ops.lightning.attn_bwd.default) == 1
    (record,) = report()
    assert record.rewritten and record.decay == pytest.approx(lightning_op.slopes(HEADS).tolist(), rel=1e-5)
    assert not torch._dynamo.config.capture_scalar_outputs  # set for its own frames only


def test_plain_torch_compile_says_why_a_mask_from_item_is_left_alone():
    model = _model(SlopesReadWithItem)
    compiled, graphs = _compiled(model)
    with torch.no_grad():
        _assert_same(compiled(*_inputs(False)), model(*_inputs(False)))
    assert _calls(graphs) == 0 and not _rewritten()
    assert any("inputs of this graph" in r.reason and "from lightning_op.rewrite import compile" in r.reason
               for r in report()), report()


# ----------------------------------------------------------------------------- 4. elementwise recurrences


def test_the_backend_rewrites_an_elementwise_recurrence_and_trains():
    model = _model(TokenLoop, "none").train()
    compiled, graphs = _compiled(model, train=True)
    _assert_same_training(compiled, model, _inputs(False))
    assert _calls(graphs) == 1 and _calls(graphs, torch.ops.lightning.attn_bwd.default) == 1
    assert [r.stage for r in _rewritten()] == ["dynamo"]


def test_an_elementwise_recurrence_with_a_gate_from_the_data_is_left_alone():
    _check_left_alone(_model(GatedTokenLoop), _inputs(False, SHORT), "dynamo", "depends on the data")


# ----------------------------------------------------------------------------- 5. states carried in and returned


# each model through both entry points, with and without a state carried in
STATEFUL = [(TokenLoop, False, "dynamo"), (TokenLoop, True, "export"), (BlockLoop, False, "export"),
            (BlockLoop, True, "dynamo"), (CumsumWithState, False, "dynamo"), (CumsumWithState, True, "export")]


@pytest.mark.parametrize("cls,with_state,entry", STATEFUL,
                         ids=[f"{c.__name__}-{'carried' if w else 'fresh'}-{e}" for c, w, e in STATEFUL])
def test_states_carried_in_and_returned_run_on_the_op(cls, with_state, entry):
    """The op's initial_state and final state replace the model's: nothing of the recurrence is left
    in the graph (no product of activations besides the projections), outputs and gradients agree.
    (The block loop writes its blocks into ``torch.empty``.)"""
    model = _model(cls).train()
    args = _inputs(with_state, 12)  # two blocks of the block loop
    run, graphs = _run(model, args, entry, train=entry == "dynamo")
    _assert_same_training(run, model, args)
    (record,) = _rewritten()
    assert any(s.startswith("final state") for s in record.states), record
    assert any(s.startswith("initial state") for s in record.states) == with_state, record
    forward = graphs[0].graph
    products = [n for n in forward.nodes if n.op == "call_function" and "mul" in str(n.target)]
    assert len(products) <= 4, forward  # a token loop multiplied 3 N times


def test_a_returned_state_checked_at_other_lengths():
    model = _model(CumsumWithState)
    run, graphs = _run(model, _inputs(True), "export", dynamic=True)
    with torch.no_grad():
        for n in (LENGTH, 131):
            _assert_same(run(*_inputs(True, n)), model(*_inputs(True, n)))
    (record,) = _rewritten()
    assert _calls(graphs) == 1 and len(record.states) == 2, record


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_returned_state_that_is_not_the_final_one_keeps_its_computation(entry):
    record, _ = _check(_model(TokenLoop, "before_last"), _inputs(False, 12), entry)
    assert record.states == () and any("keeps its computation" in note for note in record.notes), record


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_carried_state_the_op_would_decay_otherwise_is_not_its_initial_state(entry):
    """Only the new tokens' attention is rewritten (a region of its own); the state's term stays."""
    model = _model(UndecayedCarriedState)
    args = _inputs(True)
    run, graphs = _run(model, args, entry)
    with torch.no_grad():
        _assert_same(run(*args), model(*args))
    (record,) = _rewritten()
    assert _calls(graphs) == 1 and record.states == (), report()
    assert any("the state carried in" in note and "A * lam^(t+1) predicts" in note for note in record.notes), record


# ----------------------------------------------------------------------------- 7. messages


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("cls,measured", [
    (PositionGain, "position t = 10 gives position 10 weight 1.026, where position 0 gives position 0 0.5"),
    (ExclusiveCumsum, "position 0 gives itself weight 0"),
], ids=["per_position_gain", "exclusive_cumsum"])
def test_refusals_say_what_they_measured_in_the_models_terms(cls, measured, entry):
    """In the [B, N, H, D] layout the reason names positions and heads as the model has them, with
    the weights measured; where both readings of the layout fail alike (the exclusive cumsum), the
    one reading the sequence along N tells, not numbers read along the head axis."""
    reasons = _check_left_alone(_model(cls), _inputs(False), entry, measured)
    assert any(f"(read as [B, N, H, D]: H = {HEADS} heads, N = {LENGTH} positions)" in r for r in reasons), reasons
