"""The three forms of the semantics agree with each other."""

import math

import pytest
import torch

from lightning_op import reference, slopes


def _inputs(b, h, n, dk, dv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, n, dk, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, h, n, dv, generator=gen, dtype=torch.float64)
    init = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    return q, k, v, init


DECAYS = [None, torch.tensor([1e-5, 0.3, 30.0], dtype=torch.float64)]


@pytest.mark.parametrize("n", [0, 1, 7, 33, 48, 100])
@pytest.mark.parametrize("decay", DECAYS, ids=["no-decay", "decay"])
@pytest.mark.parametrize("with_init", [False, True])
def test_forms_agree(n, decay, with_init):
    q, k, v, init = _inputs(2, 3, n, 8, 12)
    init = init if with_init else None
    expected = reference.attention_recurrent(q, k, v, decay, 0.7, init)
    for actual in (
        reference.attention_quadratic(q, k, v, decay, 0.7, init),
        reference.attention_forward_chunked(q, k, v, decay, 0.7, init, chunk_size=16),
        reference.attention_forward_scan(q, k, v, decay, 0.7, init, chunk_size=16),
    ):
        torch.testing.assert_close(actual[0], expected[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(actual[1], expected[1], rtol=1e-10, atol=1e-10)


def test_two_pieces_equal_one_pass():
    q, k, v, init = _inputs(1, 3, 90, 8, 8, seed=2)
    decay = DECAYS[1]
    whole, whole_final = reference.attention_recurrent(q, k, v, decay, 1.0, init)
    first, mid = reference.attention_recurrent(q[:, :, :37], k[:, :, :37], v[:, :, :37], decay, 1.0, init)
    second, final = reference.attention_forward_chunked(q[:, :, 37:], k[:, :, 37:], v[:, :, 37:], decay, 1.0, mid)
    torch.testing.assert_close(torch.cat([first, second], 2), whole)
    torch.testing.assert_close(final, whole_final)


def test_strong_decay_stays_finite():
    q, k, v, init = _inputs(1, 1, 300, 8, 8, seed=3)
    decay = torch.tensor([500.0], dtype=torch.float64)
    out, final = reference.attention_forward_chunked(q, k, v, decay, 1.0, init)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    # lam ~ 0: each token sees only itself
    torch.testing.assert_close(out, (q * k).sum(-1, keepdim=True) * v)


def test_slopes_power_of_two():
    s = slopes(8)
    expected = torch.tensor([(2 ** (-8 / 8)) ** (h + 1) for h in range(8)])
    torch.testing.assert_close(s, expected)
    assert s.dtype == torch.float32 and s.shape == (8,)
    assert slopes(16)[0].item() == pytest.approx(2 ** (-0.5))


def test_slopes_other_head_counts_follow_alibi():
    s = slopes(12)
    # 8 slopes of the 8-head sequence, then every other slope of the 16-head sequence
    expected = torch.cat([slopes(8), slopes(16)[0::2][:4]])
    torch.testing.assert_close(s, expected)
    assert (s > 0).all() and len(set(s.tolist())) == 12


def test_slopes_per_layer():
    base = slopes(4)
    torch.testing.assert_close(slopes(4, 0, 5), base * (1 + 1e-5))
    torch.testing.assert_close(slopes(4, 4, 5), base * 1e-5)
    torch.testing.assert_close(slopes(4, 2, 5), base * (0.5 + 1e-5))


@pytest.mark.parametrize(
    "args, message",
    [((0,), "num_heads"), ((4, 1, None), "both"), ((4, 5, 5), "layer_idx"), ((4, 0, 1), "num_layers")],
)
def test_slopes_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        slopes(*args)


def test_decay_mask_values():
    decay = torch.tensor([math.log(2.0)], dtype=torch.float64)
    m = reference.decay_mask(decay, 3)
    expected = torch.tensor([[1.0, 0, 0], [0.5, 1, 0], [0.25, 0.5, 1]], dtype=torch.float64)
    torch.testing.assert_close(m[0], expected)


def _grouped(h, hkv, n, decay_heads, with_init, sequences=None, seed=2):
    """Inputs for grouped heads: q [1, h], k, v [1, hkv]; decay of ``decay_heads`` heads (None for 0);
    states of the heads the rule gives, one row per packed sequence."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, n, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, hkv, n, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, hkv, n, 12, generator=gen, dtype=torch.float64)
    decay = None if not decay_heads else torch.rand(decay_heads, generator=gen, dtype=torch.float64) * 0.5
    rows = 1 if sequences is None else len(sequences) - 1
    hs = reference.state_heads(h, hkv, decay)
    init = torch.randn(rows, hs, 8, 12, generator=gen, dtype=torch.float64) if with_init else None
    cu = None if sequences is None else torch.tensor(sequences)
    return q, k, v, decay, init, cu


@pytest.mark.parametrize("h, hkv, decay_heads", [(4, 4, 4), (4, 2, 4), (4, 2, 2), (6, 2, 0), (4, 1, 4), (4, 1, 1)])
@pytest.mark.parametrize("sequences", [None, [0, 5, 5, 19, 20, 33]], ids=["dense", "packed"])
@pytest.mark.parametrize("with_init", [False, True])
def test_grouped_heads_and_packed_sequences_agree(h, hkv, decay_heads, sequences, with_init):
    """Two forms written apart (the masked quadratic form repeating k and v, the recurrence
    indexing shared states) agree on grouped heads, packed sequences (an empty one among them)
    and their states."""
    q, k, v, decay, init, cu = _grouped(h, hkv, 33, decay_heads, with_init, sequences)
    out, final = reference.attention_quadratic(q, k, v, decay, 0.7, init, cu)
    out_r, final_r = reference.attention_recurrent(q, k, v, decay, 0.7, init, cu)
    shared = decay_heads != h and hkv != h
    assert final.shape == (1 if cu is None else len(sequences) - 1, hkv if shared else h, 8, 12)
    torch.testing.assert_close(out, out_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_r, rtol=1e-10, atol=1e-10)


def test_grouped_heads_with_their_own_decays_equal_repeated_keys_and_values():
    q, k, v, decay, init, _ = _grouped(4, 2, 21, 4, True)
    out, final = reference.attention_quadratic(q, k, v, decay, 0.7, init)
    want = reference.attention_recurrent(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), decay, 0.7, init)
    torch.testing.assert_close(out, want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, want[1], rtol=1e-10, atol=1e-10)


def test_packed_sequences_equal_separate_calls():
    q, k, v, decay, init, cu = _grouped(2, 2, 30, 2, True, [0, 7, 7, 30])
    out, final = reference.attention_recurrent(q, k, v, decay, 0.5, init, cu)
    for index, (start, end) in enumerate([(0, 7), (7, 7), (7, 30)]):
        want = reference.attention_recurrent(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], decay, 0.5,
                                             init[index:index + 1])
        torch.testing.assert_close(out[:, :, start:end], want[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(final[index:index + 1], want[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final[1:2], init[1:2])  # an empty sequence keeps its initial state


@pytest.mark.parametrize("h, hkv, decay_heads, sequences", [(3, 3, 3, None), (4, 2, 2, [0, 4, 11]), (4, 2, 4, None)])
def test_decay_gradient_of_the_oracle(h, hkv, decay_heads, sequences):
    """The quadratic form's decay gradient (the oracle for a learnable decay) matches finite
    differences and the recurrence's own autograd gradient, with initial and final states."""
    q, k, v, decay, init, cu = _grouped(h, hkv, 11, decay_heads, True, sequences)
    gen = torch.Generator().manual_seed(9)
    grad_out = torch.randn(1, h, 11, 12, generator=gen, dtype=torch.float64)
    grad_final = torch.randn(init.shape, generator=gen, dtype=torch.float64)

    def loss(form, d):
        out, final = form(q, k, v, d, 0.7, init, cu)
        return (out * grad_out).sum() + (final * grad_final).sum()

    decay = decay.requires_grad_()
    assert torch.autograd.gradcheck(lambda d: loss(reference.attention_quadratic, d), (decay,))
    quadratic, = torch.autograd.grad(loss(reference.attention_quadratic, decay), decay)
    recurrent, = torch.autograd.grad(loss(reference.attention_recurrent, decay), decay)
    torch.testing.assert_close(quadratic, recurrent, rtol=1e-9, atol=1e-10)
    assert quadratic.abs().min() > 0
