"""``kernels.final_state``: the state a sequence ends in, without its outputs (what context
parallelism exchanges), through the interpreter on CPU, against the float64 oracle."""

import os

import pytest
import torch

from lightning_op import reference

from _helpers import TOLERANCE, rel_error

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs the Triton interpreter or a GPU",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "n, block, h, hkv, dtype, decay",
    [(100, 32, 2, 2, torch.float32, [0.02, 3.0]),     # odd length, a partial last block, weak and strong
     (96, 32, 2, 2, torch.float32, [0.005, 40.0]),    # whole blocks; a vanishing memory
     (20, 64, 4, 2, torch.bfloat16, [0.1, 0.0, 1.0, 0.01]),  # one partial block; grouped kv heads
     (77, 16, 2, 1, torch.float16, None)],            # no decay; one kv head
    ids=["odd", "whole-blocks", "short-grouped", "no-decay"],
)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_final_state_against_the_oracle(n, block, h, hkv, dtype, decay, reverse):
    """Forward: ``sum_t lam^(N-1-t) s k_t^T v_t``, the op's final state; reverse: ``sum_t lam^t s
    k_t^T v_t``, the final state of the rows walked from the end. Per compute head, k and v read
    per group; without a decay, one state per kv head."""
    from lightning_op.kernels import final_state

    gen = torch.Generator().manual_seed(n)
    k = (0.5 * torch.randn(2, hkv, n, 16, generator=gen)).to(dtype=dtype, device=DEVICE)
    v = (0.5 * torch.randn(2, hkv, n, 24, generator=gen)).to(dtype=dtype, device=DEVICE)
    decay_h = None if decay is None else torch.tensor(decay, device=DEVICE)
    got = final_state(k, v, decay_h, block, value_scale=0.5, reverse=reverse)
    h = h if decay is not None else hkv  # without a decay the heads of a group share one state
    wide = [x.double().repeat_interleave(h // hkv, 1) for x in (k, v)]
    if reverse:
        wide = [x.flip(2) for x in wide]
    lam = torch.zeros(h, dtype=torch.float64, device=DEVICE) if decay_h is None else decay_h.double()
    _, want = reference.attention_quadratic(torch.zeros_like(wide[0]), wide[0], wide[1], lam, 1.0)
    assert got.shape == (2, h, 16, 24) and got.dtype == torch.float32
    assert rel_error(got, 0.5 * want) < TOLERANCE[dtype]


def test_final_state_of_no_rows_is_zero():
    from lightning_op.kernels import final_state

    k = torch.zeros(1, 2, 0, 16, device=DEVICE)
    assert torch.equal(final_state(k, k, None, 32), torch.zeros(1, 2, 16, 16, device=DEVICE))


@pytest.mark.parametrize("decay_heads", [4, 2, 0], ids=["own-states", "shared-states", "no-decay"])
def test_context_parallel_state_passes_on_the_kernels(monkeypatch, decay_heads):
    """Context parallelism's two state-only passes where the Triton kernels run: the state a
    rank's tokens leave (``L``) and the gradient reaching its initial state (``G = scale sum_t
    lam^(t+1) q_t^T do_t``, summed over a group sharing a state), against float64 formulas;
    grouped heads with states per query head, shared per group, and without decay."""
    from lightning_op.distributed import OP_ATTENTION

    monkeypatch.setenv("LIGHTNING_OP_BACKEND", "triton")
    gen = torch.Generator().manual_seed(3)
    n, h, hkv = 70, 4, 2
    q, k, v, do = (0.5 * torch.randn(1, heads, n, 16, generator=gen).to(DEVICE) for heads in (h, hkv, hkv, h))
    decay = torch.tensor([0.05, 0.8, 0.01, 2.0][:decay_heads], device=DEVICE) if decay_heads else None
    hs = reference.state_heads(h, hkv, decay)
    lam = torch.zeros(hs, dtype=torch.float64) if decay is None else decay.double().cpu()
    lam_h = lam.repeat_interleave(h // hs)
    t = torch.arange(n, dtype=torch.float64)
    weights = torch.exp(-lam_h[:, None] * (n - 1 - t))  # [H, N]
    kd, vd = (x.double().cpu().repeat_interleave(h // hkv, 1) for x in (k, v))
    want_state = torch.einsum("hn,bhnk,bhnv->bhkv", weights, kd, vd)[:, :: h // hs]
    grad_weights = torch.exp(-lam_h[:, None] * (t + 1))
    want_grad = 0.7 * torch.einsum("hn,bhnk,bhnv->bhkv", grad_weights, q.double().cpu(), do.double().cpu())
    want_grad = want_grad.unflatten(1, (hs, -1)).sum(2)
    assert rel_error(OP_ATTENTION.state(q, k, v, decay).cpu(), want_state) < TOLERANCE[torch.float32]
    assert rel_error(OP_ATTENTION.state_gradient(q, do, decay, 0.7, hs).cpu(), want_grad) < TOLERANCE[torch.float32]


@pytest.mark.parametrize(
    "n, cut, h, hkv, decay",
    [(77, (32, 2), 2, 2, [0.05, 2.0]),           # 3 segments of 2 pieces, a 13-row last segment
     (64, (16, 1), 4, 2, [0.1, 0.0, 1.0, 0.01]),  # whole segments; grouped kv heads, states per query head
     (50, (16, 1), 4, 2, None),                   # no decay: a group's heads share their kv head's state
     (40, None, 2, 2, [0.3, 0.02])],              # one segment: a state-only pass over every row
    ids=["segments-pieces", "whole-segments-grouped", "no-decay-grouped", "one-segment"],
)
def test_start_of_gets_the_leaving_state_and_starts_from_its_answer(n, cut, h, hkv, decay):
    """``linear_attention``'s ``start_of`` (context parallelism): it is called once, with the state
    the rows leave from a zero start (per compute head: the decayed sum of the segment pass's own
    states and the last segment's rows, or a state-only pass), and the outputs and final state are
    those from the initial state it returns; against float64."""
    from lightning_op.kernels import config_override, linear_attention

    gen = torch.Generator().manual_seed(n)
    q = (0.5 * torch.randn(1, h, n, 16, generator=gen)).to(DEVICE)
    k, v = ((0.5 * torch.randn(1, hkv, n, 16, generator=gen)).to(DEVICE) for _ in range(2))
    start = (0.3 * torch.randn(1, h, 16, 16, generator=gen)).to(DEVICE)
    decay_h = None if decay is None else torch.tensor(decay, device=DEVICE)
    calls = []

    def start_of(leaving):
        calls.append(leaving.clone())
        return start

    fixed = {} if cut is None else dict(segment_len=cut[0], state_split=cut[1])
    with config_override(chunk=16):
        out, final = linear_attention(q, k, v, decay_h, out_scale=0.7, start_of=start_of, **fixed)
    wide = [x.double().repeat_interleave(h // hkv, 1) for x in (k, v)]
    lam = None if decay_h is None else decay_h.double()
    _, want_leaving = reference.attention_quadratic(q.double(), *wide, lam, 1.0)
    want_out, want_final = reference.attention_quadratic(q.double(), *wide, lam, 0.7, start.double())
    assert len(calls) == 1 and calls[0].shape == (1, h, 16, 16)
    assert rel_error(calls[0], want_leaving) < TOLERANCE[torch.float32]
    assert rel_error(out, want_out) < TOLERANCE[torch.float32]
    assert rel_error(final, want_final) < TOLERANCE[torch.float32]


class _OneRankOfMany:
    """An exchange for rank ``rank`` alone: in its n-th all-gather the other ranks' rows are
    ``rows[n][j]`` (their float64-reference states, and lengths or state gradients); this rank's
    row is what it passes."""

    def __init__(self, rank, rows):
        self.rank, self.world, self.rows, self.calls = rank, len(rows[0]), rows, 0

    def gather(self, parts):
        flat = torch.cat([x.reshape(-1) for x in parts])
        rows = [flat if j == self.rank else row.float().to(flat.device) for j, row in enumerate(self.rows[self.calls])]
        self.calls += 1
        return torch.stack(rows)


def _length_code(n, device):
    return torch.tensor([n // 2**24, n % 2**24], dtype=torch.float32, device=device)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_context_parallel_forward_on_the_kernels(monkeypatch, rank):
    """A rank's context-parallel forward where the Triton kernels run (its leaving state from the
    op's own segment-state pass, cut into segments here): its output and the whole sequence's
    final state against the float64 reference of the whole sequence, uneven shards."""
    from lightning_op import distributed
    from lightning_op.kernels import config_override

    monkeypatch.setenv("LIGHTNING_OP_BACKEND", "triton")
    gen = torch.Generator().manual_seed(5)
    lengths, h, d = [45, 70, 9], 2, 16
    n = sum(lengths)
    q, k, v = ((0.5 * torch.randn(1, h, n, d, generator=gen)).to(DEVICE) for _ in range(3))
    init = (0.3 * torch.randn(1, h, d, d, generator=gen)).to(DEVICE)
    decay = torch.tensor([0.04, 0.5], device=DEVICE)
    starts = [sum(lengths[:j]) for j in range(3)]
    pieces = [[x[:, :, a:a + m] for x in (q, k, v)] for a, m in zip(starts, lengths)]
    leaving = [reference.attention_quadratic(*(x.double() for x in p), decay.double(), 1.0)[1] for p in pieces]
    want_out, want_final = reference.attention_quadratic(q.double(), k.double(), v.double(), decay.double(), 0.7,
                                                         init.double())
    exchange = _OneRankOfMany(rank, [[torch.cat([s.reshape(-1).to(DEVICE), _length_code(m, DEVICE)])
                                      for s, m in zip(leaving, lengths)]])
    with config_override(chunk=16, segment_len=32, state_split=2):  # 2, 3 and 1 segments of 2 pieces
        out, final = distributed._attention(*pieces[rank], decay, 0.7, init, exchange, distributed.OP_ATTENTION)
    a = starts[rank]
    assert rel_error(out, want_out[:, :, a:a + lengths[rank]]) < TOLERANCE[torch.float32]
    assert rel_error(final, want_final) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("rank", [0, 2, 3])
@pytest.mark.parametrize("decay, with_init", [([0.01, 0.7, float("inf")], True), (None, True), ([0.2, 0.0, 3.0], False)],
                         ids=["decay-init", "no-decay", "no-init"])
def test_rank_states_kernel_against_float64(rank, decay, with_init):
    """Context parallelism's combine step in one launch (``kernels.context.rank_states``): rank r's
    initial state ``lam^P_r S_0 + sum_{j<r} lam^(P_r - P_{j+1}) L_j`` and the final state
    ``lam^N S_0 + sum_j lam^(N - P_{j+1}) L_j`` from the all-gather's rows (lengths as two floats,
    one past 2^24), a transposed initial state, lam = 0 (an infinite rate) included; in float64."""
    from lightning_op.kernels.context import rank_states

    gen = torch.Generator().manual_seed(rank)
    lengths = [5, 2**24 + 3, 0, 40]
    shape = (2, 3, 8, 12)
    states = [torch.randn(shape, generator=gen) for _ in lengths]
    rows = [torch.cat([s.reshape(-1), torch.tensor([n // 2**24, n % 2**24], dtype=torch.float32)])
            for s, n in zip(states, lengths)]
    gathered = torch.stack(rows).to(DEVICE)
    init = torch.randn(2, 3, 12, 8, generator=gen).transpose(-1, -2) if with_init else None
    rates = None if decay is None else torch.tensor(decay)
    start, final = rank_states(gathered, None if rates is None else rates.to(DEVICE),
                               None if init is None else init.to(DEVICE), rank, shape, 2**24)

    def power(e):
        if rates is None:
            return torch.ones(3, dtype=torch.float64)
        return torch.where(torch.tensor(e == 0), 1.0, torch.exp(-rates.double() * e)).reshape(3)

    ends = torch.tensor(lengths).cumsum(0).tolist()
    before, total = sum(lengths[:rank]), sum(lengths)
    want_start = torch.zeros(shape, dtype=torch.float64)
    want_final = torch.zeros(shape, dtype=torch.float64)
    for j, s in enumerate(states):
        want_final += power(total - ends[j])[None, :, None, None] * s.double()
        if j < rank:
            want_start += power(before - ends[j])[None, :, None, None] * s.double()
    if init is not None:
        want_start += power(before)[None, :, None, None] * init.double()
        want_final += power(total)[None, :, None, None] * init.double()
    assert start.shape == final.shape == shape and start.dtype == final.dtype == torch.float32
    assert torch.allclose(start.double().cpu(), want_start, rtol=1e-5, atol=1e-6)
    assert torch.allclose(final.double().cpu(), want_final, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("h, hkv, decay", [(2, 2, [0.04, 0.5]), (4, 2, [0.04, 0.5]), (4, 2, [0.04, 0.5, 0.2, 0.01])],
                         ids=["own-heads", "shared-states", "grouped-own-states"])
def test_context_parallel_backward_on_the_kernels(monkeypatch, h, hkv, decay):
    """Every rank of three (uneven shards, each cut into segments) through the Triton kernels, the
    rank's G from the fused backward's own segment-state pass, the backward's combine step in one
    launch and the op's backward called directly: each rank's dq, dk, dv against the whole
    sequence's float64 gradients, and the initial state's shares summed over the ranks against its
    gradient; the other ranks' rows of both all-gathers come from the float64 reference. Grouped kv
    heads with states per query head and shared per group."""
    from lightning_op import distributed
    from lightning_op.kernels import config_override

    monkeypatch.setenv("LIGHTNING_OP_BACKEND", "triton")
    gen = torch.Generator().manual_seed(8)
    lengths, d, scale = [45, 70, 9], 16, 0.7
    hs = reference.state_heads(h, hkv, torch.tensor(decay))
    n = sum(lengths)
    q, grad_out = ((0.5 * torch.randn(1, h, n, d, generator=gen)).to(DEVICE) for _ in range(2))
    k, v = ((0.5 * torch.randn(1, hkv, n, d, generator=gen)).to(DEVICE) for _ in range(2))
    init = (0.3 * torch.randn(1, hs, d, d, generator=gen)).to(DEVICE)
    shares = [(0.3 * torch.randn(1, hs, d, d, generator=gen)).to(DEVICE) for _ in lengths]
    decay = torch.tensor(decay, device=DEVICE)
    whole = [x.double().requires_grad_() for x in (q, k, v, init)]
    out, final = reference.attention_quadratic(*whole[:3], decay.double(), scale, whole[3])
    ((out * grad_out.double()).sum() + (final * sum(shares).double()).sum()).backward()

    starts = [sum(lengths[:j]) for j in range(3)]
    cut = [slice(a, a + m) for a, m in zip(starts, lengths)]
    rates = decay.double().repeat_interleave(h // decay.shape[0])  # per query head
    leaving, into = [], []
    for rows in cut:
        piece = [x[:, :, rows].double() for x in (q, k, v, grad_out)]
        leaving.append(reference.attention_quadratic(*piece[:3], decay.double(), 1.0)[1])
        steps = torch.arange(rows.stop - rows.start, dtype=torch.float64, device=DEVICE)
        weights = torch.exp(-rates[:, None] * (steps + 1))  # lam^(t+1), t counted in the rank
        g = scale * torch.einsum("hn,bhnk,bhnv->bhkv", weights, piece[0], piece[3])
        into.append(g.unflatten(1, (hs, -1)).sum(2))  # summed over the query heads sharing a state
    forward_rows = [torch.cat([s.reshape(-1), _length_code(m, DEVICE).double()]) for s, m in zip(leaving, lengths)]
    backward_rows = [torch.cat([g.reshape(-1), share.double().reshape(-1)]) for g, share in zip(into, shares)]
    init_grad = torch.zeros_like(init)
    for rank in range(3):
        mine = [x[:, :, cut[rank]].clone().requires_grad_() for x in (q, k, v)]
        my_init = init.clone().requires_grad_()
        exchange = _OneRankOfMany(rank, [forward_rows, backward_rows])
        with config_override(chunk=16, segment_len=32, state_split=2):
            got, got_final = distributed._attention(*mine, decay, scale, my_init, exchange, distributed.OP_ATTENTION)
            ((got * grad_out[:, :, cut[rank]]).sum() + (got_final * shares[rank]).sum()).backward()
        assert exchange.calls == 2
        for x, want in zip(mine, whole[:3]):
            assert rel_error(x.grad, want.grad[:, :, cut[rank]]) < TOLERANCE[torch.float32], rank
        init_grad += my_init.grad
    assert rel_error(init_grad, whole[3].grad) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("rank", [0, 1, 3])
@pytest.mark.parametrize("decay", [[0.01, 0.7, float("inf")], None], ids=["decay", "no-decay"])
def test_rank_state_gradients_kernel_against_float64(rank, decay):
    """The backward's combine step in one launch (``kernels.context.rank_state_gradients``):
    ``dL_r = sum_{j>r} lam^(P_j - P_{r+1}) G_j + lam^(N - P_{r+1}) sum_j g_j`` and the initial
    state's share ``lam^P_r G_r + lam^N g_r``, lengths past 2^24 and of zero, lam = 0 included."""
    from lightning_op.kernels.context import rank_state_gradients

    gen = torch.Generator().manual_seed(10 + rank)
    lengths = [5, 2**24 + 3, 0, 40]
    shape = (2, 3, 8, 12)
    grads = [torch.randn(2, *shape, generator=gen) for _ in lengths]  # (G_j, g_j)
    gathered = torch.stack(grads).to(DEVICE)
    codes = torch.tensor([[n // 2**24, n % 2**24] for n in lengths], dtype=torch.float32, device=DEVICE)
    rates = None if decay is None else torch.tensor(decay)
    leaving, d_init = rank_state_gradients(gathered, codes, None if rates is None else rates.to(DEVICE), rank,
                                           shape, 2**24, True)

    def power(e):
        if rates is None:
            return torch.ones(1, 3, 1, 1, dtype=torch.float64)
        return torch.where(torch.tensor(e == 0), 1.0, torch.exp(-rates.double() * e)).reshape(1, 3, 1, 1)

    starts = [sum(lengths[:j]) for j in range(len(lengths))]
    after, total = starts[rank] + lengths[rank], sum(lengths)
    want = power(total - after) * sum(g[1].double() for g in grads)
    for j in range(rank + 1, len(lengths)):
        want += power(starts[j] - after) * grads[j][0].double()
    want_init = power(starts[rank]) * grads[rank][0].double() + power(total) * grads[rank][1].double()
    assert torch.allclose(leaving.double().cpu(), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(d_init.double().cpu(), want_init, rtol=1e-5, atol=1e-6)
    alone, none = rank_state_gradients(gathered, codes, None if rates is None else rates.to(DEVICE), rank, shape,
                                       2**24, False)
    assert none is None and torch.equal(alone, leaving)
