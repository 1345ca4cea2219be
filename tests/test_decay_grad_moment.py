"""The decay's gradient from the moment of the state: ``reference.decay_gradient_chunked`` (the CPU
path) and ``kernels.decay_gradient`` (the moment pass, through Triton's interpreter on CPU) against
autograd through the float64 quadratic oracle, per head; and ``backends.backward`` on both
backends, where grouped heads, shared states and the initial and final states meet.

Lengths cross chunk boundaries (chunks of 16 rows) or stay inside one; decays weak (1e-3),
strong (5.0) and zero; every gradient compared head by head, since a strongly decayed head's is
small beside the others'."""

import os

import pytest
import torch

from lightning_op import backends, reference

from _helpers import rel_error

KERNELS = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DK, DV = 16, 32
CHUNK = 16
#: per compute head: weak, moderate, strong and no decay
DECAY = [1e-3, 0.3, 5.0, 0.0]
#: a sequence without rows, one of a single row, one of exactly a chunk, lengths no multiple of it
LENGTHS = [37, 0, 1, 16, 58]
#: per-head relative distance to float64 on the same (rounded) inputs. Interpreted (measured, CPU):
#: float32 at most 2e-6, float16 3e-6 (its products take float16 operands, the weighted ones as two
#: terms), bfloat16 3e-7 (its products run in float32). On a GPU: bfloat16 products too, whose
#: emulation on CPU (benchmarks/decay_grad_accuracy.py) stays within 6e-5 up to N = 64K.
TOLERANCE = ({torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-3} if DEVICE == "cuda" else
             {torch.float32: 1e-5, torch.float16: 3e-5, torch.bfloat16: 1e-5})

needs_kernels = pytest.mark.skipif(not KERNELS, reason="needs the Triton interpreter or a GPU")


def _forms():
    return [pytest.param("reference", id="reference"), pytest.param("kernels", id="kernels", marks=needs_kernels)]


def _moment(form, q, k, v, do, decay, scale, init, grad_final, cu=None, **launch):
    """One form's gradient per compute head (decay [H], init read per compute head, grad_final per
    compute head)."""
    if form == "reference":
        return reference.decay_gradient_chunked(q, k, v, do, decay, scale=scale, initial_state=init,
                                                grad_final=grad_final, chunk_size=CHUNK, cu_seqlens=cu)
    from lightning_op.kernels import decay_gradient

    return decay_gradient(q, k, v, do, decay, scale, init, grad_final, cu_seqlens=cu, chunk=CHUNK, **launch)


def _oracle(q, k, v, do, decay, scale, init, grad_final, cu=None):
    """dL/d decay by autograd through the quadratic form in float64 (the op's own heads: decay
    [H] or [Hkv], init and grad_final per state head)."""
    wide_decay = decay.detach().double().requires_grad_()
    out, final = reference.attention_quadratic(q.double(), k.double(), v.double(), wide_decay, scale,
                                               None if init is None else init.double(), cu)
    loss = (out * do.double()).sum()
    if grad_final is not None:
        loss = loss + (final * grad_final.double()).sum()
    return torch.autograd.grad(loss, wide_decay)[0]


def _per_head_error(got, want):
    """The largest relative distance of a head's gradient to float64."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape and torch.isfinite(got).all(), (got, want)
    return ((got - want).abs() / want.abs()).max().item()


def _rows(gen, b, heads, n, d, dtype=torch.float32, layout="bhnd"):
    if layout == "bnhd":  # [B, N, H, D] storage seen as [B, H, N, D]
        x = torch.randn(b, n, heads, d, generator=gen).transpose(1, 2)
    else:
        x = torch.randn(b, heads, n, d, generator=gen)
    return (0.5 * x).to(dtype=dtype, device=DEVICE)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("form", _forms())
@pytest.mark.parametrize("n, with_init, with_grad_final", [(1, True, True), (7, False, True), (16, True, False),
                                                           (65, True, True), (200, False, False)])
def test_dense_against_autograd(form, n, with_init, with_grad_final):
    """Batch of two, four heads with decays weak to none; lengths inside one chunk, exactly one,
    and across several; initial state and final-state gradient present or not."""
    gen = torch.Generator().manual_seed(n)
    q, k, v, do = (_rows(gen, 2, 4, n, d) for d in (DK, DK, DV, DV))
    decay = torch.tensor(DECAY, device=DEVICE)
    init = torch.randn(2, 4, DK, DV, generator=gen).to(DEVICE) if with_init else None
    grad_final = torch.randn(2, 4, DK, DV, generator=gen).to(DEVICE) if with_grad_final else None
    got = _moment(form, q, k, v, do, decay, 0.7, init, grad_final)
    want = _oracle(q, k, v, do, decay, 0.7, init, grad_final)
    assert _per_head_error(got, want) < TOLERANCE[torch.float32], (got, want)


@pytest.mark.parametrize("form", _forms())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_grouped_views_against_autograd(form, dtype):
    """Packed sequences (one empty, one of a single row, one of exactly a chunk), k and v read by
    two query heads each, every input a [B, N, H, D] view; 16-bit inputs against float64 on the
    same rounded values."""
    gen = torch.Generator().manual_seed(5)
    n = sum(LENGTHS)
    cu = _cu(LENGTHS)
    q, do = _rows(gen, 1, 4, n, DK, dtype, "bnhd"), _rows(gen, 1, 4, n, DV, dtype, "bnhd")
    k, v = _rows(gen, 1, 2, n, DK, dtype, "bnhd"), _rows(gen, 1, 2, n, DV, dtype, "bnhd")
    decay = torch.tensor(DECAY, device=DEVICE)
    init = torch.randn(len(LENGTHS), 4, DK, DV, generator=gen).to(DEVICE)
    grad_final = torch.randn(len(LENGTHS), 4, DK, DV, generator=gen).to(DEVICE)
    got = _moment(form, q, k, v, do, decay, 0.7, init, grad_final, cu)
    want = _oracle(q, k, v, do, decay, 0.7, init, grad_final, cu)
    assert _per_head_error(got, want) < TOLERANCE[dtype], (got, want)


@needs_kernels
def test_weighted_operands_split_in_two_16_bit_terms():
    """float16 inputs (products in float16 also when interpreted): rows times weights as two
    float16 terms keep the gradient within 3e-5; as one term, rounded to float16, it is 10 times
    further off (bfloat16 on a GPU, emulated: up to 5e-2 at long N)."""
    gen = torch.Generator().manual_seed(11)
    n = 160
    q, k, v, do = (_rows(gen, 1, 4, n, d, torch.float16) for d in (DK, DK, DV, DV))
    decay = torch.tensor(DECAY, device=DEVICE)
    init, grad_final = (torch.randn(1, 4, DK, DV, generator=gen).to(DEVICE) for _ in range(2))
    want = _oracle(q, k, v, do, decay, 0.7, init, grad_final)
    split, one_term = (_per_head_error(_moment("kernels", q, k, v, do, decay, 0.7, init, grad_final, split=s), want)
                       for s in (True, False))
    assert split < TOLERANCE[torch.float16] and one_term > 10 * split, (split, one_term)


def test_an_empty_sequence_adds_nothing():
    """A pack with an empty sequence gives the gradient of the pack without it: its initial state
    and final-state gradient reach no row (the final state is the initial state, whatever the decay)."""
    gen = torch.Generator().manual_seed(6)
    lengths = [20, 0, 9]
    n = sum(lengths)
    q, k, v, do = (_rows(gen, 1, 2, n, d) for d in (DK, DK, DV, DV))
    decay = torch.tensor([0.1, 0.01], device=DEVICE)
    init, grad_final = (torch.randn(3, 2, DK, DV, generator=gen).to(DEVICE) for _ in range(2))
    with_empty = _moment("reference", q, k, v, do, decay, 1.0, init, grad_final, _cu(lengths))
    keep = torch.tensor([0, 2], device=DEVICE)
    without = _moment("reference", q, k, v, do, decay, 1.0, init[keep], grad_final[keep], _cu([20, 9]))
    torch.testing.assert_close(with_empty, without, rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("n, segment_len, with_init", [(200, 32, True), (200, 48, False), (192, 64, True),
                                                        (200, 16, True)])
def test_kernel_segments_chain_their_pairs(n, segment_len, with_init):
    """A dense walk cut into segments (each segment's own end pair, chained into start pairs by two
    batched products) against autograd: the chain's S term, its lam^L factors and the initial
    state's share of every later segment; value columns split over two programs. Segments of a
    chunk each (thirteen of them), and lengths that end inside a segment or on its boundary."""
    gen = torch.Generator().manual_seed(7)
    q, do = _rows(gen, 2, 4, n, DK), _rows(gen, 2, 4, n, DV)
    k, v = _rows(gen, 2, 2, n, DK), _rows(gen, 2, 2, n, DV)
    decay = torch.tensor([1e-3, 0.05, 0.3, 0.0], device=DEVICE)
    init = torch.randn(2, 2, DK, DV, generator=gen).to(DEVICE) if with_init else None
    grad_final = torch.randn(2, 4, DK, DV, generator=gen).to(DEVICE)
    got = _moment("kernels", q, k, v, do, decay, 0.7, init, grad_final, segment_len=segment_len, block_v=16)
    wide = [x.repeat_interleave(2, 1) for x in (k, v)]
    want = _oracle(q, *wide, do, decay, 0.7, None if init is None else init.repeat_interleave(2, 1), grad_final)
    assert _per_head_error(got, want) < TOLERANCE[torch.float32], (got, want)


#: packed sequences cut into segments of 32 rows (two chunks): one over four segments (the last
#: partial), one ending on a segment's end, an empty one, one shorter than a segment, one of exactly
#: three segments, one a row into its second
SEGMENTED_LENGTHS = [120, 64, 0, 20, 96, 33]


@needs_kernels
@pytest.mark.parametrize("dtype, segment_len, with_init, with_grad_final, layout", [
    (torch.float32, 32, True, True, "bhnd"),
    (torch.float32, 48, False, False, "bhnd"),
    (torch.float32, 32, True, False, "bhnd"),
    (torch.float16, 32, True, True, "bnhd"),
    (torch.float32, 128, True, True, "bhnd"),
    (torch.float32, 512, True, True, "bhnd"),
], ids=["fp32-L32", "fp32-L48-no-states", "fp32-L32-init-only", "fp16-L32-views", "fp32-L128-uncut",
        "fp32-L512-no-pairs"])
def test_kernel_packed_segments_chain_their_pairs(dtype, segment_len, with_init, with_grad_final, layout):
    """Packed sequences cut into segments (the plan's tables, each segment's own end pair chained
    per sequence on the device) against autograd, per head: the chain's S term and lam^L factors,
    each sequence's initial state in all of its segments, no chain across a sequence boundary, and
    the final-state gradient in each sequence's last segment (M = 0 for the empty one). k, v and
    the initial states read by two query heads each; decays weak, moderate, strong and none; at
    48 rows the 96-row sequence ends on a segment's end and the 64-row one does not. At 128 rows
    no sequence is cut (the plan's piece entries are all empty), at 512 the plan has none."""
    gen = torch.Generator().manual_seed(12)
    lengths = SEGMENTED_LENGTHS
    n = sum(lengths)
    q, do = _rows(gen, 1, 4, n, DK, dtype, layout), _rows(gen, 1, 4, n, DV, dtype, layout)
    k, v = _rows(gen, 1, 2, n, DK, dtype, layout), _rows(gen, 1, 2, n, DV, dtype, layout)
    decay = torch.tensor([1e-3, 0.3, 2.0, 0.0], device=DEVICE)
    init = torch.randn(len(lengths), 2, DK, DV, generator=gen).to(DEVICE) if with_init else None
    grad_final = torch.randn(len(lengths), 4, DK, DV, generator=gen).to(DEVICE) if with_grad_final else None
    got = _moment("kernels", q, k, v, do, decay, 0.7, init, grad_final, _cu(lengths), segment_len=segment_len,
                  block_v=DV)
    wide = [x.repeat_interleave(2, 1) for x in (k, v)]
    want = _oracle(q, *wide, do, decay, 0.7, None if init is None else init.repeat_interleave(2, 1), grad_final,
                   _cu(lengths))
    assert _per_head_error(got, want) < TOLERANCE[dtype], (got, want)


def test_moment_cut_uses_only_rows_and_sequences():
    """Where the moment pass cuts (264 programs at a time, 32 per batch entry or sequence): a dense
    batch as before its packed form existed; a pack as one sequence of its N rows, however many
    sequences it holds (any of them may be long); never below 2048 rows a segment."""
    from lightning_op.kernels.launch import MOMENT_MIN_SEGMENT, _moment_cut

    wanted, per_entry = 264, 32
    assert _moment_cut(65536, 1, per_entry, False, wanted) == 8192
    assert _moment_cut(8192, 8, per_entry, False, wanted) is None  # 256 programs: a full wave
    assert _moment_cut(8192, 2, per_entry, False, wanted) == 2048
    assert _moment_cut(3000, 1, per_entry, False, wanted) == MOMENT_MIN_SEGMENT
    # 48K + 16 x 1K: the long sequence in six segments of 8K rows
    assert _moment_cut(65536, 17, per_entry, True, wanted) == _moment_cut(65536, 1, per_entry, False, wanted)
    assert _moment_cut(65536, 128, per_entry, True, wanted) == 8192  # 128 x 512, or one long among short ones
    assert _moment_cut(65536, 31, per_entry, True, wanted) == 8192
    assert _moment_cut(65536, 41, per_entry, True, wanted) == 8192  # 48K + 40 x 400
    assert _moment_cut(4096, 1, per_entry, True, wanted) == MOMENT_MIN_SEGMENT
    assert _moment_cut(4096, 2, per_entry, True, wanted) == MOMENT_MIN_SEGMENT
    assert _moment_cut(65536, 2, wanted, True, wanted) is None  # one entry's programs fill the GPU


def _backends():
    return [pytest.param(lambda: backends.chunked(CHUNK), id="chunked"),
            pytest.param(backends.triton, id="triton", marks=needs_kernels)]


@pytest.mark.parametrize("make_backend", _backends())
@pytest.mark.parametrize("decay_heads, packed", [(4, False), (2, False), (2, True)],
                         ids=["decay-per-query-head", "decay-per-kv-head", "decay-per-kv-head-packed"])
def test_backward_against_autograd(make_backend, decay_heads, packed):
    """``backends.backward``'s decay gradient with grouped heads: a decay [H] (a state per query
    head) or [Hkv] (a group shares its state: the initial state read by each of its heads, the
    final state's gradient entering its first head, the group's gradients summed)."""
    gen = torch.Generator().manual_seed(8)
    n = sum(LENGTHS) if packed else 75
    cu = _cu(LENGTHS) if packed else None
    b, states = (1, len(LENGTHS)) if packed else (2, 2)
    q, do = _rows(gen, b, 4, n, DK), _rows(gen, b, 4, n, DV)
    k, v = _rows(gen, b, 2, n, DK), _rows(gen, b, 2, n, DV)
    decay = torch.tensor(DECAY[:decay_heads], device=DEVICE)
    state_heads = reference.state_heads(4, 2, decay)
    init, grad_final = (torch.randn(states, state_heads, DK, DV, generator=gen).to(DEVICE) for _ in range(2))
    got = backends.backward(make_backend(), do, grad_final, q, k, v, decay, 0.7, init, cu_seqlens=cu,
                            decay_grad=True)[4]
    want = _oracle(q, k, v, do, decay, 0.7, init, grad_final, cu)
    assert got.dtype == torch.float32 and got.shape == decay.shape
    assert _per_head_error(got, want) < TOLERANCE[torch.float32], (got, want)


def test_long_bf16_inputs_on_the_cpu_path():
    """N = 16K, bfloat16 inputs: the CPU path (float32 from the rounded inputs) within 2e-5 of
    float64 on the same values, per head (measured 4e-6: no sum cancels), decays from weak to none."""
    n = 16384
    gen = torch.Generator().manual_seed(9)
    q, k, v, do = (_rows(gen, 1, 4, n, 16, torch.bfloat16) for _ in range(4))
    decay = torch.tensor([1e-4, 1e-3, 0.05, 0.0], device=DEVICE)
    init, grad_final = (torch.randn(1, 4, 16, 16, generator=gen).to(DEVICE) for _ in range(2))
    single = reference.decay_gradient_chunked(q, k, v, do, decay, scale=0.25, initial_state=init,
                                              grad_final=grad_final)
    double = reference.decay_gradient_chunked(*(x.double() for x in (q, k, v, do)), decay.double(), scale=0.25,
                                              initial_state=init.double(), grad_final=grad_final.double())
    assert single.dtype == torch.float32
    assert _per_head_error(single, double) < 2e-5, (single, double)


def test_the_chunked_form_does_not_depend_on_its_chunks():
    """The reference's chunk size changes the order of its sums only (float64: 1e-12)."""
    gen = torch.Generator().manual_seed(10)
    q, k, v, do = (_rows(gen, 1, 4, 150, d).double() for d in (DK, DK, DV, DV))
    decay = torch.tensor(DECAY, dtype=torch.float64, device=DEVICE)
    init, grad_final = (torch.randn(1, 4, DK, DV, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(2))
    grads = [reference.decay_gradient_chunked(q, k, v, do, decay, scale=0.7, initial_state=init,
                                              grad_final=grad_final, chunk_size=c) for c in (1, 7, 64, 256)]
    for other in grads[1:]:
        assert rel_error(other, grads[0]) < 1e-12
