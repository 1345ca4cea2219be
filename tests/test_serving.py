"""The decode step over a pool of states addressed by slot, and prefill chunks mixed with decode
tokens in one packed call: against the float64 recurrent oracle, slots not addressed untouched
bitwise, padding rows, bad input leaving the pool untouched, torch.compile, and the module's
StatePool against running each request alone."""

from __future__ import annotations

import pytest
import torch

import lightning_op
from lightning_op import reference
from lightning_op.nn import LightningAttention, StatePool

torch.manual_seed(0)
H, HKV, D = 4, 2, 16


def _qkv(b, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(b, H, n, D, generator=gen), 0.5 * torch.randn(b, HKV, n, D, generator=gen),
            0.5 * torch.randn(b, HKV, n, D, generator=gen))


def _expected(q, k, v, decay, start, cu_seqlens=None):
    out, final = reference.attention_recurrent(q.double(), k.double(), v.double(), decay.double(), 0.5,
                                               start.double(), cu_seqlens)
    return out.float(), final.float()


@pytest.mark.parametrize("decay", [torch.tensor([0.1, 2.0]), torch.tensor([0.1, 0.0, 0.5, 3.0])], ids=["shared", "own"])
def test_pooled_rows_continue_their_slots(cpu_backend, decay):
    hs = reference.state_heads(H, HKV, decay)
    pool = torch.randn(7, hs, D, D)
    before = pool.clone()
    q, k, v = _qkv(4, 2)
    slots = torch.tensor([5, -1, 0, 3])
    out = lightning_op.attn_step(q, k, v, pool, decay, scale=0.5, state_indices=slots)
    want, final = _expected(q, k, v, decay, before[slots.clamp(min=0)])
    for row, slot in enumerate(slots.tolist()):
        if slot < 0:
            assert torch.equal(out[row], torch.zeros_like(out[row]))
        else:
            torch.testing.assert_close(out[row], want[row], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pool[slot], final[row], rtol=1e-5, atol=1e-5)
    for slot in (1, 2, 4, 6):  # not addressed: untouched bitwise
        assert torch.equal(pool[slot], before[slot]), slot


def test_prefill_chunks_and_decode_tokens_in_one_packed_call(cpu_backend):
    decay = torch.tensor([0.05, 0.8])
    pool = torch.randn(6, HKV, D, D)
    before = pool.clone()
    cu = torch.tensor([0, 1, 70, 71, 71, 135])  # decode, prefill chunk, decode, empty, prefill chunk
    slots = torch.tensor([2, 0, -1, 4, 5])
    q, k, v = _qkv(1, 135)
    out = lightning_op.attn_step(q, k, v, pool, decay, scale=0.5, cu_seqlens=cu, state_indices=slots)
    want, final = _expected(q, k, v, decay, before[slots.clamp(min=0)], cu)
    bounds = cu.tolist()
    for s, slot in enumerate(slots.tolist()):
        rows = slice(bounds[s], bounds[s + 1])
        if slot < 0:
            assert torch.equal(out[:, :, rows], torch.zeros_like(out[:, :, rows]))
            continue
        torch.testing.assert_close(out[:, :, rows], want[:, :, rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pool[slot], final[s], rtol=1e-5, atol=1e-5)
    assert torch.equal(pool[1], before[1]) and torch.equal(pool[3], before[3])
    torch.testing.assert_close(pool[4], before[4])  # an empty sequence leaves its state as it was


def test_packed_without_indices_continues_state_rows(cpu_backend):
    decay = torch.tensor([0.3, 0.01])
    state = torch.randn(2, HKV, D, D)
    start = state.clone()
    cu = torch.tensor([0, 20, 21])
    q, k, v = _qkv(1, 21)
    out = lightning_op.attn_step(q, k, v, state, decay, scale=0.5, cu_seqlens=cu)
    want, final = _expected(q, k, v, decay, start, cu)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, final, rtol=1e-5, atol=1e-5)


def test_bad_input_leaves_the_pool_untouched():
    decay = torch.tensor([0.1, 0.2])
    pool = torch.randn(4, HKV, D, D)
    before = pool.clone()
    q, k, v = _qkv(3, 1)
    cases = [
        (dict(state_indices=torch.tensor([0, 1, 1])), ValueError, r"names slot\(s\) \[1\] more than once"),
        (dict(state_indices=torch.tensor([0, 4, 1])), ValueError, r"must be < the pool's 4 slots"),
        (dict(state_indices=torch.tensor([0.0, 1.0, 2.0])), TypeError, r"state_indices must be int32 or int64"),
        (dict(state_indices=torch.tensor([0, 1])), ValueError, r"state_indices has 2 entries but the call has 3 rows"),
        (dict(state_indices=torch.tensor([[0, 1, 2]])), ValueError, r"state_indices must be 1-D"),
        (dict(state=pool.double(), state_indices=torch.tensor([0, 1, 2])), TypeError, r"state must be float32"),
        (dict(state=torch.randn(4, H, D, D), state_indices=torch.tensor([0, 1, 2])), ValueError,
         r"pool state must have shape \[P, Hs, Dk, Dv\] = \[P, 2, 16, 16\]"),
        (dict(state=torch.randn(2, HKV, D, D)), ValueError, r"initial_state must have shape \[B, Hkv, Dk, Dv\]"),
    ]
    for override, error, message in cases:
        call = dict(state=pool, state_indices=None, **{})
        call.update(override)
        with pytest.raises(error, match=message):
            lightning_op.attn_step(q, k, v, call["state"], decay, state_indices=call["state_indices"])
        assert torch.equal(pool, before)


def test_compiled_step_mutates_the_pool_as_eager(cpu_backend):
    decay = torch.tensor([0.2, 0.6])
    cu, slots = torch.tensor([0, 1, 30, 31]), torch.tensor([3, 0, -1])
    q, k, v = _qkv(1, 31)
    step = torch.compile(lambda q, k, v, p, c, s: lightning_op.attn_step(q, k, v, p, decay, cu_seqlens=c,
                                                                         state_indices=s), fullgraph=True)
    start = torch.randn(5, HKV, D, D)
    eager_pool, compiled_pool = start.clone(), start.clone()
    want = lightning_op.attn_step(q, k, v, eager_pool, decay, cu_seqlens=cu, state_indices=slots)
    got = step(q, k, v, compiled_pool, cu, slots)
    assert torch.equal(got, want) and torch.equal(compiled_pool, eager_pool)
    assert not torch.equal(compiled_pool, start)


def test_module_serves_mixed_batches_from_a_pool():
    """Two requests prefilled in one packed call, then one decoding while the other's slot is
    freed and handed to a new request: each output equals running that request alone."""
    torch.manual_seed(0)
    layer = LightningAttention(64, H, D, num_kv_heads=HKV, layer_idx=0)
    xa, xb, xc = torch.randn(1, 50, 64), torch.randn(1, 30, 64), torch.randn(1, 12, 64)
    with torch.no_grad():
        alone = [layer(x)[0] for x in (xa, xb, xc)]
        pool = StatePool(2)
        a, b = pool.allocate(), pool.allocate()
        y, _ = layer(torch.cat([xa[:, :40], xb], 1), cache=pool, slots=torch.tensor([a, b]),
                     cu_seqlens=torch.tensor([0, 40, 70]))
        pieces_a = [y[:, :40]]
        torch.testing.assert_close(y[:, 40:], alone[1], rtol=1e-5, atol=1e-5)
        pool.free(b)
        c = pool.allocate()  # b's slot, zeroed for the new request
        assert c == b and pool.free_slots == 0
        y, _ = layer(torch.cat([xa[:, 40:41], xc], 1), cache=pool, slots=torch.tensor([a, c]),
                     cu_seqlens=torch.tensor([0, 1, 13]))
        pieces_a.append(y[:, :1])
        torch.testing.assert_close(y[:, 1:], alone[2], rtol=1e-5, atol=1e-5)
        for t in range(41, 50):
            pieces_a.append(layer(xa[:, t:t + 1], cache=pool, slots=torch.tensor([a]))[0])
    torch.testing.assert_close(torch.cat(pieces_a, 1), alone[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="all 2 slots are in use"):
        pool.allocate()
    with pytest.raises(ValueError, match="a StatePool needs slots"):
        layer(xa, cache=pool)


def test_pooled_step_reads_nothing_on_the_host():
    """The slots' gather and write-back make no host read (a read would break CUDA-graph capture):
    counted as ``aten._local_scalar_dense`` calls, validation (which reads the indices once in
    eager mode) excluded, no decay and no packing (whose CPU paths read their values)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lightning_op import ops

    class CountReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountReads.reads += 1
            return func(*args, **(kwargs or {}))

    q, k, v = _qkv(3, 1)
    pool = torch.randn(5, HKV, D, D)
    with torch.no_grad(), CountReads():
        ops._pooled_step(q, k, v, pool, None, 1.0, None, torch.tensor([4, -1, 2]))
        ops._pooled_step(q, k, v, pool, None, 1.0, None, torch.tensor([-1, -1, -1]))
    assert CountReads.reads == 0
