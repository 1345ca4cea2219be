"""A NaN or inf at one row of the Triton output kernels' input reaches that row and the later
rows only, never the earlier rows of its chunk (``reference._chunk_product`` is the rule; the
kernels' exact walk, ``kernels.stages``).

Each case runs the kernels twice, on clean inputs and with garbage at ``bad_row``: the outputs
before it must be bit-identical, the outputs that read it (its value column from that row on, every
column for a key) and the final state must be non-finite; the clean run matches the reference.
"""

import os

import pytest
import torch

from lightning_op import reference

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs the Triton interpreter or a GPU",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: chunks of 16 rows (the kernels' usual 64 takes the interpreter longer), several segments
SHORT_CHUNKS = dict(chunk=16, segment_len=32, state_split=2)


def _inputs(n, heads, kv_heads, dk, dv, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, n, dk, generator=gen)
    k, v = torch.randn(1, kv_heads, n, dk, generator=gen), torch.randn(1, kv_heads, n, dv, generator=gen)
    return [x.to(DEVICE, dtype) for x in (q, k, v)]


def _poisoned(x, head, row, column, value):
    x = x.clone()
    x[0, head, row, column] = value
    return x


def _check(out, final, clean, bad_row, column, heads, name, state_rows=None):
    """Rows before ``bad_row`` as in the clean run; the rows that read the value non-finite."""
    assert torch.equal(out[:, :, :bad_row], clean[:, :, :bad_row]), name
    reached = out[0, heads, bad_row:]
    if name == "v":  # its column, from its row on (and every later chunk through the state)
        assert not torch.isfinite(reached[..., column]).any()
    else:  # a key's NaN spoils every column of the rows that see it
        assert not torch.isfinite(reached).any()
    rows = final if state_rows is None else final[state_rows]
    assert not torch.isfinite(rows).all()


@pytest.mark.parametrize("name", ["k", "v"])
@pytest.mark.parametrize("n, bad_row", [(77, 40), (77, 76), (133, 97), (21, 3)])
def test_dense_odd_lengths(name, n, bad_row):
    """Odd lengths, the bad row inside a chunk, at its end, in a later segment; decay [H]."""
    from lightning_op.kernels import config_override, linear_attention

    q, k, v = _inputs(n, 2, 2, 32, 24, seed=n + bad_row)
    decay = torch.tensor([0.05, 2.5], device=DEVICE)  # 2.5: weights underflow inside a chunk
    with config_override(**SHORT_CHUNKS):
        clean, _ = linear_attention(q, k, v, decay, out_scale=0.5)
        inputs = dict(q=q, k=k, v=v)
        inputs[name] = _poisoned(inputs[name], 1, bad_row, 5, float("nan"))
        inputs[name] = _poisoned(inputs[name], 0, bad_row, 7, float("-inf"))
        out, final = linear_attention(inputs["q"], inputs["k"], inputs["v"], decay, out_scale=0.5)
    expected, _ = reference.linear_attention_chunked(q.double(), k.double(), v.double(), decay, out_scale=0.5)
    torch.testing.assert_close(clean.double(), expected, rtol=1e-4, atol=1e-4)
    for head, column in ((0, 7), (1, 5)):
        _check(out[:, head:head + 1], final[:, head:head + 1], clean[:, head:head + 1], bad_row, column, 0, name)


@pytest.mark.parametrize("name", ["k", "v"])
def test_packed_sequences_and_grouped_heads(name):
    """Packed sequences (cu_seqlens) with grouped heads (2 kv heads for 4, decay [H]): garbage in the
    second sequence leaves the first one whole and the second one's earlier rows exact."""
    from lightning_op.kernels import config_override, linear_attention

    lengths = [37, 45, 9]
    cu = torch.tensor([0, 37, 82, 91], dtype=torch.int32, device=DEVICE)
    q, k, v = _inputs(sum(lengths), 4, 2, 32, 16, seed=5)
    decay = torch.tensor([0.01, 3.0, 0.2, 0.05], device=DEVICE)
    bad_row = 37 + 30  # row 30 of the second sequence, inside its second chunk of 16
    with config_override(**SHORT_CHUNKS):
        clean, clean_final = linear_attention(q, k, v, decay, cu_seqlens=cu)
        inputs = dict(q=q, k=k, v=v)
        inputs[name] = _poisoned(inputs[name], 1, bad_row, 3, float("nan"))  # kv head 1: compute heads 2, 3
        out, final = linear_attention(inputs["q"], inputs["k"], inputs["v"], decay, cu_seqlens=cu)
    assert torch.equal(out[:, :2], clean[:, :2]) and torch.equal(final[:, :2], clean_final[:, :2])
    assert torch.equal(out[:, :, 82:], clean[:, :, 82:]) and torch.equal(final[2], clean_final[2])
    _check(out[:, 2:, :82], final[:, 2:], clean[:, 2:, :82], bad_row, 3, slice(None), name, state_rows=1)


def test_transposed_kernel_keys():
    """The transposed output kernel keeps earlier rows exact for a key's NaN or inf."""
    from lightning_op.kernels import config_override, linear_attention

    q, k, v = _inputs(61, 2, 2, 64, 32, seed=3)
    decay = torch.tensor([0.1, 2.0], device=DEVICE)
    with config_override(transposed=1, chunk=16, block_v=32):
        clean, _ = linear_attention(q, k, v, decay)
        out, final = linear_attention(q, _poisoned(k, 1, 50, 9, float("inf")), v, decay)
    _check(out[:, 1:], final[:, 1:], clean[:, 1:], 50, None, 0, "k")
    assert torch.equal(out[:, :1], clean[:, :1])


@pytest.mark.parametrize("name", ["k", "v"])
@pytest.mark.parametrize("accumulate", [0, 1])
def test_transposed_kernel(name, accumulate):
    """Both output kernels (the transposed one in two key parts) keep earlier rows exact for a NaN
    or inf in a key or a value, and give the clean run's values where none is present."""
    from lightning_op.kernels import config_override, linear_attention

    q, k, v = _inputs(61, 2, 2, 64, 32, seed=3)
    decay = torch.tensor([0.1, 2.0], device=DEVICE)
    expected, _ = reference.linear_attention_chunked(q.double(), k.double(), v.double(), decay)
    for form in (dict(transposed=1, chunk=16, block_v=32), dict(transposed=0, accumulate=accumulate, chunk=16)):
        with config_override(**form):
            clean, _ = linear_attention(q, k, v, decay)
            inputs = dict(q=q, k=k, v=v)
            inputs[name] = _poisoned(inputs[name], 1, 50, 9, float("inf"))
            out, final = linear_attention(inputs["q"], inputs["k"], inputs["v"], decay)
        torch.testing.assert_close(clean.double(), expected, rtol=1e-4, atol=1e-4)
        _check(out[:, 1:], final[:, 1:], clean[:, 1:], 50, 9, 0, name)
        assert torch.equal(out[:, :1], clean[:, :1]), form


def test_reverse_walk_and_initial_state():
    """Walked backward in time (the gradients' passes) from an initial state: a NaN at row 20 in
    walk order (position N - 1 - 20) leaves the rows walked before it exact."""
    from lightning_op.kernels import config_override, linear_attention

    n = 45
    q, k, v = _inputs(n, 1, 1, 16, 16, seed=9)
    init = torch.randn(1, 1, 16, 16, device=DEVICE)
    decay = torch.tensor([0.3], device=DEVICE)
    with config_override(chunk=16):
        clean, _ = linear_attention(q, k, v, decay, initial_state=init, reverse=True)
        out, final = linear_attention(q, k, _poisoned(v, 0, n - 1 - 20, 2, float("nan")), decay, initial_state=init,
                                      reverse=True)
    flipped, clean_flipped = out.flip(2), clean.flip(2)
    _check(flipped, final, clean_flipped, 20, 2, 0, "v")


@pytest.mark.parametrize("segments", [dict(chunk=16), dict(chunk=16, segment_len=32, state_split=2)],
                         ids=["one-segment", "segments"])
def test_gradients_of_rows_before_right_padding(monkeypatch, segments):
    """Right padding left as garbage (NaN and inf in k and v from row 50 on) and a loss that reads
    the rows before it only: the gradients of q, k and v at those rows are the clean run's, bit
    for bit (the dq pass is an output kernel; the fused dk/dv pass reads k and v row by row)."""
    from lightning_op import lightning_attn
    from lightning_op.kernels import config_override

    if DEVICE == "cpu":
        monkeypatch.setenv("LIGHTNING_OP_BACKEND", "triton")
    n, pad = 77, 50
    q, k, v = _inputs(n, 2, 2, 32, 16, seed=11)
    decay = torch.tensor([0.05, 2.5], device=DEVICE)
    weight = torch.randn(1, 2, pad, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def gradients(k, v):
        q_, k_, v_ = (x.clone().requires_grad_() for x in (q, k, v))
        with config_override(**segments):
            out = lightning_attn(q_, k_, v_, decay)
            (out[:, :, :pad] * weight).sum().backward()
        return q_.grad, k_.grad, v_.grad

    clean = gradients(k, v)
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[:, 1, pad + 3, 4] = float("nan")
    bad_v[:, 0, pad:, 2] = float("inf")
    bad_v[:, 1, pad + 9] = float("nan")
    for name, got, want in zip("qkv", gradients(bad_k, bad_v), clean):
        assert torch.equal(got[:, :, :pad], want[:, :, :pad]), name
        assert torch.isfinite(want).all(), name


@pytest.mark.parametrize("transposed", [0, 1])
def test_pool_rows_read_and_written_by_one_program(transposed):
    """States of a pool read and written in place (a serving step): a single-segment sequence's one
    program reads the row it writes. With garbage in its later rows, its earlier outputs are the
    clean run's and its row ends non-finite; the other sequence and the other rows are untouched."""
    from lightning_op.kernels import config_override, linear_attention

    q, k, v = _inputs(60, 2, 2, 64, 32, seed=21)
    decay = torch.tensor([0.1, 2.0], device=DEVICE)
    cu = torch.tensor([0, 40, 60], dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    pool = torch.randn(4, 2, 64, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    bad_v = _poisoned(v, 1, 33, 6, float("nan"))
    with config_override(transposed=transposed, chunk=16, block_v=32, segment_len=64):
        clean_pool = pool.clone()
        clean, _ = linear_attention(q, k, v, decay, initial_state=clean_pool, cu_seqlens=cu, state_rows=rows)
        bad_pool = pool.clone()
        out, _ = linear_attention(q, k, bad_v, decay, initial_state=bad_pool, cu_seqlens=cu, state_rows=rows)
    assert torch.equal(out[:, :, :33], clean[:, :, :33]) and torch.equal(out[:, :, 40:], clean[:, :, 40:])
    assert not torch.isfinite(out[0, 1, 33:40, 6]).any() and torch.equal(out[:, 0], clean[:, 0])
    assert not torch.isfinite(bad_pool[3, 1]).all() and torch.equal(bad_pool[3, 0], clean_pool[3, 0])
    assert torch.equal(bad_pool[[0, 1, 2]], clean_pool[[0, 1, 2]])
