"""The rewrite of packed batches into ``cu_seqlens`` (issue 23, item 6): sequences back to back in
one row, masked per sequence with ids computed from their boundaries in the graph.

The mask's values are data, so the rewrite rests on structure (``lightning_op/rewrite/packing.py``):
ids from ``searchsorted`` / ``bucketize`` of the positions are runs, the mask keeps each position
pair in place, and probes pin the rest. Each positive runs through ``lightning_op.rewrite``
(export, the length and the number of sequences dynamic) and ``torch.compile`` (dynamic), at
packings other than the traced one (empty sequences, one-token sequences, boundaries outside the
row), against the model itself; and trains. Beside them the look-alikes that must stay as they were.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_op
from lightning_op.rewrite import report
from test_rewrite_forms import GAMMAS, GROUP, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, _decay_mask, repeat_kv
from test_rewrite_gaps import _compiled, _fresh  # noqa: F401  (_fresh: an autouse fixture, active here too)

SLOPES = [-math.log(g) for g in GAMMAS]


class Packed(nn.Module):
    """x [1, N, C] holding several sequences back to back, their boundaries ``cu_seqlens`` [S + 1];
    q [1, H, N, D], k and v with fewer heads repeated as Llama does; the decay mask of each query
    head times ``same`` (``ids[t] == ids[s]``), as ``mask`` builds it."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(HIDDEN, HEADS * HEAD_DIM)
        self.kv = nn.Linear(HIDDEN, 2 * KV_HEADS * HEAD_DIM)
        self.out = nn.Linear(HEADS * HEAD_DIM, HIDDEN)

    def forward(self, x, bounds):
        b, n, _ = x.shape
        q = F.silu(self.q(x)).view(b, n, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, KV_HEADS, HEAD_DIM).unbind(2)
        k, v = (repeat_kv(t.transpose(1, 2), GROUP) for t in (F.silu(k), v))
        ids = self.ids(bounds, n)
        o = self.attend(q, k, v, ids[:, None] == ids[None, :])
        return self.out(o.transpose(1, 2).reshape(b, n, -1))

    def attend(self, q, k, v, same):
        return ((q @ k.transpose(-1, -2)) * self.mask(same, q.shape[2])) @ v

    def ids(self, cu_seqlens, n):
        return torch.searchsorted(cu_seqlens, torch.arange(n), right=True)

    def mask(self, same, n):
        return _decay_mask(GAMMAS, n) * same


class WhereExpLeftSide(Packed):
    """Ids from ``searchsorted`` on the left side (runs start one past each boundary), the mask
    from ``where`` over ``same & causal`` and ``exp`` of the distance."""

    def ids(self, cu_seqlens, n):
        return torch.searchsorted(cu_seqlens, torch.arange(n)).to(torch.int32) - 1

    def mask(self, same, n):
        t = torch.arange(n)
        gap = (t[:, None] - t[None, :]).float()
        slopes = torch.tensor(SLOPES)[:, None, None]
        return torch.where(same & (gap >= 0), torch.exp(-slopes * gap), 0.0)


class FromLengths(Packed):
    """The lengths [S] come in; the boundaries are their cumulative sums, the ids a ``bucketize``."""

    def ids(self, lengths, n):
        return torch.bucketize(torch.arange(n), lengths.cumsum(0), right=True)


# ----------------------------------------------------------------------------- look-alikes


class IdsGiven(Packed):
    """The ids come in as data: they need not be runs ([0, 1, 0] is no cu_seqlens)."""

    def ids(self, ids, n):
        return ids


class WholeSequence(Packed):
    """Each sequence attends to all of itself (no causal mask inside it)."""

    def mask(self, same, n):
        t = torch.arange(n)
        gap = (t[:, None] - t[None, :]).abs()
        return torch.tensor(GAMMAS)[:, None, None] ** gap * same


class Leaky(Packed):
    """Positions of other sequences are read at half weight, not masked out."""

    def mask(self, same, n):
        return _decay_mask(GAMMAS, n) * torch.where(same, 1.0, 0.5)


class Rolled(Packed):
    """``same`` rolled by one key: all true for one sequence, something else for several."""

    def mask(self, same, n):
        return _decay_mask(GAMMAS, n) * same.roll(1, -1)


class ReadBeside(Packed):
    """The packed scores and, beside them, the same scores over one sequence: the two cancel where
    there is one sequence, not where there are several."""

    def attend(self, q, k, v, same):
        scores, n = q @ k.transpose(-1, -2), q.shape[2]
        packed = scores * self.mask(same, n)
        return (2 * packed - scores * _decay_mask(GAMMAS, n)) @ v


class ShuffledPositions(Packed):
    """Ids of the positions read backwards: runs, but not at the boundaries' positions."""

    def ids(self, cu_seqlens, n):
        return torch.searchsorted(cu_seqlens, torch.arange(n).flip(0), right=True)


# ----------------------------------------------------------------------------- helpers


def _model(cls):
    torch.manual_seed(0)
    return cls().eval()


def _bounds(cls, lengths):
    if cls is FromLengths:
        return torch.tensor(lengths)
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def _args(cls, lengths, seed=1, batch=1):
    x = torch.randn(batch, sum(lengths), HIDDEN, generator=torch.Generator().manual_seed(seed))
    return x, _bounds(cls, lengths)


def _run(model, args, entry, train=False):
    """(a callable running the rewritten model, the graphs it runs), dynamic in the length and in the
    number of sequences."""
    if entry == "dynamo":
        return _compiled(model, dynamic=True, train=train)
    rows, count = torch.export.Dim("rows", min=4, max=4096), torch.export.Dim("count", min=2, max=512)
    ep = lightning_op.rewrite(torch.export.export(model, args, dynamic_shapes=({1: rows}, {0: count})))
    return ep.module(), [ep.graph_module]


def _run_static(model, args, entry):
    """(a callable running the rewritten model, the graphs it runs), traced at the given sizes."""
    if entry == "export":
        ep = lightning_op.rewrite(torch.export.export(model, args))
        return ep.module(), [ep.graph_module]
    return _compiled(model)


def _op_nodes(graphs):
    return [n for gm in graphs for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.lightning.attn.default]


def _rewritten():
    return [r for r in report() if r.rewritten]


TRACED = [7, 13, 4]
PACKINGS = [[7, 13, 4], [30], [0, 5, 0, 1, 17], [1, 1, 1, 1], [64, 65, 3]]
ENTRIES = ["export", "dynamo"]


# ----------------------------------------------------------------------------- rewritten


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("cls", [Packed, WhereExpLeftSide, FromLengths])
def test_a_mask_per_packed_sequence_becomes_cu_seqlens(cls, entry):
    model = _model(cls)
    run, graphs = _run(model, _args(cls, TRACED), entry)
    with torch.no_grad():
        for lengths in PACKINGS:
            args = _args(cls, lengths, seed=len(lengths))
            torch.testing.assert_close(run(*args), model(*args), rtol=2e-5, atol=2e-5)
    nodes, records = _op_nodes(graphs), _rewritten()  # dynamo may compile again for one sequence
    assert nodes and len(records) == len(nodes), report()
    for node, record in zip(nodes, records):
        assert node.args[6] is not None  # cu_seqlens
        assert node.args[1].meta["val"].shape[1] == KV_HEADS  # the repeat of kv heads is gone as well
        assert "packed sequences" in str(record)


@pytest.mark.parametrize("entry", ENTRIES)
def test_boundaries_outside_the_row_and_repeated_ones_are_the_models_runs(entry):
    """searchsorted gives positions before the first boundary, and after the last, runs of their own;
    repeated boundaries are empty sequences: the op's cu_seqlens keep all of that."""
    model = _model(Packed)
    run, _ = _run(model, _args(Packed, TRACED), entry)
    x = _args(Packed, [40])[0]
    with torch.no_grad():
        for bounds in ([5, 12, 12, 30], [-3, 8, 60], [0, 40, 40], [15, 20]):
            bounds = torch.tensor(bounds)
            torch.testing.assert_close(run(x, bounds), model(x, bounds), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_packed_batch_trains(entry):
    model = _model(Packed).train()
    run, graphs = _run(model, _args(Packed, TRACED), entry, train=entry == "dynamo")
    for lengths in ([7, 13, 4], [0, 33, 1]):
        x, bounds = _args(Packed, lengths)
        results = []
        for fn in (run, model):
            model.zero_grad()
            leaf = x.clone().requires_grad_()
            out = fn(leaf, bounds)
            out.square().sum().backward()
            results.append((out, [leaf.grad] + [p.grad.clone() for p in model.parameters()]))
        (got, got_grads), (want, want_grads) = results
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert _op_nodes(graphs)


# ----------------------------------------------------------------------------- left alone


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("cls,bounds,phrase", [
    (IdsGiven, torch.tensor([0] * 7 + [1] * 13 + [2] * 4), "may not be runs"),
    (WholeSequence, None, "non-causal"),
    (Leaky, None, "0 where they do not"),
    (Rolled, None, "does not keep each position (t, s) in its place"),
    (ReadBeside, None, "reads the scores elsewhere too"),
    (ShuffledPositions, None, "other values than the positions"),
], ids=["ids_given", "whole_sequence", "leaky", "rolled", "read_beside", "shuffled_positions"])
def test_packed_look_alikes_are_left_alone(cls, bounds, phrase, entry):
    model = _model(cls)
    x, cu = _args(cls, TRACED)
    bounds = cu if bounds is None else bounds
    run, graphs = _run_static(model, (x, bounds), entry)
    with torch.no_grad():
        torch.testing.assert_close(run(x, bounds), model(x, bounds), rtol=1e-5, atol=1e-5)
    assert not _op_nodes(graphs) and not _rewritten(), report()
    reasons = [r.reason for r in report()]
    assert any(phrase in reason for reason in reasons), reasons


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_packed_mask_over_a_batch_of_rows_is_left_alone(entry):
    """The op takes packed sequences in a batch of one; two rows sharing one packing stay as they are."""
    model = _model(Packed)
    x, cu = _args(Packed, TRACED, batch=2)
    run, graphs = _run_static(model, (x, cu), entry)
    with torch.no_grad():
        torch.testing.assert_close(run(x, cu), model(x, cu), rtol=1e-5, atol=1e-5)
    assert not _op_nodes(graphs)
    assert any("batch of 2 rows" in r.reason for r in report()), report()
