"""Masks that change with the sequence length: a sliding window (plain or decayed; built from a
comparison, from tril/triu, on the scores, or sliced from a buffer) is causal attention at every
length up to its window and something else past it. A graph traced with a symbolic length runs at
every length its range allows, so the rewrite must leave such a window alone (saying why), while
true causal decay masks, built in forward or sliced from a buffer, are still rewritten and agree
with eager far past the lengths they were traced and probed at.

Models are traced at N = 20, shorter than every window here, so a window shows only at lengths
the rewrite probes beyond the one it was given.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_op
from lightning_op.rewrite import clear_report, make_backend, report

HIDDEN, HEADS, HEAD_DIM = 32, 2, 16
TRACE_LENGTH = 20
GAMMAS = (0.9, 0.97)


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    clear_report()
    yield
    torch._dynamo.reset()


def _positions(n):
    i = torch.arange(n)
    return i[:, None] - i[None, :]


def _decay(n, gammas=GAMMAS):
    """gamma_h ** (t - s) on and below the diagonal, zero above: [H, N, N]."""
    diff = _positions(n)
    return torch.tensor(gammas)[:, None, None] ** diff.clamp(min=0) * (diff >= 0)


class Attention(nn.Module):
    """x [B, N, C] -> q, k, v [B, H, N, D] -> ``attend`` -> [B, N, C]."""

    def __init__(self, window: int = 0):
        super().__init__()
        self.window = window
        self.qkv = nn.Linear(HIDDEN, 3 * HEADS * HEAD_DIM)
        self.out = nn.Linear(HEADS * HEAD_DIM, HIDDEN)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, HEAD_DIM).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return self.out(self.attend(q, k, v).transpose(1, 2).reshape(b, n, -1))


# ----------------------------------------------------------------------------- sliding windows


class WindowComparison(Attention):
    """``(i - j) < w`` and ``>= 0`` as a float mask."""

    def attend(self, q, k, v):
        diff = _positions(q.shape[2])
        mask = ((diff >= 0) & (diff < self.window)).float()
        return ((q @ k.transpose(-1, -2)) * mask) @ v


class DecayedWindowComparison(Attention):
    """A per-head decay cut off ``w`` tokens back, by ``where``."""

    def attend(self, q, k, v):
        diff = _positions(q.shape[2])
        mask = torch.where(diff < self.window, _decay(q.shape[2]), 0.0)
        return ((q @ k.transpose(-1, -2)) * mask) @ v


class WindowTrilDifference(Attention):
    """``ones(n, n).tril() - ones(n, n).tril(-w)``."""

    def attend(self, q, k, v):
        n = q.shape[2]
        mask = torch.ones(n, n).tril() - torch.ones(n, n).tril(-self.window)
        return ((q @ k.transpose(-1, -2)) * mask) @ v


class DecayedBandTriu(Attention):
    """A decay mask times the band ``ones(n, n).tril().triu(-(w - 1))``, scale on q."""

    def attend(self, q, k, v):
        n = q.shape[2]
        band = torch.ones(n, n).tril().triu(-(self.window - 1))
        return (((q * HEAD_DIM ** -0.5) @ k.transpose(-1, -2)) * (_decay(n) * band)) @ v


class WindowOnTheScores(Attention):
    """The window cut from the scores themselves: ``scores.tril() - scores.tril(-w)``."""

    def attend(self, q, k, v):
        scores = q @ k.transpose(-1, -2)
        return (scores.tril() - scores.tril(-self.window)) @ v


class WindowBuffer(Attention):
    """A band mask in a registered buffer of 512, sliced to N, applied by masked_fill."""

    def __init__(self, window: int = 0, length: int = 512):
        super().__init__(window)
        diff = _positions(length)
        self.register_buffer("band", (diff >= 0) & (diff < window))

    def attend(self, q, k, v):
        n = q.shape[2]
        return (q @ k.transpose(-1, -2)).masked_fill(~self.band[:n, :n], 0.0) @ v


class DecayedWindowBuffer(Attention):
    """A decayed band in a buffer of 128 (so N <= 128), sliced with ``self.mask[:, :n, :n]``."""

    def __init__(self, window: int = 0, length: int = 128):
        super().__init__(window)
        self.register_buffer("mask", _decay(length) * (_positions(length) < window))

    def attend(self, q, k, v):
        n = q.shape[2]
        return ((q @ k.transpose(-1, -2)) * self.mask[:, :n, :n]) @ v


WINDOWS = [  # model, window, a length past the window the graph can run at
    (WindowComparison, 38, 300),
    (WindowComparison, 64, 300),
    (WindowComparison, 100, 300),
    (DecayedWindowComparison, 38, 300),
    (DecayedWindowComparison, 200, 300),  # past every small length probed: only the constant tells
    (WindowTrilDifference, 64, 300),
    (DecayedBandTriu, 100, 300),
    (WindowOnTheScores, 38, 300),
    (WindowBuffer, 64, 300),
    (WindowBuffer, 300, 400),  # in a buffer of 512: past the small lengths, short of the buffer
    (DecayedWindowBuffer, 100, 127),  # export leaves N = 128 out of the range
]
# through torch.compile too: one of each way of building the mask (the graphs differ little)
DYNAMO_WINDOWS = {(WindowComparison, 64), (DecayedWindowComparison, 200), (WindowTrilDifference, 64),
                  (WindowOnTheScores, 38), (WindowBuffer, 300), (DecayedWindowBuffer, 100)}
WINDOW_CASES = [(cls, window, past, entry) for cls, window, past in WINDOWS for entry in ("export", "dynamo")
                if entry == "export" or (cls, window) in DYNAMO_WINDOWS]
WINDOW_IDS = [f"{cls.__name__}-{window}-{entry}" for cls, window, _, entry in WINDOW_CASES]


# ----------------------------------------------------------------------------- causal masks


class DecayInForward(Attention):
    """The per-head decay built in forward: rewritten."""

    def attend(self, q, k, v):
        return ((q @ k.transpose(-1, -2)) * _decay(q.shape[2])) @ v


class DecayFromAFilledLogMask(Attention):
    """The log-mask filled with -1e9 above the diagonal, then exp: -1e9 stands for minus
    infinity, no length to probe past. Rewritten."""

    def attend(self, q, k, v):
        diff = _positions(q.shape[2])
        log_mask = (torch.log(torch.tensor(GAMMAS))[:, None, None] * diff).masked_fill(diff < 0, -1e9)
        return ((q @ k.transpose(-1, -2)) * torch.exp(log_mask)) @ v


class CausalBuffer(Attention):
    """A bool tril buffer of 512 sliced to N, by masked_fill: rewritten (the window of 512 is the
    buffer's length, and N cannot pass it)."""

    def __init__(self, length: int = 512):
        super().__init__()
        self.register_buffer("causal", torch.ones(length, length, dtype=torch.bool).tril())

    def attend(self, q, k, v):
        n = q.shape[2]
        return (q @ k.transpose(-1, -2)).masked_fill(~self.causal[:n, :n], 0.0) @ v


class LongDecayBuffer(Attention):
    """A decay mask buffer of 2048 (a model's maximum length) sliced to N: too large to probe the
    whole region at 2048, so the mask alone is checked there. Slow decays, so that a window cuts
    off weights that still count."""

    def __init__(self, window: int = 4096, length: int = 2048):
        super().__init__(window)
        self.register_buffer("mask", _decay(length, (0.999, 0.9999)) * (_positions(length) < window))

    def attend(self, q, k, v):
        n = q.shape[2]
        return ((q @ k.transpose(-1, -2)) * self.mask[:, :n, :n]) @ v


# ----------------------------------------------------------------------------- helpers


def _model(cls, *args):
    torch.manual_seed(0)
    return cls(*args).eval()


def _traced(model, entry, dynamic=True, length=TRACE_LENGTH):
    """(a callable running the rewritten graph, the graph modules it runs) through ``entry``:
    "export" (``lightning_op.rewrite`` of an export, with a symbolic length unless not ``dynamic``) or "dynamo"
    (``torch.compile`` with the rewrite and aot_eager behind it)."""
    x = torch.randn(2, length, HIDDEN)
    if entry == "export":
        # AUTO: a mask buffer bounds the range by its length (an unbounded Dim fails to export)
        shapes = ({1: torch.export.Dim.AUTO},) if dynamic else None
        program = lightning_op.rewrite(torch.export.export(model, (x,), dynamic_shapes=shapes))
        return program.module(), [program.graph_module]
    graphs = []

    def keep(gm, example_inputs, **kwargs):
        compiled = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs, **kwargs)
        graphs.append(gm)  # once compiled: a graph whose compile makes dynamo trace again never runs
        return compiled

    compiled = torch.compile(model, backend=make_backend(keep), dynamic=dynamic, fullgraph=True)
    with torch.no_grad():
        compiled(x)  # compile now, at the traced length
    return compiled, graphs


def _op_calls(graphs) -> int:
    return sum(node.op == "call_function" and node.target is torch.ops.lightning.attn.default
               for gm in graphs for node in gm.graph.nodes)


def _assert_matches_eager(run, model, lengths):
    with torch.no_grad():
        for n in lengths:
            x = torch.randn(2, n, HIDDEN)  # export specialises the batch of 2
            torch.testing.assert_close(run(x), model(x), rtol=1e-4, atol=1e-4, msg=lambda m: f"N = {n}: {m}")


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("cls,window,past,entry", WINDOW_CASES, ids=WINDOW_IDS)
def test_sliding_windows_with_a_symbolic_length_are_left_alone(cls, window, past, entry):
    model = _model(cls, window)
    run, graphs = _traced(model, entry)
    assert _op_calls(graphs) == 0, report()
    assert not any(r.rewritten for r in report()), report()
    assert any("sequence length" in r.reason for r in report()), report()
    _assert_matches_eager(run, model, [TRACE_LENGTH, past])


@pytest.mark.parametrize("entry", ["export", "dynamo"])
@pytest.mark.parametrize("cls", [DecayInForward, DecayFromAFilledLogMask, CausalBuffer])
def test_causal_masks_with_a_symbolic_length_are_rewritten(cls, entry):
    model = _model(cls)
    run, graphs = _traced(model, entry)
    assert _op_calls(graphs) == 1, report()
    (record,) = report()
    assert record.rewritten
    _assert_matches_eager(run, model, [7, TRACE_LENGTH, 131, 300, 511 if cls is CausalBuffer else 700])


def test_a_long_mask_buffer_is_checked_alone_at_its_length():
    """Probing the whole region at N = 2048 is too costly; the mask sliced to 2048 is a decay
    continued from the one at the traced length, so the region is rewritten."""
    model = _model(LongDecayBuffer)
    run, graphs = _traced(model, "export")
    assert _op_calls(graphs) == 1, report()
    _assert_matches_eager(run, model, [TRACE_LENGTH, 300, 2047])


def test_a_window_inside_a_long_mask_buffer_is_found_by_the_mask_alone():
    model = _model(LongDecayBuffer, 1500)
    run, graphs = _traced(model, "export")
    assert _op_calls(graphs) == 0, report()
    (record,) = report()
    assert not record.rewritten and "sliding window" in record.reason, record
    _assert_matches_eager(run, model, [1600])


def test_a_window_past_what_can_be_probed_is_left_alone():
    """A window of 3000 built in forward: neither the region nor its mask can be evaluated past
    it at a reasonable cost, so nothing proves the mask for every length."""
    model = _model(DecayedWindowComparison, 3000)
    run, graphs = _traced(model, "export")
    assert _op_calls(graphs) == 0, report()
    (record,) = report()
    assert not record.rewritten and "too large" in record.reason, record
    _assert_matches_eager(run, model, [TRACE_LENGTH])


@pytest.mark.parametrize("entry", ["export", "dynamo"])
def test_static_lengths_are_probed_at_their_one_length(entry):
    """A static graph runs at its traced length only: a window of 100 at N = 300 shows in the
    full-size probe and is left alone; a window of 64 at N = 20 never bites and is rewritten."""
    model = _model(DecayedWindowComparison, 100)
    run, graphs = _traced(model, entry, dynamic=False, length=300)
    assert _op_calls(graphs) == 0 and not any(r.rewritten for r in report()), report()
    _assert_matches_eager(run, model, [300])
    clear_report()
    torch._dynamo.reset()
    model = _model(DecayedWindowComparison, 64)
    run, graphs = _traced(model, entry, dynamic=False)
    assert _op_calls(graphs) == 1, report()
    _assert_matches_eager(run, model, [TRACE_LENGTH])


@pytest.mark.slow
def test_lightning_backend_leaves_a_window_alone():
    """``backend="lightning"`` (Inductor behind the rewrite) with a dynamic length."""
    model = _model(WindowComparison, 64)
    compiled = torch.compile(model, backend="lightning", dynamic=True)
    with torch.no_grad():
        compiled(torch.randn(2, TRACE_LENGTH, HIDDEN))
    assert not any(r.rewritten for r in report()) and any("sequence length" in r.reason for r in report())
    _assert_matches_eager(compiled, model, [300])


def test_mask_rates_are_read_across_the_verified_length():
    """The geometric continuation of a float32 decay: rates close to 1 extrapolated far."""
    from lightning_op.rewrite.lengths import _geometric_rate

    lam = torch.tensor([1 - 2.0 ** -12, 0.5], dtype=torch.float32)
    side = (lam[:, None] ** torch.arange(20)).double()
    rate = _geometric_rate(side, 2e-4)
    torch.testing.assert_close(rate, lam.double(), rtol=1e-6, atol=0)
    far = (lam[:, None] ** torch.arange(4000)).double()
    assert (far - side[:, :1] * rate[:, None] ** torch.arange(4000)).abs().max() < 1e-5
    assert _geometric_rate(torch.tensor([[1.0, 1.0, 0.0]]), 1e-7) is None  # a cut-off: no rate
    assert math.isclose(float(_geometric_rate(torch.tensor([[0.0, 0.0, 0.0]]), 1e-7)), 0.0)
