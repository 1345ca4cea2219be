"""lightning_op.deploy: the triton_op twin of lightning::attn and the for_package transform (CPU).

The GPU side (the Triton kernels through wrap_triton, a CUDA package) is in test_gpu.py; here the
CUDA body runs its kernels through the interpreter. The package built on CPU and run without
lightning_op is in test_examples.py and below.
"""

import itertools

import pytest
import torch

import lightning_op
from lightning_op import reference
from lightning_op.deploy import for_package, kernel_forward

from _helpers import TOLERANCE, make_inputs, rel_error, run_script


@pytest.mark.parametrize("n", [0, 1, 65, 300])
@pytest.mark.parametrize("decay_kind", ["none", "mixed"])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attn_inference_equals_attn_on_cpu(n, decay_kind, with_init, dtype):
    q, k, v = make_inputs(2, 4, n, 32, 24, dtype, layout="bnhd", seed=n)
    decay = None if decay_kind == "none" else torch.tensor([1e-5, 0.01, 0.3, 30.0])
    init = torch.randn(2, 4, 32, 24) * 0.3 if with_init else None
    out, final = torch.ops.lightning.attn_inference(q, k, v, decay, 0.6, init)
    expected_out, expected_final = torch.ops.lightning.attn(q, k, v, decay, 0.6, init)
    assert out.dtype == expected_out.dtype and final.dtype == torch.float32
    assert out.stride() == expected_out.stride()  # stored as attn stores it: q's [B, N, H, D] layout
    assert rel_error(out, expected_out) < TOLERANCE[dtype]
    assert rel_error(final, expected_final) < TOLERANCE[torch.float32]


class _TwoLayers(torch.nn.Module):
    """Two attention layers carrying states, as a deployed model would."""

    def __init__(self, hidden=64, heads=2):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            lightning_op.nn.LightningAttention(hidden, heads, layer_idx=i, num_layers=2) for i in range(2)
        )

    def forward(self, x, states):
        new_states = []
        for layer, state in zip(self.layers, states):
            y, state = layer(x, state)
            x = x + y
            new_states.append(state)
        return x, new_states


def _export(model, length=100):
    x = torch.randn(1, length, 64)
    states = [torch.randn(1, 2, 32, 32) * 0.1 for _ in range(2)]
    seq = torch.export.Dim("seq", min=1, max=1 << 16)
    return torch.export.export(model, (x, states), dynamic_shapes=({1: seq}, [None, None])), states


def _lightning_targets(ep):
    return [str(node.target) for node in ep.graph.nodes if "lightning" in str(node.target)]


def test_for_package_swaps_every_attn_node_and_keeps_the_values():
    torch.manual_seed(0)
    model = _TwoLayers().eval()
    ep, states = _export(model)
    standalone = for_package(ep)
    assert _lightning_targets(ep) == ["lightning.attn.default"] * 2  # the input is left alone
    assert _lightning_targets(standalone) == ["lightning.attn_inference.default"] * 2
    with torch.no_grad():
        for length in (1, 64, 77):  # other lengths than the traced one
            x = torch.randn(1, length, 64)
            got, want = standalone.module()(x, states), model(x, states)
            for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
                assert rel_error(a, b) < 1e-5


def test_for_package_refuses_other_lightning_ops():
    class Step(torch.nn.Module):
        def forward(self, q, state):
            return lightning_op.attn_step(q, q, q, state) * 2

    q, state = torch.randn(1, 2, 1, 16), torch.zeros(1, 2, 16, 16)
    with torch.no_grad():
        ep = torch.export.export(Step(), (q, state))
    # as exported (the op itself) and functionalized (auto_functionalized_v2 around it)
    for program in (ep, ep.run_decompositions()):
        with pytest.raises(ValueError, match="lightning.attn_step.*no standalone"):
            for_package(program)
    with pytest.raises(TypeError, match="ExportedProgram"):
        for_package(torch.nn.Linear(2, 2))


def _package(program, path) -> None:
    """AOTInductor's CPU package of ``program``, its C++ kernels not vectorised: vectorising them
    (Inductor's own codegen, the same for every graph) doubles the build on two cores, mostly in
    sympy tiling analysis of the dynamic shapes, and is no part of what these tests check."""
    with torch._inductor.config.patch({"cpp.simdlen": 0}):
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))


@pytest.mark.slow
def test_cpu_package_runs_without_lightning_op(tmp_path):
    torch.manual_seed(0)
    model = _TwoLayers().eval()
    ep, states = _export(model)
    _package(for_package(ep), tmp_path / "model_aoti.pt2")
    with torch.no_grad():
        # lengths on both sides of whole chunks of 64, and one token
        cases = [(f"{n} tokens", (x, states), model(x, states))
                 for n in (1, 63, 64, 65, 300) for x in [torch.randn(1, n, 64)]]
    torch.save(cases, tmp_path / "cases.pt")
    out = run_script("examples/run_package.py", str(tmp_path))
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "max |diff| vs eager" in line]
    assert len(diffs) == 5 and max(diffs) < 1e-4, out
    assert "lightning_op imported: False" in out


# ----------------------------------------------------------------------------- grouped heads, packed sequences

DECAY_KINDS = ["per-query-head", "per-kv-head", "none"]


def _decay(kind, heads, kv_heads):
    if kind == "none":
        return None
    count = heads if kind == "per-query-head" else kv_heads
    return torch.tensor([1e-5, 0.02, 0.3, 2.0, 30.0, 0.1][:count], dtype=torch.float64)


def _cu(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def _token_loop(q, k, v, decay, scale, initial_state, cu_seqlens):
    """The op by definition in float64, written apart from the library's forms: each sequence (or
    batch entry) and query head token by token, k and v repeated to the query heads (head h reads
    kv head h // (H / Hkv)), one state per query head; where a group shares its state (decay [Hkv]
    or none) its heads start from the same initial state, and the group's first head reports it."""
    b, h, n, _ = q.shape
    group = h // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    lam = torch.ones(h, dtype=torch.float64)
    if decay is not None:
        lam = torch.exp(-decay.double()).repeat_interleave(h // decay.shape[0])
    reported = 1 if decay is not None and decay.shape[0] == h else group  # query heads per state head
    bounds = [(0, n)] * b if cu_seqlens is None else list(zip(cu_seqlens.tolist()[:-1], cu_seqlens.tolist()[1:]))
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    finals = []
    for index, (start, end) in enumerate(bounds):
        batch = index if cu_seqlens is None else 0
        heads = []
        for head in range(h):
            state = torch.zeros(q.shape[-1], v.shape[-1], dtype=torch.float64)
            if initial_state is not None:
                state = initial_state[index, head // reported].double()
            for t in range(start, end):
                state = lam[head] * state + torch.outer(k[batch, head, t], v[batch, head, t])
                out[batch, head, t] = scale * q[batch, head, t] @ state
            heads.append(state)
        finals.append(torch.stack(heads[::reported]))
    return out, torch.stack(finals) if finals else torch.zeros(0, h // reported, q.shape[-1], v.shape[-1])


def _grouped_case(heads, kv_heads, lengths, decay_kind, with_init, batch=1, n=None, seed=0, dk=8, dv=12):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths) if n is None else n
    q = torch.randn(batch, heads, n, dk, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, n, dk, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, n, dv, generator=gen, dtype=torch.float64)
    decay = _decay(decay_kind, heads, kv_heads)
    states = batch if lengths is None else len(lengths)
    init = None
    if with_init:
        init = torch.randn(states, reference.state_heads(heads, kv_heads, decay), dk, dv, generator=gen,
                           dtype=torch.float64)
    return q, k, v, decay, init


def _assert_scan_matches_loop(q, k, v, decay, init, cu):
    got = reference.attention_forward_scan(q, k, v, decay, 0.7, init, chunk_size=16, cu_seqlens=cu)
    want = _token_loop(q, k, v, decay, 0.7, init, cu)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decay_kind", DECAY_KINDS)
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (6, 3), (4, 1)])
def test_scan_form_grouped_heads(heads, kv_heads, decay_kind):
    """Dense batches (two entries, 77 rows: five pieces of 16, the first padded)."""
    _assert_scan_matches_loop(*_grouped_case(heads, kv_heads, None, decay_kind, True, batch=2, n=77, seed=1), None)


# zero-length sequences first, inside and last; one row; whole pieces and not; many pieces
LENGTHS = [[0, 5, 0, 70, 1, 16, 33, 0], [77], [16, 16], [0, 0]]


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("with_init", [False, True])
def test_scan_form_packed_sequences(lengths, with_init):
    _assert_scan_matches_loop(*_grouped_case(3, 3, lengths, "per-query-head", with_init, seed=2), _cu(lengths))


@pytest.mark.parametrize("decay_kind", DECAY_KINDS)
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 1)])
def test_scan_form_packed_grouped(heads, kv_heads, decay_kind):
    lengths = LENGTHS[0]
    _assert_scan_matches_loop(*_grouped_case(heads, kv_heads, lengths, decay_kind, True, seed=3), _cu(lengths))


def test_scan_form_without_sequences():
    q, k, v, decay, init = _grouped_case(4, 2, [], "per-kv-head", True)
    out, final = reference.attention_forward_scan(q, k, v, decay, 1.0, init, cu_seqlens=_cu([]))
    assert out.shape == (1, 4, 0, 12) and final.shape == (0, 2, 8, 12)


@pytest.mark.slow
def test_scan_form_traces_with_symbolic_rows_and_sequences():
    """One trace (make_fx, symbolic shapes; about 20 s on 2 cores, mostly the unrolled scan) runs
    other row counts and other numbers of sequences: nothing in the graph was specialised on them
    or read from cu_seqlens while tracing."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def call(q, k, v, decay, init, cu):
        return reference.attention_forward_scan(q, k, v, decay, 0.7, init, chunk_size=16, cu_seqlens=cu)

    traced_lengths = [5, 0, 40]
    graph = make_fx(call, tracing_mode="symbolic")(*_grouped_case(4, 2, traced_lengths, "per-kv-head", True),
                                                   _cu(traced_lengths))
    for lengths in ([1, 63], LENGTHS[0], [0, 100, 0]):
        q, k, v, decay, init = _grouped_case(4, 2, lengths, "per-kv-head", True, seed=4)
        got, want = graph(q, k, v, decay, init, _cu(lengths)), _token_loop(q, k, v, decay, 0.7, init, _cu(lengths))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _float32_case(decay_kind, seed):
    lengths = [0, 5, 70, 0, 1]
    q, k, v, decay, init = _grouped_case(4, 2, lengths, decay_kind, True, seed=seed, dk=16, dv=24)  # the op's sizes
    return (q.float(), k.float(), v.float(), None if decay is None else decay.float(), init.float(),
            _cu(lengths))


@pytest.mark.parametrize("decay_kind", DECAY_KINDS)
def test_attn_inference_packed_grouped_on_cpu(decay_kind):
    q, k, v, decay, init, cu = _float32_case(decay_kind, seed=5)
    out, final = torch.ops.lightning.attn_inference(q, k, v, decay, 0.7, init, cu)
    want_out, want_final = _token_loop(q, k, v, decay, 0.7, init, cu)
    assert out.is_contiguous() and final.is_contiguous() and final.dtype == torch.float32
    assert rel_error(out, want_out) < TOLERANCE[torch.float32]
    assert rel_error(final, want_final) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("decay_kind", DECAY_KINDS)
def test_kernel_forward_packed_grouped(decay_kind):
    """The CUDA body of attn_inference (traceable kernel launches with cu_seqlens, a decay [Hkv]
    repeated over its groups, a shared state picked per group), run here by the interpreter."""
    q, k, v, decay, init, cu = _float32_case(decay_kind, seed=6)
    out, final = kernel_forward(q, k, v, decay, 0.7, init, cu)
    want_out, want_final = _token_loop(q, k, v, decay, 0.7, init, cu)
    assert final.shape == want_final.shape and final.is_contiguous()
    assert rel_error(out, want_out) < TOLERANCE[torch.float32]
    assert rel_error(final, want_final) < TOLERANCE[torch.float32]


class _PackedGrouped(torch.nn.Module):
    """Packed sequences through grouped heads (4 query heads reading 2 kv heads), as a serving
    model calls the op: once with a state per query head (decay [H]) and once with a state per
    group (decay [Hkv]), each from its own initial states."""

    def __init__(self, hidden=32, heads=4, kv_heads=2, head_dim=16):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.proj = torch.nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim)
        self.register_buffer("decay_per_query_head", lightning_op.slopes(heads))
        self.register_buffer("decay_per_group", lightning_op.slopes(kv_heads))

    def forward(self, x, cu_seqlens, state_per_query_head, state_per_group):
        n, d = x.shape[1], self.head_dim
        q, k, v = self.proj(x).split((self.heads * d, self.kv_heads * d, self.kv_heads * d), -1)
        q, k, v = (t.view(1, n, -1, d).transpose(1, 2) for t in (q, k, v))
        out, states = 0, []
        for decay, state in ((self.decay_per_query_head, state_per_query_head),
                             (self.decay_per_group, state_per_group)):
            o, state = lightning_op.lightning_attn(q, k, v, decay, scale=d ** -0.5, initial_state=state,
                                                   output_final_state=True, cu_seqlens=cu_seqlens)
            out, states = out + o, states + [state]
        return out.transpose(1, 2).reshape(1, n, -1), states


def _packed_inputs(lengths, gen):
    s = len(lengths)
    return (torch.randn(1, sum(lengths), 32, generator=gen), _cu(lengths),
            torch.randn(s, 4, 16, 16, generator=gen) * 0.1, torch.randn(s, 2, 16, 16, generator=gen) * 0.1)


@pytest.mark.slow
def test_cpu_package_of_packed_grouped_heads(tmp_path):
    """One package, exported with the row count and the number of sequences dynamic, run without
    lightning_op at other counts of both: zero-length sequences, N below, at and above whole chunks."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = _PackedGrouped().eval()
    rows, sequences = torch.export.Dim("rows", min=1, max=1 << 16), torch.export.Dim("sequences", min=1, max=1 << 12)
    ep = torch.export.export(model, _packed_inputs([40, 0, 60], gen),
                             dynamic_shapes=({1: rows}, {0: sequences + 1}, {0: sequences}, {0: sequences}))
    standalone = for_package(ep)
    assert _lightning_targets(standalone) == ["lightning.attn_inference.default"] * 2
    _package(standalone, tmp_path / "model_aoti.pt2")
    all_lengths = ([77], [1, 63], [64, 0, 65, 3], [0, 130, 0, 7, 1], [300, 20])
    with torch.no_grad():
        cases = [(f"lengths {lengths}", inputs, model(*inputs))
                 for lengths in all_lengths for inputs in [_packed_inputs(lengths, gen)]]
    torch.save(cases, tmp_path / "cases.pt")
    out = run_script("examples/run_package.py", str(tmp_path))
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "max |diff| vs eager" in line]
    assert len(diffs) == len(all_lengths) and max(diffs) < 1e-4, out
    assert "lightning_op imported: False" in out
