"""Grouped heads and packed sequences in the Triton kernels, through the interpreter on CPU.

Every kernel call computes H heads (the most any input has); a tensor with fewer heads is read in
place, compute head h reading its head ``h // (H / heads)``. With ``cu_seqlens`` the rows of one
batch entry hold several sequences, no state crossing a boundary. The float64 oracles of
``reference`` define both; the gradients are the passes ``backends.backward`` composes, against
autograd through the quadratic oracle.
"""

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
DK, DV = 16, 32
#: short segments and pieces, so that a sequence of 97 rows spans four segments (six pieces before the
#: last, which has one row)
SEGMENTS = dict(chunk=16, segment_len=32, state_split=2, kv_segment_len=32, kv_state_split=2)
#: lengths with odd ones, empty ones (also first and last), one row, and a long one
LENGTHS = [0, 21, 0, 97, 1, 12, 0]
SHORT = [5, 0, 70]
MIXED_DECAY = [0.01, 3.0, 0.2, 0.05]  # weak and strong, per compute head


def _cu(lengths, dtype=torch.int32):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype, device=DEVICE)


def _rows(n, heads, d, dtype, gen, bnhd):
    """[1, heads, n, d]; ``bnhd``: a view of [1, n, heads, d] storage, read in place."""
    if bnhd:
        x = torch.randn(1, n, heads, d, generator=gen).transpose(1, 2)
    else:
        x = torch.randn(1, heads, n, d, generator=gen)
    return (0.5 * x).to(dtype=dtype, device=DEVICE)


def _case(lengths, h, hkv, dtype, decay, bnhd=False, seed=0):
    """Packed inputs: q [1, H, N, Dk], k, v with Hkv heads, decay per compute head (or None),
    initial states [S, Hkv, Dk, Dv] (read per compute head), cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q = _rows(n, h, DK, dtype, gen, bnhd)
    k = _rows(n, hkv, DK, dtype, gen, bnhd)
    v = _rows(n, hkv, DV, dtype, gen, bnhd)
    init = torch.randn(len(lengths), hkv, DK, DV, generator=gen).to(DEVICE)
    slopes = None if decay is None else torch.tensor(decay[:h], dtype=torch.float32, device=DEVICE)
    return q, k, v, slopes, init, _cu(lengths)


def _widen(x, h):
    """``x`` with its heads repeated up to h, in float64: the oracle's inputs (per compute head)."""
    return x.double().repeat_interleave(h // x.shape[1], 1)


def _oracle_decay(decay, h):
    """A decay of one slope per compute head, so that the oracle keeps a state per compute head
    as the kernels do (zeros stand for no decay)."""
    return torch.zeros(h, dtype=torch.float64, device=DEVICE) if decay is None else decay.double()


@pytest.mark.parametrize(
    "h, hkv, dtype, decay, bnhd, reverse",
    [(4, 2, torch.float32, MIXED_DECAY, False, False),
     (4, 1, torch.float32, None, True, False),
     (4, 4, torch.bfloat16, MIXED_DECAY, True, False),
     (4, 2, torch.float16, MIXED_DECAY, False, True),
     (2, 2, torch.float32, None, False, True)],
    ids=lambda x: "mixed" if x is MIXED_DECAY else str(x).replace("torch.", ""),
)
def test_forward_against_the_oracle(h, hkv, dtype, decay, bnhd, reverse):
    """out and the final states of packed, grouped inputs: both directions (``reverse`` walks each
    sequence from its own end: the oracle on the rows flipped within each sequence), several
    segments in the long sequence, layouts read in place."""
    from lightning_op.kernels import config_override, linear_attention

    q, k, v, decay_h, init, cu = _case(LENGTHS, h, hkv, dtype, decay, bnhd)
    with config_override(**SEGMENTS):
        out, final = linear_attention(q, k, v, decay_h, out_scale=0.7, initial_state=init, cu_seqlens=cu,
                                      reverse=reverse, init_shift=1)
    flip = _flip_within(cu, q.shape[2]) if reverse else slice(None)
    expected_out, expected_final = reference.attention_quadratic(
        _widen(q, h)[:, :, flip], _widen(k, h)[:, :, flip], _widen(v, h)[:, :, flip], _oracle_decay(decay_h, h), 0.7,
        _widen(init, h), cu_seqlens=cu,
    )
    assert out.shape == (1, h, q.shape[2], DV) and final.shape == (len(LENGTHS), h, DK, DV)
    assert out.dtype == dtype and final.dtype == torch.float32
    assert rel_error(out, expected_out[:, :, flip]) < TOLERANCE[dtype]
    assert rel_error(final, expected_final) < TOLERANCE[dtype]


def _flip_within(cu, n):
    """Row indices that reverse each sequence in place (an involution)."""
    rows = torch.arange(n, device=cu.device)
    bounds = cu.long()
    sequence = torch.searchsorted(bounds[1:], rows, right=True)
    return bounds[sequence] + bounds[sequence + 1] - 1 - rows


def test_groups_sharing_a_state_compute_it_once_per_head():
    """Without decay (or one decay per group) the heads of a group compute the same state: each
    equals the oracle's shared one (``reference.state_heads``), which the caller picks."""
    from lightning_op.kernels import config_override, linear_attention

    q, k, v, _, init, cu = _case([19, 0, 70], 4, 2, torch.float32, None, seed=3)
    with config_override(**SEGMENTS):
        out, final = linear_attention(q, k, v, None, out_scale=0.5, initial_state=init, cu_seqlens=cu)
    expected_out, expected_final = reference.attention_quadratic(q.double(), k.double(), v.double(), None, 0.5,
                                                                 init.double(), cu_seqlens=cu)
    assert rel_error(out, expected_out) < TOLERANCE[torch.float32]
    for head in range(2):
        assert rel_error(final[:, head::2], expected_final) < TOLERANCE[torch.float32]


def _oracle_gradients(q, k, v, decay_h, scale, init_h, cu, grad_out, grad_final_h):
    """Out, final state and the gradients of q, k, v (at their own heads) and of the initial
    state per compute head, by autograd through the float64 quadratic oracle."""
    h = q.shape[1]
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, init_h)]
    out, final = reference.attention_quadratic(
        leaves[0], _widen(leaves[1], h), _widen(leaves[2], h), _oracle_decay(decay_h, h), scale, leaves[3],
        cu_seqlens=cu,
    )
    loss = (out * grad_out.double()).sum() + (final * grad_final_h.double()).sum()
    return torch.autograd.grad(loss, leaves)


def _group_sum(x, hkv):
    """Per-compute-head gradients [1, H, N, D] summed over each group: the kv heads' own."""
    return x.double().reshape(x.shape[0], hkv, -1, *x.shape[2:]).sum(2)


@pytest.mark.parametrize(
    "h, hkv, dtype, decay, fused, bnhd",
    [(4, 2, torch.float32, MIXED_DECAY, True, False),
     (4, 1, torch.float32, MIXED_DECAY, False, True),
     (4, 2, torch.bfloat16, None, True, True)],
    ids=lambda x: "mixed" if x is MIXED_DECAY else str(x).replace("torch.", ""),
)
def test_gradient_passes_against_autograd(h, hkv, dtype, decay, fused, bnhd):
    """The backward's passes on packed, grouped inputs: dq as a forward linear attention (query
    do, key v, value k, the initial state transposed), dk / dv in the fused pass or as two reverse
    linear attentions, summed over each group here; dS_0 per sequence gives the initial state's
    gradient (times lam, or itself for a sequence without rows). grad_final_state and the initial
    state have Hkv heads, read per compute head."""
    from lightning_op.kernels import config_override, key_value_gradients, linear_attention

    q, k, v, decay_h, init, cu = _case(LENGTHS, h, hkv, dtype, decay, bnhd, seed=7)
    gen = torch.Generator().manual_seed(8)
    n, num_sequences = q.shape[2], len(LENGTHS)
    grad_out = torch.randn(1, h, n, DV, generator=gen).to(dtype=dtype, device=DEVICE)
    grad_final = torch.randn(num_sequences, hkv, DK, DV, generator=gen).to(DEVICE)
    scale = 0.6
    expected = _oracle_gradients(q, k, v, decay_h, scale, _widen(init, h), cu, grad_out, _widen(grad_final, h))

    with config_override(**SEGMENTS):
        dq, _ = linear_attention(grad_out, v, k, decay_h, out_scale=scale, initial_state=init.transpose(-1, -2),
                                 store_final=False, cu_seqlens=cu)
        if fused:
            dk, dv, ds0 = key_value_gradients(grad_out, grad_final, q, k, v, decay_h, scale, store_final=True,
                                              cu_seqlens=cu)
        else:
            dk, _ = linear_attention(v, grad_out, q, decay_h, value_scale=scale,
                                     initial_state=grad_final.transpose(-1, -2), reverse=True, init_shift=0,
                                     store_final=False, cu_seqlens=cu)
            dv, ds0 = linear_attention(k, q, grad_out, decay_h, value_scale=scale, initial_state=grad_final,
                                       reverse=True, init_shift=0, cu_seqlens=cu)
    assert dk.shape == (1, h, n, DK) and dv.shape == (1, h, n, DV) and ds0.shape == (num_sequences, h, DK, DV)
    lam = torch.exp(-_oracle_decay(decay_h, h)).reshape(1, h, 1, 1)
    empty = (cu[1:] == cu[:-1]).reshape(-1, 1, 1, 1)
    d_init = torch.where(empty, ds0.double(), lam * ds0.double())
    tolerance = TOLERANCE[dtype]
    assert rel_error(dq, expected[0]) < tolerance
    assert rel_error(_group_sum(dk, hkv), expected[1]) < tolerance
    assert rel_error(_group_sum(dv, hkv), expected[2]) < tolerance
    assert rel_error(d_init, expected[3]) < tolerance


def test_grouped_heads_without_packing():
    """Grouped heads in a batch of two (no ``cu_seqlens``): the forward, dq and the fused dk / dv
    with q at 4 heads and k, v, the initial state and grad_final_state at 2, read in place from
    [B, N, H, D] storage, against the oracle per compute head; several segments."""
    from lightning_op.kernels import config_override, key_value_gradients, linear_attention

    gen = torch.Generator().manual_seed(2)
    h, hkv, n, scale = 4, 2, 50, 0.6
    q, k, v = _rows(2 * n, h, DK, torch.float32, gen, True), _rows(2 * n, hkv, DK, torch.float32, gen, True), \
        _rows(2 * n, hkv, DV, torch.float32, gen, True)
    q, k, v = (x.reshape(x.shape[1], 2, n, -1).transpose(0, 1) for x in (q, k, v))  # [2, heads, n, d] views
    decay_h = torch.tensor(MIXED_DECAY, device=DEVICE)
    init, grad_final = (torch.randn(2, hkv, DK, DV, generator=gen).to(DEVICE) for _ in range(2))
    grad_out = torch.randn(2, h, n, DV, generator=gen).to(DEVICE)
    with config_override(**SEGMENTS):
        out, final = linear_attention(q, k, v, decay_h, out_scale=scale, initial_state=init)
        dq, _ = linear_attention(grad_out, v, k, decay_h, out_scale=scale, initial_state=init.transpose(-1, -2),
                                 store_final=False)
        dk, dv, ds0 = key_value_gradients(grad_out, grad_final, q, k, v, decay_h, scale, store_final=True)
    expected_out, expected_final = reference.attention_quadratic(q.double(), _widen(k, h), _widen(v, h),
                                                                 decay_h.double(), scale, _widen(init, h))
    expected = _oracle_gradients(q, k, v, decay_h, scale, _widen(init, h), None, grad_out, _widen(grad_final, h))
    lam = torch.exp(-decay_h.double()).reshape(1, h, 1, 1)
    tolerance = TOLERANCE[torch.float32]
    for got, want in ((out, expected_out), (final, expected_final), (dq, expected[0]),
                      (_group_sum(dk, hkv), expected[1]), (_group_sum(dv, hkv), expected[2]),
                      (lam * ds0.double(), expected[3])):
        assert rel_error(got, want) < tolerance


def test_transposed_output_kernel_and_int64_bounds():
    """The output kernel's ``TRANSPOSED`` form (the state held transposed) on packed, grouped inputs with
    int64 ``cu_seqlens``: the same function as the other output kernel."""
    from lightning_op.kernels import config_override, linear_attention

    q, k, v, decay_h, init, cu = _case(SHORT, 4, 2, torch.float32, MIXED_DECAY, seed=5)
    with config_override(**SEGMENTS, transposed=1, block_v=16):
        out, final = linear_attention(q, k, v, decay_h, out_scale=0.7, initial_state=init, cu_seqlens=cu.long())
    expected_out, expected_final = reference.attention_quadratic(
        q.double(), _widen(k, 4), _widen(v, 4), decay_h.double(), 0.7, _widen(init, 4), cu_seqlens=cu)
    assert rel_error(out, expected_out) < TOLERANCE[torch.float32]
    assert rel_error(final, expected_final) < TOLERANCE[torch.float32]


def test_no_rows_and_one_segment():
    """N = 0 (every sequence empty): each final state is its initial state, read per compute
    head; N within one segment: the segment-state passes are skipped, as for one sequence."""
    from lightning_op.kernels import key_value_gradients, linear_attention

    q, k, v, decay_h, init, cu = _case([0, 0, 0], 4, 2, torch.float32, MIXED_DECAY)
    out, final = linear_attention(q, k, v, decay_h, initial_state=init, cu_seqlens=cu)
    assert out.shape == (1, 4, 0, DV) and torch.equal(final, _widen(init, 4).float())
    _, _, ds0 = key_value_gradients(q[..., :DV], init, q, k, v, decay_h, store_final=True, cu_seqlens=cu)
    assert torch.equal(ds0, _widen(init, 4).float())

    q, k, v, decay_h, init, cu = _case([7, 0, 20], 4, 2, torch.float32, MIXED_DECAY)
    out, final = linear_attention(q, k, v, decay_h, initial_state=init, cu_seqlens=cu)
    expected_out, expected_final = reference.attention_recurrent(
        q.double(), _widen(k, 4), _widen(v, 4), decay_h.double(), 1.0, _widen(init, 4), cu_seqlens=cu)
    assert rel_error(out, expected_out) < TOLERANCE[torch.float32]
    assert rel_error(final, expected_final) < TOLERANCE[torch.float32]


def test_traceable_launch_with_packed_sequences():
    """``traceable=True`` (kernels through ``torch.library.wrap_triton``, every pass launched)
    computes what the eager launch does."""
    from lightning_op.kernels import linear_attention

    q, k, v, decay_h, init, cu = _case(SHORT, 4, 2, torch.float32, MIXED_DECAY, seed=9)
    got = linear_attention(q, k, v, decay_h, initial_state=init, cu_seqlens=cu, segment_len=64, traceable=True)
    want = linear_attention(q, k, v, decay_h, initial_state=init, cu_seqlens=cu, segment_len=64)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_plan_of_a_packed_batch():
    """The segment and piece tables: their sizes depend on N and S alone (ceil(N / L) + S
    segments, (ceil(N / L) - 1) * split + 1 slots), their contents on ``cu_seqlens``; the segments
    ordered by the rows they walk, longest first (ties in sequence order), surplus entries last."""
    from lightning_op.kernels.launch import _packed_plan

    plan = _packed_plan(_cu([5, 0, 70]), 75, 32, 2)
    # sequence, first row, length, index in the sequence, start slot (a segment that starts a
    # sequence reads its initial state: no slot); entries of sequence -1 are surplus
    assert plan.segments[:5].tolist() == [[2, 5, 70, 0, -1], [2, 5, 70, 1, 1], [2, 5, 70, 2, 3], [0, 0, 5, 0, -1],
                                          [1, 5, 0, 0, -1]]
    assert plan.pieces[:4].tolist() == [[2, 5, 70, 0], [2, 5, 70, 1], [2, 5, 70, 2], [2, 5, 70, 3]]
    assert plan.segments[5, 0] == -1 and plan.pieces[4, 0] == -1
    # first slot, slots, first segment (before the ordering), length, first row
    assert plan.sequences.tolist() == [[0, 0, 0, 5, 0], [0, 0, 1, 0, 5], [0, 4, 2, 70, 5]]
    assert plan.segments.shape == (6, 5) and plan.pieces.shape == (5, 4) and plan.sequences.shape == (3, 5)
    many = [3, 0, 300] * 150  # more sequences than the plan kernel takes at once
    plan = _packed_plan(_cu(many).long(), sum(many), 64, 1)
    counts = torch.tensor([max(1, -(-n // 64)) for n in many])
    first = counts.cumsum(0) - counts
    assert plan.segments.shape[0] == -(-sum(many) // 64) + len(many)
    walked = [(min(64, n - 64 * i), s) for s, n in enumerate(many) for i in range(max(1, -(-n // 64)))]
    walked.sort(key=lambda pair: -pair[0])  # stable: ties keep the sequence order
    assert plan.segments[:, 0].tolist() == [s for _, s in walked] + [-1] * (plan.segments.shape[0] - len(walked))
    got_walked = (plan.segments[:, 2] - 64 * plan.segments[:, 3]).clamp(max=64)[: len(walked)]
    assert got_walked.tolist() == [w for w, _ in walked]
    assert torch.equal(plan.sequences[:, 2].long().cpu(), first) and plan.pieces[:, 0].max() == len(many) - 1


def _read_as_the_plan_reads(cu, n):
    """``max(cu[0..s])`` clamped into [0, N]: the bounds the kernels use when nothing checked
    ``cu_seqlens`` (the same values where it is valid)."""
    return torch.cummax(cu.long().clamp(0, n), 0).values.to(cu.dtype)


@pytest.mark.parametrize("bad", [[3, 40, 20, 90, 60], [-5, 10, 10, 200], "random"])
def test_bounds_no_check_read_stay_in_the_rows(bad, monkeypatch):
    """Compiled and captured calls read no ``cu_seqlens`` on the host, nor does a remembered check
    see a write behind the version counter: bounds that fall, start past 0 or run past N give the
    outputs of the bounds the plan reads (max of those before, clamped into [0, N]), never an
    access past the rows or the plan's tables: forward (several segments and pieces), backward
    passes, the decay's moment pass and the pooled step, beside the same calls on the bounds read
    that way."""
    from lightning_op import backends
    from lightning_op.kernels import config_override, linear_attention

    from lightning_op.kernels import launch

    monkeypatch.setattr(launch, "PLAN_BLOCK", 2)  # the running maximum crosses the plan kernel's blocks
    gen = torch.Generator().manual_seed(4)
    if bad == "random":
        n = 60
        cu = torch.randint(-10, n + 20, (14,), generator=gen).sort().values
        cu[::4] = torch.randint(0, n, cu[::4].shape, generator=gen)
    else:
        n = 75
        cu = torch.tensor(bad)
    cu = cu.to(dtype=torch.int32, device=DEVICE)
    read = _read_as_the_plan_reads(cu, n)
    assert not torch.equal(cu, read)
    h, s = 2, cu.shape[0] - 1
    q, k, v = (_rows(n, h, d, torch.float32, gen, False) for d in (DK, DK, DV))
    decay = torch.tensor([0.05, 0.6], device=DEVICE)
    init = torch.randn(s, h, DK, DV, generator=gen).to(DEVICE)
    covered = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    covered[int(read[0]):int(read[-1])] = True  # rows outside every sequence are never written
    with config_override(**SEGMENTS):
        (out, final), (want_out, want_final) = (linear_attention(q, k, v, decay, initial_state=init, cu_seqlens=x)
                                                for x in (cu, read))
        assert torch.equal(out[:, :, covered], want_out[:, :, covered]) and torch.equal(final, want_final)
        grad = torch.randn(1, h, n, DV, generator=gen).to(DEVICE)
        grads = [backends.backward(backends.triton(), grad, None, q, k, v, decay, 1.0, init, cu_seqlens=x, decay_grad=True)
                 for x in (cu, read)]
    for got, want in zip(grads[0][:4], grads[1][:4]):  # dq, dk, dv, d_initial_state
        assert torch.equal(got[:, :, covered] if got.shape[2] == n else got,
                           want[:, :, covered] if want.shape[2] == n else want)
    # the decay's moment pass reads each sequence's bounds alone, clamped into [0, N]: the plan's
    # reading where the bounds rise, finite (and within the rows) where they fall
    rising = bool((cu.diff() >= 0).all())
    assert torch.equal(grads[0][4], grads[1][4]) if rising else bool(grads[0][4].isfinite().all())
    pools = [torch.randn(s + 3, h, DK, DV, generator=gen).to(DEVICE) for _ in range(2)]
    pools[1].copy_(pools[0])
    rows = torch.randperm(s + 3, generator=gen)[:s].to(DEVICE)
    steps = [linear_attention(q, k, v, decay, initial_state=pool, cu_seqlens=x, state_rows=rows)[0]
             for pool, x in zip(pools, (cu, read))]
    assert torch.equal(steps[0][:, :, covered], steps[1][:, :, covered]) and torch.equal(pools[0], pools[1])


def test_traced_with_symbolic_lengths(monkeypatch):
    """A traceable launch traces with N and S symbolic (``make_fx``, kernels recorded, not run:
    the interpreter cannot run on fake tensors): the plan's tables and the grids are built from
    shapes, with no value of ``cu_seqlens`` read on the host."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from lightning_op.kernels import linear_attention

    grids = []

    class Recorded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: grids.append((self.kernel.__name__, grid, kwargs.get("VARLEN")))

    monkeypatch.setattr(torch.library, "wrap_triton", Recorded)
    q, k, v, decay_h, init, cu = _case(LENGTHS, 4, 2, torch.float32, MIXED_DECAY)

    def call(q, k, v, decay, init, cu):
        return linear_attention(q, k, v, decay, initial_state=init, cu_seqlens=cu, segment_len=64, traceable=True)

    make_fx(call, tracing_mode="symbolic")(q, k, v, decay_h, init, cu)
    assert [name for name, _, _ in grids] == ["_packed_plan_kernel", "_segment_state_kernel", "_segment_scan_kernel",
                                              "_chunk_output_kernel"]
    assert all(varlen for _, _, varlen in grids[1:])
    assert all(isinstance(grid[1], torch.SymInt) for _, grid, _ in grids[1:])  # pieces, sequences, segments
