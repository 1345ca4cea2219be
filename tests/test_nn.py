"""``lightning_op.nn``: the attention block and its state cache."""

import copy
import gc
import pickle

import pytest
import torch
import torch.nn.functional as F

from lightning_op.nn import STEP_MAX_TOKENS, LightningAttention, StateCache

from _helpers import rel_error


def _block(layer_idx=1, num_layers=4):
    torch.manual_seed(0)
    return LightningAttention(64, 4, layer_idx=layer_idx, num_layers=num_layers).eval()


def test_chunked_prefill_then_step_decode_equals_one_pass(cpu_backend):
    block = _block()
    x = torch.randn(2, 150, 64)
    with torch.no_grad():
        full, full_state = block(x)
        cache = StateCache()
        pieces = [block(x[:, :64], cache=cache)[0], block(x[:, 64:130], cache=cache)[0]]
        state_after_prefill = cache.get(block.layer_idx)
        for t in range(130, 150):
            y, state = block(x[:, t : t + 1], cache=cache)
            pieces.append(y)
        assert cache.get(block.layer_idx) is state_after_prefill  # decode steps update the cached state in place
    assert rel_error(torch.cat(pieces, 1), full) < 1e-5
    assert rel_error(cache.get(block.layer_idx), full_state) < 1e-5


def test_explicit_state_continues_a_sequence():
    block = _block()
    x = torch.randn(1, 90, 64)
    full, full_state = block(x)
    first, state = block(x[:, :33])
    second, final = block(x[:, 33:], state)
    assert rel_error(torch.cat([first, second], 1), full) < 1e-5
    assert rel_error(final, full_state) < 1e-5


def test_training_with_cache_uses_the_differentiable_op():
    block = _block().train()
    x = torch.randn(1, STEP_MAX_TOKENS - 1, 64, requires_grad=True)
    cache = StateCache()
    original = torch.randn(1, 4, 16, 16)
    cache.set(block.layer_idx, original)
    snapshot = original.clone()
    y, state = block(x, cache=cache)
    (y.sum() + state.sum()).backward()  # the returned state is differentiable too
    assert x.grad is not None and block.qkv_proj.weight.grad is not None
    assert cache.get(block.layer_idx) is not original
    torch.testing.assert_close(cache.get(block.layer_idx), state)
    torch.testing.assert_close(original, snapshot)  # the old state was not mutated


def test_per_layer_decay_and_shapes():
    first, last = _block(0, 4), _block(3, 4)
    assert (first.decay > last.decay).all()
    assert "decay" not in first.state_dict()
    y, state = first(torch.randn(3, 5, 64))
    assert y.shape == (3, 5, 64) and state.shape == (3, 4, 16, 16) and state.dtype == torch.float32


def test_cache_memory_is_constant():
    block = _block()
    cache = StateCache()
    with torch.no_grad():
        block(torch.randn(1, 200, 64), cache=cache)
        size = cache.nbytes
        for _ in range(5):
            block(torch.randn(1, 1, 64), cache=cache)
    assert cache.nbytes == size == 4 * 16 * 16 * 4
    assert len(cache) == 1 and block.layer_idx in cache
    cache.reset()
    assert len(cache) == 0 and cache.get(block.layer_idx) is None


@pytest.mark.parametrize("bad", [torch.zeros(1, 4, 16, 16, dtype=torch.float64), torch.zeros(4, 16, 16), "state"])
def test_cache_rejects_bad_states(bad):
    with pytest.raises(TypeError, match="float32"):
        StateCache().set(0, bad)


def test_bad_configuration():
    with pytest.raises(ValueError, match="not divisible"):
        LightningAttention(60, 7)
    with pytest.raises(ValueError, match="head_dim must be between 16 and 256"):
        LightningAttention(32, 4)


def _run_stack(layers, x, cache=None):
    for layer in layers:
        x = layer(x, cache=cache)[0]
    return x


def test_stacked_layers_with_distinct_indices_prefill_and_decode_as_one_pass():
    torch.manual_seed(0)
    layers = [LightningAttention(64, 4, layer_idx=i, num_layers=3).eval() for i in range(3)]
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        full = _run_stack(layers, x)
        cache = StateCache()
        pieces = [_run_stack(layers, x[:, :30], cache)]
        pieces += [_run_stack(layers, x[:, t : t + 1], cache) for t in range(30, 40)]
    assert len(cache) == 3
    assert rel_error(torch.cat(pieces, 1), full) < 1e-5


def test_layers_sharing_a_layer_idx_are_refused():
    first, second = (LightningAttention(64, 4) for _ in range(2))  # both at the default layer_idx=0
    x = torch.randn(1, 20, 64)
    cache = StateCache()
    with torch.no_grad():
        _, state = first(x, cache=cache)
        for piece in (x, x[:, :1]):  # a prefill would overwrite the entry, a decode step read and update it
            with pytest.raises(ValueError, match="layer_idx 0 .*another layer.*distinct layer_idx"):
                second(piece, cache=cache)
        with pytest.raises(ValueError, match="layer_idx 0"):
            second(x, state, cache=cache)  # an explicit state too: the result would be stored there
        torch.testing.assert_close(cache.get(0), state, rtol=0, atol=0)  # left as the first layer stored it
        # the index's own layer, and code that holds no layer, still use the entry
        first(x[:, :1], cache=cache)
        cache.set(0, torch.zeros_like(state))
        assert cache.get(0).abs().sum() == 0
        with pytest.raises(ValueError, match="layer_idx 0"):
            second(x[:, :1], cache=cache)  # setting a state by hand does not hand the entry over
        cache.reset()  # a reset frees every index
        second(x, cache=cache)
        with pytest.raises(ValueError, match="layer_idx 0"):
            first(x[:, :1], cache=cache)


def test_an_index_whose_layer_was_collected_is_free_again():
    cache = StateCache()
    x = torch.randn(1, 12, 64)
    with torch.no_grad():
        old = LightningAttention(64, 4)
        _, state = old(x, cache=cache)
        del old
        gc.collect()
        # e.g. a model rebuilt or reloaded: the new layer at this index continues the cached state
        new = LightningAttention(64, 4)
        _, continued = new(x[:, :1], cache=cache)
        torch.testing.assert_close(continued, new(x[:, :1], state)[1])


def test_cache_copies_keep_their_states():
    layer = LightningAttention(64, 4)
    cache = StateCache()
    with torch.no_grad():
        layer(torch.randn(1, 12, 64), cache=cache)
    copied = copy.deepcopy(cache)  # same owners: the copy is for the same layers
    with pytest.raises(ValueError, match="layer_idx 0"):
        copied.set(0, copied.get(0), owner=LightningAttention(64, 4))
    loaded = pickle.loads(pickle.dumps(cache))  # the layers do not travel, so no owners
    for other in (copied, loaded):
        assert other.get(0) is not cache.get(0) and torch.equal(other.get(0), cache.get(0))
    loaded.set(0, loaded.get(0), owner=LightningAttention(64, 4))


def test_returned_states_belong_to_the_caller():
    block = _block()
    x = torch.randn(1, 40, 64)
    cache = StateCache()
    with torch.no_grad():
        _, expected = block(x[:, :30])
        _, prefill_state = block(x[:, :30], cache=cache)
        _, step_state = block(x[:, 30:31], cache=cache)
        kept_step = step_state.clone()
        torch.testing.assert_close(cache.get(block.layer_idx), step_state, rtol=0, atol=0)
        for t in range(31, 40):
            block(x[:, t : t + 1], cache=cache)
        # later in-place steps changed neither state handed out
        torch.testing.assert_close(prefill_state, expected, rtol=0, atol=0)
        torch.testing.assert_close(step_state, kept_step, rtol=0, atol=0)
        # and what the caller does with them does not reach the cache
        before = cache.get(block.layer_idx).clone()
        prefill_state.zero_()
        step_state.zero_()
        torch.testing.assert_close(cache.get(block.layer_idx), before, rtol=0, atol=0)
        # an explicit state given beside a cache is the caller's too: it is read, not stepped in place
        mine = torch.randn(1, 4, 16, 16)
        kept_mine = mine.clone()
        _, continued = block(x[:, :1], mine, cache=cache)
        torch.testing.assert_close(mine, kept_mine, rtol=0, atol=0)
        torch.testing.assert_close(continued, block(x[:, :1], kept_mine)[1])


def test_meta_device():
    block = LightningAttention(64, 4, layer_idx=1, num_layers=4, device="meta")
    y, state = block(torch.empty(2, 10, 64, device="meta"))
    assert y.shape == (2, 10, 64) and y.device.type == "meta"
    assert state.shape == (2, 4, 16, 16) and state.dtype == torch.float32 and state.device.type == "meta"
    cache = StateCache()
    with torch.no_grad():
        block(torch.empty(2, 10, 64, device="meta"), cache=cache)
        y, state = block(torch.empty(2, 1, 64, device="meta"), cache=cache)
    assert y.shape == (2, 1, 64) and state.shape == (2, 4, 16, 16) and cache.get(1).device.type == "meta"


# --- the block against a plain transcription of its formula --------------------------------------


def _alibi_slopes(num_heads, layer_idx, num_layers):
    """ALiBi's slopes ``(2^(-8/H))^(h+1)`` for a power-of-two H, scaled per layer by
    ``1 - layer_idx/(num_layers-1) + 1e-5`` (TransNormerLLM / MiniMax), written out independently."""
    ratio = 2.0 ** (-8.0 / num_heads)
    factor = 1.0 - layer_idx / (num_layers - 1) + 1e-5
    return torch.tensor([ratio ** (h + 1) * factor for h in range(num_heads)], dtype=torch.float64)


def _transcription(block, x, slopes, scale):
    """The block's docstring in float64 with the block's own weights, run on the whole prefix x:
    ``q, k, v = silu(x W_qkv)`` per head, ``o = scale ((Q K^T) * M) V`` with
    ``M[t, s] = lam_h^(t-s) [t >= s]``, ``y = out_proj(sigmoid(x W_gate) * rmsnorm(o))``.
    Returns o ``[B, N, H, D]`` (the norm's input), the final state ``[B, H, D, D]`` and y."""
    x = x.double()
    weights = {name: p.detach().double() for name, p in block.named_parameters()}

    def linear(name, inputs):
        out = inputs @ weights[f"{name}.weight"].T
        return out + weights[f"{name}.bias"] if f"{name}.bias" in weights else out

    b, n, _ = x.shape
    heads, dim = block.num_heads, block.head_dim
    qkv = F.silu(linear("qkv_proj", x)).view(b, n, 3, heads, dim)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, N, D]
    lam = torch.exp(-slopes)[:, None, None]
    t = torch.arange(n, dtype=torch.float64)
    gap = t[:, None] - t[None, :]
    mask = torch.where(gap >= 0, lam ** gap.clamp(min=0), 0.0)  # [H, N, N]
    o = scale * ((q @ k.transpose(-1, -2)) * mask) @ v
    state = torch.einsum("hs,bhsk,bhsv->bhkv", lam[:, 0] ** (n - 1 - t), k, v)
    flat = o.transpose(1, 2).reshape(b, n, heads * dim)
    normed = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + block.norm.eps) * weights["norm.weight"]
    y = linear("out_proj", torch.sigmoid(linear("gate_proj", x)) * normed)
    return o.transpose(1, 2), state, y


def _assert_close_per_slice(actual, expected, dims, tol, what):
    """Relative error of every slice (the norm over ``dims``), so one bad head or position shows."""
    error = (actual.double() - expected).norm(dim=dims) / expected.norm(dim=dims)
    worst = error.argmax()
    where = tuple(int(i) for i in torch.unravel_index(worst, error.shape))
    assert error.flatten()[worst] < tol, f"{what}: relative error {error.flatten()[worst]:.2e} at {where}"


def test_block_matches_a_transcription_of_its_formula(cpu_backend):
    heads, dim, layer_idx, num_layers, scale = 4, 16, 1, 3, 0.3  # lam_h = exp(-slope_h / 2): 0.88 .. 0.998
    torch.manual_seed(0)
    block = LightningAttention(
        40, heads, head_dim=dim, layer_idx=layer_idx, num_layers=num_layers, scale=scale, bias=True
    ).eval()
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)  # not ones, so a norm weight applied wrongly shows
    slopes = _alibi_slopes(heads, layer_idx, num_layers)
    # rmsnorm takes `scale` out of y, so the attention output is read where it enters the norm
    seen = []
    block.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    prefill, steps = 40, [1, 1, 1, 3, STEP_MAX_TOKENS]
    x = torch.randn(2, prefill + sum(steps), 40)

    def check(start, end, y, state, how):
        o_ref, state_ref, y_ref = _transcription(block, x[:, :end], slopes, scale)
        o = seen.pop().view(2, end - start, heads, dim)
        # worst errors measured of the float32 block (reference / triton backend): o 7.7e-7 / 9.0e-7,
        # y 4.6e-7 / 7.3e-7, state 2.9e-7 / 7.7e-7
        _assert_close_per_slice(o, o_ref[:, start:], -1, 3e-6, f"{how}: o per (batch, position, head)")
        _assert_close_per_slice(y, y_ref[:, start:], -1, 3e-6, f"{how}: y per (batch, position)")
        _assert_close_per_slice(state, state_ref, (-2, -1), 3e-6, f"{how}: state per (batch, head)")

    with torch.no_grad():
        check(0, prefill, *block(x[:, :prefill]), "prefill")
        cache = StateCache()
        check(0, prefill, *block(x[:, :prefill], cache=cache), "prefill with a cache")
        cached = cache.get(block.layer_idx)
        start = prefill
        for count in steps:
            y, state = block(x[:, start : start + count], cache=cache)
            assert cache.get(block.layer_idx) is cached  # the in-place decode step was taken
            check(start, start + count, y, state, f"decode step of {count} at {start}")
            start += count


def test_context_parallel_layer_refuses_a_cache():
    """Each rank holds a slice of one sequence: a cache of per-layer states has no meaning there."""
    from lightning_op.nn import LightningAttention, StateCache

    layer = LightningAttention(32, 2, context_parallel_group=object())
    with pytest.raises(ValueError, match="context-parallel layer takes no cache"):
        layer(torch.randn(1, 4, 32), cache=StateCache())
