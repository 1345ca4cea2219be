"""The decode step over a pool of states addressed by slot, and prefill chunks mixed with decode
tokens in one packed call: against the float64 recurrent oracle and a plain token loop, slots
not addressed untouched bitwise, padding rows, grouped heads (own and shared states), which calls
take the decode kernel, bad input leaving the pool untouched, torch.compile, and the module's
StatePool against running each request alone."""

from __future__ import annotations

import pytest
import torch

import lightning_op
from lightning_op import reference
from lightning_op._gates import TRITON_INTERPRETING
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


def test_packed_step_reads_cu_seqlens_and_slots_in_one_host_copy(monkeypatch):
    """On a GPU each host read waits for the device: a packed pooled step's validation copies
    cu_seqlens and the slots to the host together, once, and reads no scalar (the CUDA branches
    taken on CPU tensors, every aten op counted); bad values of either are still refused."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lightning_op import ops

    seen, reads = [], []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    decay = torch.tensor([0.05, 0.8])
    pool = torch.randn(6, HKV, D, D)
    q, k, v = _qkv(1, 135)
    cu, slots = torch.tensor([0, 1, 70, 71, 71, 135], dtype=torch.int32), torch.tensor([2, 0, -1, 4, 5])
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(tuple(self.shape)) or tolist(self))
    with Count():
        ops.validate_step(q, k, v, pool, decay, 0.5, cu, slots)
    assert reads == [(11,)] and torch.ops.aten._local_scalar_dense.default not in seen
    assert len(seen) == 1, seen  # the concatenation
    for bad_cu, bad_slots, message in (
        ([0, 1, 70, 69, 71, 135], [2, 0, -1, 4, 5], "must rise from 0 to N = 135"),
        ([0, 1, 70, 71, 71, 134], [2, 0, -1, 4, 5], "must rise from 0 to N = 135"),
        ([0, 1, 70, 71, 71, 135], [2, 0, -1, 2, 5], r"names slot\(s\) \[2\] more than once"),
        ([0, 1, 70, 71, 71, 135], [2, 0, -1, 6, 5], "must be < the pool's 6 slots"),
    ):
        with pytest.raises(ValueError, match=message):
            ops.validate_step(q, k, v, pool, decay, 0.5, torch.tensor(bad_cu), torch.tensor(bad_slots))


def test_repeated_packed_steps_check_their_layout_once_and_their_values_every_call(cpu_backend, monkeypatch):
    """The layers of a serving step make calls of one signature: the layout is validated once,
    cu_seqlens and the slots on every call, before anything is written."""
    from lightning_op import ops

    layouts = []
    check_layout = ops._check_step_layout
    monkeypatch.setattr(ops, "_validated_steps", set())
    monkeypatch.setattr(ops, "_check_step_layout", lambda *args: layouts.append(1) or check_layout(*args))
    decay = torch.tensor([0.05, 0.8])
    pool = torch.randn(6, HKV, D, D)
    q, k, v = _qkv(1, 40)
    cu, slots = torch.tensor([0, 1, 39, 40]), torch.tensor([2, 0, 5])
    for _ in range(2):
        lightning_op.attn_step(q, k, v, pool, decay, scale=0.5, cu_seqlens=cu, state_indices=slots)
    assert len(layouts) == 1
    before = pool.clone()
    for bad_cu, bad_slots, message in (([0, 1, 41, 40], [2, 0, 5], "must rise from 0"),
                                       ([0, 1, 39, 40], [2, 0, 2], "more than once"),
                                       ([0, 1, 39, 40], [2, 6, 5], "must be <")):
        with pytest.raises(ValueError, match=message):
            lightning_op.attn_step(q, k, v, pool, decay, scale=0.5, cu_seqlens=torch.tensor(bad_cu),
                                   state_indices=torch.tensor(bad_slots))
        assert torch.equal(pool, before)
    assert len(layouts) == 1
    lightning_op.attn_step(q, k, v, pool[:5], decay, scale=0.5, cu_seqlens=cu, state_indices=torch.tensor([2, 0, 4]))
    assert len(layouts) == 2  # another pool size: another signature


def test_packed_steps_of_one_batch_read_their_values_once(cpu_backend, monkeypatch):
    """The layers of an engine step share cu_seqlens and slots: on a GPU (the CUDA remembering
    taken on CPU tensors here) their values are read once, and again after a write in place to
    either, which is still refused when bad, before anything is written."""
    from lightning_op import ops

    reads = []
    check = ops._check_cu_seqlens_list
    monkeypatch.setattr(ops, "_remembered_steps", {})
    monkeypatch.setattr(ops, "_remembers", lambda x: not x.is_inference())
    monkeypatch.setattr(ops, "_check_cu_seqlens_list", lambda values, n: reads.append(values) or check(values, n))
    decay = torch.tensor([0.05, 0.8])
    pools = [torch.randn(6, HKV, D, D) for _ in range(3)]
    q, k, v = _qkv(1, 40)
    cu, slots = torch.tensor([0, 1, 39, 40]), torch.tensor([2, 0, -1])
    outs = [lightning_op.attn_step(q, k, v, pool, decay, scale=0.5, cu_seqlens=cu, state_indices=slots)
            for pool in pools]
    assert len(reads) == 1
    for out in outs:  # the padding sequence's rows are zeroed by every layer, remembered or not
        assert torch.equal(out[:, :, 39:], torch.zeros_like(out[:, :, 39:]))
    before = [pool.clone() for pool in pools]
    slots[2] = 2
    with pytest.raises(ValueError, match="more than once"):
        lightning_op.attn_step(q, k, v, pools[0], decay, scale=0.5, cu_seqlens=cu, state_indices=slots)
    cu[2] = 41
    slots[2] = 5
    with pytest.raises(ValueError, match="must rise from 0"):
        lightning_op.attn_step(q, k, v, pools[0], decay, scale=0.5, cu_seqlens=cu, state_indices=slots)
    assert all(torch.equal(pool, kept) for pool, kept in zip(pools, before))
    assert len(reads) == 3


@pytest.mark.parametrize("padding", ["with rows", "empty", "none"])
def test_packed_step_zeroes_its_output_only_for_padding_rows(monkeypatch, padding):
    """The kernels write every row of a sequence with a slot and none of a padding one: the output
    is zeroed first only where a padding sequence holds rows. Fresh float allocations are filled
    with NaN here, so a row no kernel wrote shows."""
    if not TRITON_INTERPRETING:
        pytest.skip("the packed kernels run interpreted on CPU-only machines")
    from torch.utils._python_dispatch import TorchDispatchMode

    from lightning_op import ops

    zeroed = []

    class Garbage(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.empty.memory_format and out.is_floating_point():
                out.fill_(float("nan"))
            if func is torch.ops.aten.zeros.default:
                zeroed.append(tuple(out.shape))
            return out

    monkeypatch.setenv("LIGHTNING_OP_BACKEND", "triton")
    decay = torch.tensor([0.05, 0.8])
    pool = torch.randn(6, HKV, D, D)
    before = pool.clone()
    q, k, v = _qkv(1, 135)
    cu = torch.tensor([0, 1, 70, 71, 71, 135])  # decode, prefill chunk, decode, empty, prefill chunk
    slots = torch.tensor({"with rows": [2, 0, -1, 4, 5], "empty": [2, 0, 3, -1, 5], "none": [2, 0, 3, 4, 5]}[padding])
    with torch.no_grad(), Garbage():  # the op's implementation: the mode would see the op as one call
        out = ops._attn_step_impl(q, k, v, pool, decay, 0.5, cu, slots)
    assert (tuple(out.shape) in zeroed) == (padding == "with rows")
    want, _ = _expected(q, k, v, decay, before[slots.clamp(min=0)], cu)
    bounds = cu.tolist()
    for s, slot in enumerate(slots.tolist()):
        rows = slice(bounds[s], bounds[s + 1])
        expected = torch.zeros_like(out[:, :, rows]) if slot < 0 else want[:, :, rows]
        torch.testing.assert_close(out[:, :, rows], expected, rtol=1e-5, atol=1e-5)


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
    """The slots' gather and write-back, and the decode kernel's launch, make no host read (a read
    would break CUDA-graph capture): counted as ``aten._local_scalar_dense`` calls, validation
    (which reads the indices once in eager mode) excluded, no decay and no packing (whose CPU
    paths read their values)."""
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
    if TRITON_INTERPRETING:  # the decode kernel's launch: the slots are read by the kernel alone
        from lightning_op.kernels.decode import launch_decode_step

        with torch.no_grad(), CountReads():
            launch_decode_step(q, k, v, pool, None, 1.0, torch.tensor([4, -1, 2]))
        assert CountReads.reads == 0


# ----------------------------------------------------------------------------- the decode kernel's forms


def _token_loop(q, k, v, states, decay, scale, slots=None):
    """The step as a plain float64 loop over tokens, kv heads and shared states repeated to one per
    query head: ``S <- lam S + k^T v``, ``o = scale q S``. ``states``: ``[B or P, Hs, Dk, Dv]``;
    returns the outputs and the states after the step (a copy, only the named rows changed)."""
    b, h, t, _ = q.shape
    hs = states.shape[1]
    kv_group, state_group = h // k.shape[1], h // hs
    q, k, v = q.double(), k.double().repeat_interleave(kv_group, 1), v.double().repeat_interleave(kv_group, 1)
    lam = torch.ones(h, dtype=torch.float64) if decay is None else torch.exp(-decay.double()).repeat_interleave(
        h // decay.shape[0])
    after = states.double().clone()
    out = torch.zeros(b, h, t, v.shape[3], dtype=torch.float64)
    for row in range(b):
        slot = row if slots is None else int(slots[row])
        if slot < 0:
            continue
        state = after[slot].repeat_interleave(state_group, 0)  # [H, Dk, Dv]
        for token in range(t):
            for head in range(h):
                state[head] = lam[head] * state[head] + torch.outer(k[row, head, token], v[row, head, token])
                out[row, head, token] = scale * q[row, head, token] @ state[head]
        after[slot] = state[::state_group]  # the heads of a group computed the same state
    return out, after


# decay per query head (own states), per kv head (shared), none (shared), and equal head counts
FORMS = {"own": (4, 2, 4), "shared": (4, 2, 2), "none": (4, 2, None), "equal": (2, 2, 2)}


def _step_inputs(form, rows, tokens, seed):
    """q, k, v as [B, N, H, D] storage read through transposed views, the decay and Hs."""
    heads, kv_heads, decay_heads = FORMS[form]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, tokens, heads, D, generator=gen).transpose(1, 2)
    k = torch.randn(rows, tokens, kv_heads, D, generator=gen).transpose(1, 2)
    v = torch.randn(rows, tokens, kv_heads, 24, generator=gen).transpose(1, 2)  # Dv != Dk
    decay = None if decay_heads is None else torch.rand(decay_heads, generator=gen) * torch.tensor([0.0, 3.0]).repeat(
        decay_heads // 2)
    return q, k, v, decay, reference.state_heads(heads, kv_heads, decay)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("form", list(FORMS))
def test_pooled_rows_against_a_token_loop(cpu_backend, form, tokens, index_dtype):
    """Rows continuing a random permutation of slots in a larger pool, a padding row holding NaNs:
    outputs and named slots as the loop gives them, the padding row's outputs zero, every other
    slot bitwise untouched."""
    gen = torch.Generator().manual_seed(tokens)
    q, k, v, decay, hs = _step_inputs(form, 5, tokens, seed=tokens)
    for x in (q, k, v):
        x[3] = float("nan")  # row 3 is padding: what it holds must not reach anything
    pool = torch.randn(11, hs, D, 24, generator=gen)
    before = pool.clone()
    # slot 0 is never named: a padding row's index, clamped to 0, must not write there
    slots = (torch.randperm(10, generator=gen)[:5] + 1).to(index_dtype)
    slots[3] = -1
    out = lightning_op.attn_step(q, k, v, pool, decay, scale=0.5, state_indices=slots)
    want, want_pool = _token_loop(q, k, v, before, decay, 0.5, slots)
    assert out.shape == (5, q.shape[1], tokens, 24)
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    named = slots[slots >= 0].long()
    for row in (0, 1, 2, 4):
        torch.testing.assert_close(out[row], want[row].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool[named], want_pool[named].float(), rtol=1e-5, atol=1e-5)
    untouched = [slot for slot in range(11) if slot not in named.tolist()]
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("form", ["own", "shared", "none"])
def test_grouped_heads_step_against_a_token_loop(cpu_backend, form, tokens):
    """Grouped heads without a pool: per query head states read their group's k, v; a shared
    state is updated once per token and read by all of the group's query heads."""
    q, k, v, decay, hs = _step_inputs(form, 2, tokens, seed=10 + tokens)
    state = torch.randn(2, hs, D, 24)
    start = state.clone()
    out = lightning_op.attn_step(q, k, v, state, decay, scale=0.5)
    want, want_state = _token_loop(q, k, v, start, decay, 0.5)
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state.float(), rtol=1e-5, atol=1e-5)


def test_which_calls_take_the_decode_kernel(cpu_backend, monkeypatch):
    """Rows (dense with grouped heads, or pooled) take the decode kernel on the Triton backend;
    packed steps stay composed, and the chunked CPU path never launches it."""
    from lightning_op.kernels import decode

    launches = []
    real = decode.launch_decode_step
    monkeypatch.setattr(decode, "launch_decode_step", lambda *a: launches.append(1) or real(*a))
    q, k, v, decay, hs = _step_inputs("shared", 2, 1, seed=0)
    pool = torch.randn(3, hs, D, 24)
    lightning_op.attn_step(q, k, v, pool[:2], decay)
    lightning_op.attn_step(q, k, v, pool, decay, state_indices=torch.tensor([2, -1]))
    packed = [x.transpose(0, 2).reshape(1, x.shape[1], 2, x.shape[3]) for x in (q, k, v)]  # two 1-token sequences
    lightning_op.attn_step(*packed, pool, decay, cu_seqlens=torch.tensor([0, 1, 2]), state_indices=torch.tensor([0, 1]))
    assert len(launches) == (2 if cpu_backend == "triton" else 0)


def test_kernel_step_edge_cases(cpu_backend):
    """No tokens (nothing written), every row padding, and an empty pool."""
    q, k, v, decay, hs = _step_inputs("own", 2, 0, seed=1)
    pool = torch.randn(3, hs, D, 24)
    before = pool.clone()
    out = lightning_op.attn_step(q, k, v, pool, decay, state_indices=torch.tensor([1, 0]))
    assert out.shape == (2, 4, 0, 24) and torch.equal(pool, before)
    q, k, v, decay, hs = _step_inputs("own", 2, 1, seed=1)
    out = lightning_op.attn_step(q, k, v, pool, decay, state_indices=torch.tensor([-1, -1]))
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(pool, before)
    out = lightning_op.attn_step(q, k, v, pool[:0], decay, state_indices=torch.tensor([-1, -1]))
    assert torch.equal(out, torch.zeros_like(out))


def test_repeated_pooled_steps_still_check_their_slots(cpu_backend):
    """The layout of a pooled call is validated once; the slots' values are checked on every
    call, before anything is written."""
    decay = torch.tensor([0.1, 0.2])
    pool = torch.randn(4, HKV, D, D)
    q, k, v = _qkv(3, 1)
    lightning_op.attn_step(q, k, v, pool, decay, state_indices=torch.tensor([0, 1, 2]))
    before = pool.clone()
    for slots, message in ((torch.tensor([0, 1, 1]), "more than once"), (torch.tensor([0, 4, 1]), "must be <")):
        with pytest.raises(ValueError, match=message):
            lightning_op.attn_step(q, k, v, pool, decay, state_indices=slots)
        assert torch.equal(pool, before)


@pytest.fixture
def remembering(monkeypatch):
    """Checked slots remembered as CUDA ones are, for CPU indices too, in a fresh table; yields the
    list of host reads of slot values (one entry per read)."""
    from lightning_op import ops

    reads = []
    check = ops._check_slot_values
    monkeypatch.setattr(ops, "_remembered_indices", {})
    monkeypatch.setattr(ops, "_remembers", lambda indices: not indices.is_inference())
    monkeypatch.setattr(ops, "_check_slot_values", lambda values, slots: reads.append(values) or check(values, slots))
    return reads


def test_slot_checks_against_a_python_reading(remembering):
    """Random indices (padding, repeats, slots past the pool), each tensor checked against pools of
    several sizes and again after writes in place: raises exactly when Python says it should."""
    from lightning_op.ops import _check_state_indices

    gen = torch.Generator().manual_seed(0)
    q = torch.zeros(1)
    for trial in range(100):
        rows = int(torch.randint(0, 9, (), generator=gen))
        indices = torch.randint(-3, 9, (rows,), generator=gen, dtype=torch.int32 if trial % 2 else torch.int64)
        for _ in range(6):
            if rows and torch.rand((), generator=gen) < 0.5:
                indices[int(torch.randint(0, rows, (), generator=gen))] = int(torch.randint(-3, 9, (), generator=gen))
            slots = int(torch.randint(1, 9, (), generator=gen))
            used = [x for x in indices.tolist() if x >= 0]
            want = any(x >= slots for x in used) or len(set(used)) != len(used)
            for _ in range(2):  # the second call may be answered from the remembered check
                try:
                    _check_state_indices(indices, rows, slots, q, "rows", remember=True)
                    raised = False
                except ValueError:
                    raised = True
                assert raised == want, (indices, slots)


def test_remembered_slots_are_read_again_after_any_change(cpu_backend, remembering):
    """Slots that passed are not read again while unchanged; a write in place (to them or to the
    buffer they view), another pool size or another view is read again, before anything is written."""
    decay = torch.tensor([0.1, 0.2])
    pool = torch.randn(4, HKV, D, D)
    q, k, v = _qkv(3, 1)

    def step(slots, state=pool):
        return lightning_op.attn_step(q, k, v, state, decay, state_indices=slots)

    def refused(slots, message, state=pool):
        before = pool.clone()
        with pytest.raises(ValueError, match=message):
            step(slots, state)
        assert torch.equal(pool, before)

    slots = torch.tensor([0, 3, -1])
    step(slots)
    step(slots)
    assert len(remembering) == 1
    slots[1] = 0
    refused(slots, "more than once")
    slots[1] = 2
    step(slots)
    refused(slots, "must be < the pool's 2 slots", state=pool[:2])
    buffer = torch.tensor([0, 1, 2, 3])
    step(buffer[1:])
    reads = len(remembering)
    step(buffer[1:])  # a new view of the same buffer
    assert len(remembering) == reads
    buffer[3] = 1
    refused(buffer[1:], "more than once")
    step(buffer[:3])


def test_decode_kernel_leaves_slots_past_the_pool_alone():
    """A slot past the pool (which only an unchecked call, captured or compiled, can pass) is a
    padding row to the decode kernel: zero outputs, nothing written, the memory after the pool
    included; the other rows step as usual."""
    if not TRITON_INTERPRETING:
        pytest.skip("the decode kernel runs interpreted on CPU-only machines")
    from lightning_op.kernels.decode import launch_decode_step

    q, k, v, decay, hs = _step_inputs("own", 3, 2, seed=3)
    memory = torch.randn(5, hs, D, 24)
    pool, after_pool = memory[:3], memory[3:].clone()
    start = pool.clone()
    slots = torch.tensor([3, 1, 4], dtype=torch.int32)  # both past the pool, inside the memory after it
    out = launch_decode_step(q, k, v, pool, decay, 0.5, slots)
    assert torch.equal(memory[3:], after_pool)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    want, want_state = _token_loop(q[1:2], k[1:2], v[1:2], start, decay, 0.5, torch.tensor([1]))
    torch.testing.assert_close(out[1:2], want.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool, want_state.float(), rtol=1e-5, atol=1e-5)