"""Packed sequences whose states are rows of a pool, read and written in place by the tiled
kernels (``linear_attention(..., state_rows=...)``: what a serving step with prefill chunks and
decode tokens mixed runs), through the interpreter on CPU, against the float64 oracle run per
sequence from a copy of the pool."""

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
#: segments of 32 rows in pieces of 16: a sequence of 97 rows spans four segments
SEGMENTS = dict(chunk=16, segment_len=32, state_split=2)
#: decode tokens, prefill chunks of one and of several segments, empty sequences, padding
LENGTHS = [1, 97, 0, 1, 40, 1, 12, 33]
ROWS = [5, 0, 7, -1, 2, 9, -1, 4]  # pool rows: 1, 3, 6, 8 never named; two padding sequences
POOL = 10


def _case(h, hs, hkv, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    q, k, v = ((0.5 * torch.randn(1, heads, n, d, generator=gen)).to(dtype=dtype, device=DEVICE)
               for heads, d in ((h, DK), (hkv, DK), (hkv, DV)))
    pool = torch.randn(POOL, hs, DK, DV, generator=gen).to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return q, k, v, pool, cu


def _expected(q, k, v, decay_h, scale, pool, cu, rows):
    """Output rows and the pool after the step, sequence by sequence through the float64 oracle
    (per compute head; a shared state is its group's first head's), padding rows zeros."""
    h, hs = q.shape[1], pool.shape[1]
    out = torch.zeros(q.shape[:3] + (v.shape[3],), dtype=torch.float64, device=DEVICE)
    after = pool.double().clone()
    decay = torch.zeros(h, dtype=torch.float64, device=DEVICE) if decay_h is None else decay_h.double()
    for s, row in enumerate(rows):
        if row < 0:
            continue
        a, b = int(cu[s]), int(cu[s + 1])
        o, final = reference.attention_quadratic(
            q[:, :, a:b].double(), k[:, :, a:b].double().repeat_interleave(h // k.shape[1], 1),
            v[:, :, a:b].double().repeat_interleave(h // v.shape[1], 1), decay, scale,
            pool[row:row + 1].double().repeat_interleave(h // hs, 1))
        out[:, :, a:b] = o
        after[row] = final[0, :: h // hs]
    return out, after


@pytest.mark.parametrize(
    "h, hs, hkv, dtype, decay, transposed",
    [(4, 4, 4, torch.float32, [0.01, 3.0, 0.2, 0.05], False),   # a state per head
     (4, 4, 2, torch.bfloat16, [0.01, 3.0, 0.2, 0.05], True),   # grouped kv heads, a state per query head
     (4, 2, 2, torch.float32, [0.3, 0.3, 0.02, 0.02], False),   # groups sharing a state (decay per kv head)
     (4, 1, 1, torch.float16, None, True)],                     # one shared state, no decay
    ids=["per-head", "grouped-kv", "shared", "shared-one"],
)
@pytest.mark.parametrize("short_rows", [0, 12], ids=["tiled", "short-on-decode"])
def test_pool_rows_in_place_against_the_oracle(h, hs, hkv, dtype, decay, transposed, short_rows):
    """Every named row ends as its sequence's final state, every other row is untouched
    (bitwise), padding sequences give zero rows; both output kernels, several segments per
    sequence, int64 rows; sequences of 1 to 12 rows on the decode kernel (``short_rows``: the
    one-token ones and the 12-row one; empty and longer ones stay on the tiled kernels)."""
    from lightning_op.kernels import config_override, linear_attention

    q, k, v, pool, cu = _case(h, hs, hkv, dtype, seed=11)
    decay_h = None if decay is None else torch.tensor(decay, device=DEVICE)
    rows = torch.tensor(ROWS, dtype=torch.int64, device=DEVICE)
    want_out, want_pool = _expected(q, k, v, decay_h, 0.7, pool, cu, ROWS)
    before = pool.clone()
    with config_override(transposed=int(transposed), **SEGMENTS):
        out, returned = linear_attention(q, k, v, decay_h, out_scale=0.7, initial_state=pool, cu_seqlens=cu,
                                         state_rows=rows, short_rows=short_rows)
    assert returned is pool and out.shape == (1, h, sum(LENGTHS), DV) and out.dtype == dtype
    assert rel_error(out, want_out) < TOLERANCE[dtype]
    named = sorted(r for r in ROWS if r >= 0)
    assert rel_error(pool[named], want_pool[named]) < TOLERANCE[dtype]
    untouched = [r for r in range(POOL) if r not in named]
    assert torch.equal(pool[untouched], before[untouched])
    for s, row in enumerate(ROWS):
        if row < 0:
            assert torch.equal(out[:, :, int(cu[s]):int(cu[s + 1])], torch.zeros_like(out[:, :, int(cu[s]):int(cu[s + 1])]))


def test_one_segment_reads_and_writes_the_row_directly():
    """Sequences that fit one segment, states per head: no lead slot and no segment kernels (the
    program that reads a row writes it); int32 rows; the same values as through the oracle."""
    from lightning_op.kernels import config_override, linear_attention

    q, k, v, pool, cu = _case(2, 2, 2, torch.float32, seed=12)
    rows = torch.tensor(ROWS, dtype=torch.int32, device=DEVICE)
    want_out, want_pool = _expected(q, k, v, None, 1.0, pool, cu, ROWS)
    with config_override(chunk=16, segment_len=128):
        out, _ = linear_attention(q, k, v, None, initial_state=pool, cu_seqlens=cu, state_rows=rows)
    assert rel_error(out, want_out) < TOLERANCE[torch.float32]
    assert rel_error(pool, want_pool) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("lead_all", [False, True], ids=["own-states", "shared-states"])
def test_no_output_program_reads_a_row_that_another_writes(lead_all):
    """The plan's tables: padding sequences have no segment; a sequence of several segments (any
    sequence, where a group of heads shares its state) has its segment 0 start from a lead slot
    that holds no piece, so only the scan, an earlier launch, reads its pool row; the one program
    of a single-segment sequence with a state of its own reads the row it writes (slot -1)."""
    from lightning_op.kernels.launch import _packed_plan

    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    rows = torch.tensor(ROWS, dtype=torch.int32, device=DEVICE)
    plan = _packed_plan(cu, sum(LENGTHS), 32, 2, state_rows=rows, lead_all=lead_all)
    segments, pieces, sequences = (x.cpu().tolist() for x in (plan.segments, plan.pieces, plan.sequences))
    for s, (row, length) in enumerate(zip(ROWS, LENGTHS)):
        mine = [entry for entry in segments if entry[0] == s]
        if row < 0:
            assert mine == [] and sequences[s][1] <= 0
            continue
        count = max(1, -(-length // 32))
        assert sorted(entry[3] for entry in mine) == list(range(count))
        first = next(entry for entry in mine if entry[3] == 0)
        if count > 1 or lead_all:
            assert first[4] == sequences[s][0] and pieces[first[4]][0] == -1
            assert sequences[s][1] == (count - 1) * 2 + 1
        else:
            assert first[4] == -1 and sequences[s][1] == 0


@pytest.mark.parametrize("transposed", [False, True])
def test_rows_past_the_pool_are_padding(transposed):
    """A row at or past the pool's size (what a captured or compiled step cannot check) is padding:
    its sequence's outputs are zeros, and neither the pool nor the memory after it is written; the
    other sequences are as with that row marked -1."""
    from lightning_op.kernels import config_override, linear_attention

    q, k, v, pool, cu = _case(2, 2, 2, torch.float32, seed=13)
    store = torch.randn(POOL + 3, 2, DK, DV, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    store[:POOL] = pool
    beyond = [POOL if row == 9 else POOL + 1 if row == 4 else row for row in ROWS]  # rows 9 and 4: past
    marked = [-1 if row in (9, 4) else row for row in ROWS]
    before = store.clone()
    want_pool = pool.clone()
    with config_override(transposed=int(transposed), **SEGMENTS):
        want, _ = linear_attention(q, k, v, None, initial_state=want_pool, cu_seqlens=cu,
                                   state_rows=torch.tensor(marked, device=DEVICE))
        out, _ = linear_attention(q, k, v, None, initial_state=store[:POOL], cu_seqlens=cu,
                                  state_rows=torch.tensor(beyond, device=DEVICE))
    assert torch.equal(out, want) and torch.equal(store[:POOL], want_pool)
    assert torch.equal(store[POOL:], before[POOL:])
    for s, row in enumerate(beyond):
        if row >= POOL:
            assert not out[:, :, int(cu[s]):int(cu[s + 1])].any()
