"""The CUDA kernels against the float64 oracle (run on the GPU machine: ``pytest -m gpu``)."""

import pytest
import torch

import lightning_op
from lightning_op import lightning_attn
from lightning_op.kernels import choose_config

from _helpers import GPU_TOLERANCE, make_inputs, oracle, rel_error

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(b, h, n, dk, dv, dtype, decay, with_init, layout="bhnd", scale=1.0):
    q, k, v = make_inputs(b, h, n, dk, dv, dtype, "cuda", layout=layout, seed=n + dk)
    init = torch.randn(b, h, dk, dv, device="cuda") * 0.3 if with_init else None
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    init_leaf = None if init is None else init.clone().requires_grad_()
    out, final = lightning_attn(*leaves, decay, scale=scale, initial_state=init_leaf, output_final_state=True)
    grad_out = torch.randn_like(out)
    grad_final = torch.randn_like(final)
    loss = (out.float() * grad_out.float()).sum() + (final * grad_final).sum()
    grads = torch.autograd.grad(loss, leaves + ([init_leaf] if init_leaf is not None else []))
    out_ref, final_ref, grads_ref = oracle(q, k, v, decay, scale, init, grad_out, grad_final)
    tol = GPU_TOLERANCE[dtype]
    errors = {"out": rel_error(out, out_ref), "final": rel_error(final, final_ref)}
    errors.update({name: rel_error(g, r) for name, g, r in zip(("dq", "dk", "dv", "dinit"), grads, grads_ref)})
    assert max(errors.values()) < tol, errors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 65, 513, 2049])
@pytest.mark.parametrize("decay_kind", ["none", "mixed"])
@pytest.mark.parametrize("with_init", [False, True])
def test_cuda_matches_oracle(dtype, n, decay_kind, with_init):
    decay = None if decay_kind == "none" else torch.tensor([1e-5, 0.01, 0.3, 30.0], device="cuda")
    _check(2, 4, n, 64, 64, dtype, decay, with_init)


@pytest.mark.parametrize("dk, dv", [(16, 16), (128, 128), (96, 80), (256, 256), (200, 40)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_head_dims(dk, dv, dtype):
    # the default tiles of each dtype (the output kernel's form and tiles depend on it: float16's
    # float32 state operand keeps keys wider than 128 off the transposed kernel)
    _check(1, 2, 300, dk, dv, dtype, torch.tensor([0.05, 2.0], device="cuda"), True)


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_cuda_many_segments_long_sequence(layout):
    # B*H small: the launcher cuts the sequence into segments (scan across them)
    cfg = choose_config(2, 8192, 128, 128, torch.device("cuda"))
    assert cfg.segment_len < 8192
    _check(1, 2, 8192, 128, 128, torch.bfloat16, torch.tensor([1e-4, 0.01], device="cuda"), True, layout=layout)


def test_cuda_long_no_decay_finite():
    q, k, v = (torch.ones(1, 2, 65536, 64, device="cuda", dtype=torch.float16) * 0.5 for _ in range(3))
    out, final = lightning_attn(q, k, v, scale=1 / 64, output_final_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()


def test_cuda_row_offsets_beyond_2_31_elements():
    # [B, N, H, D] storage read as [B, H, N, D]: row t sits t * H * D elements in, past 2**31 here
    from lightning_op import reference

    n, h, d = 600_000, 32, 128
    assert (n - 1) * h * d > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2) * 0.5
               for _ in range(3))
    decay = torch.full((h,), 30.0, device="cuda")  # lam^64 underflows: a 64-token window is exact
    out = lightning_attn(q, k, v, decay)
    window = slice(n - 64, n)
    expected, _ = reference.attention_quadratic(
        *(x[:, :, window].double() for x in (q, k, v)), decay.double(), 1.0
    )
    assert rel_error(out[:, :, window], expected) < GPU_TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 5])
def test_cuda_decode_step_matches_op(dtype, tokens):
    from lightning_op import attn_step

    q, k, v = make_inputs(4, 16, tokens, 128, 128, dtype, "cuda", layout="bnhd", seed=tokens)
    decay = torch.linspace(1e-4, 2.0, 16, device="cuda")
    state = torch.randn(4, 16, 128, 128, device="cuda") * 0.1
    expected, expected_state = lightning_attn(q, k, v, decay, scale=0.3, initial_state=state, output_final_state=True)
    before = state.data_ptr()
    out = attn_step(q, k, v, state, decay, scale=0.3)
    assert state.data_ptr() == before
    assert rel_error(out, expected) < GPU_TOLERANCE[dtype]
    assert rel_error(state, expected_state) < GPU_TOLERANCE[dtype]


def test_cuda_decode_step_in_cuda_graph_and_reduce_overhead():
    from lightning_op import attn_step

    decay = torch.linspace(0.01, 1.0, 16, device="cuda")
    q, k, v = (torch.randn(2, 16, 1, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    state_graph = torch.randn(2, 16, 128, 128, device="cuda")
    state_eager = state_graph.clone()
    attn_step(q, k, v, state_graph.clone(), decay)  # warm up (compile, decay check) outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_graph = attn_step(q, k, v, state_graph, decay)
    for _ in range(3):
        graph.replay()
        expected = attn_step(q, k, v, state_eager, decay)
        torch.testing.assert_close(out_graph, expected)
        torch.testing.assert_close(state_graph, state_eager)

    def step(q, k, v, state):
        return attn_step(q, k, v, state, decay) * 2

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    state_compiled = state_eager.clone()
    for _ in range(4):
        got = compiled(q, k, v, state_compiled)
        torch.testing.assert_close(got, step(q, k, v, state_eager))
        torch.testing.assert_close(state_compiled, state_eager)


def test_cuda_more_than_65535_batch_heads():
    # batch*head shares grid axis 0 with the value blocks: no 65535 limit
    from lightning_op import attn_step, reference

    q, k, v = make_inputs(70_000, 1, 3, 16, 16, torch.bfloat16, "cuda", seed=1)
    out, final = lightning_attn(q, k, v, torch.tensor([0.5], device="cuda"), output_final_state=True)
    expected, expected_final = reference.attention_quadratic(q.double(), k.double(), v.double(),
                                                             torch.tensor([0.5], device="cuda").double())
    assert rel_error(out, expected) < GPU_TOLERANCE[torch.bfloat16]
    assert rel_error(final, expected_final) < GPU_TOLERANCE[torch.bfloat16]
    state = torch.zeros(70_000, 1, 16, 16, device="cuda")
    step_out = attn_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)
    assert rel_error(step_out, reference.attention_quadratic(*(x[:, :, :1].double() for x in (q, k, v)))[0]) < 2e-2


# ----------------------------------------------------------------------------- deployment (lightning_op.deploy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 7, 300, 2048, 2049, 5000])  # SEGMENT_LEN = 2048: one, two and three segments
@pytest.mark.parametrize("decay_kind", ["none", "mixed"])
@pytest.mark.parametrize("with_init", [False, True])
def test_cuda_attn_inference_matches_op(dtype, n, decay_kind, with_init):
    from lightning_op import reference
    from lightning_op.deploy import SEGMENT_LEN

    assert SEGMENT_LEN == 2048
    q, k, v = make_inputs(2, 4, n, 64, 64, dtype, "cuda", layout="bnhd", seed=n)
    decay = None if decay_kind == "none" else torch.tensor([1e-5, 0.01, 0.3, 30.0], device="cuda")
    init = torch.randn(2, 4, 64, 64, device="cuda") * 0.3 if with_init else None
    out, final = torch.ops.lightning.attn_inference(q, k, v, decay, 0.5, init)
    op_out, op_final = torch.ops.lightning.attn(q, k, v, decay, 0.5, init)
    expected_out, expected_final = reference.attention_quadratic(
        q.double(), k.double(), v.double(), None if decay is None else decay.double(), 0.5,
        None if init is None else init.double(),
    )
    tol = GPU_TOLERANCE[dtype]
    assert out.dtype == dtype and final.dtype == torch.float32
    assert rel_error(out, expected_out) < tol and rel_error(final, expected_final) < tol
    assert rel_error(out, op_out) < tol and rel_error(final, op_final) < tol


def test_cuda_package_runs_without_lightning_op(tmp_path):
    import lightning_op
    from lightning_op.deploy import for_package

    from _helpers import run_script

    torch.manual_seed(0)
    model = lightning_op.nn.LightningAttention(128, 2, layer_idx=1, num_layers=2).cuda().eval()
    x = torch.randn(1, 100, 128, device="cuda")
    state = torch.randn(1, 2, 64, 64, device="cuda") * 0.1
    seq = torch.export.Dim("seq", min=1, max=1 << 20)
    ep = torch.export.export(model, (x, state), dynamic_shapes=({1: seq}, None))
    torch._inductor.aoti_compile_and_package(for_package(ep), package_path=str(tmp_path / "model_aoti.pt2"))
    with torch.no_grad():
        cases = [(f"{n} tokens", (x, state), model(x, state))
                 for n in (1, 100, 2049, 5000) for x in [torch.randn(1, n, 128, device="cuda")]]
    torch.save(cases, tmp_path / "cases.pt")
    out = run_script("examples/run_package.py", str(tmp_path))
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "max |diff| vs eager" in line]
    assert len(diffs) == 4 and max(diffs) < 1e-3, out
    assert "lightning_op imported: False" in out


def test_cuda_remembered_launches_follow_alignment():
    """Repeated eager calls skip Triton's dispatch (kernels/_launch.py); a misaligned view after an
    aligned one of the same shape must still get the kernel compiled for it (a remembered
    vectorised kernel would read wrong or fault), and every call matches the oracle."""
    from lightning_op import reference
    from lightning_op.kernels import _launch
    from lightning_op.kernels.chunked import _chunk_output_kernel

    decay = torch.tensor([0.05, 2.0], device="cuda")
    forward = _launch.launcher(_chunk_output_kernel)
    assert isinstance(forward, _launch.FastLauncher)
    fast = []
    for offset in (0, 0, 1, 1, 0):
        base = torch.randn(3 * 2 * 300 * 64 + offset, device="cuda", dtype=torch.bfloat16)
        q, k, v = base[offset:].view(3, 1, 2, 300, 64).unbind(0)
        assert (q.data_ptr() % 16 == 0) == (offset == 0)
        before = forward.fast_launches
        out = lightning_attn(q, k, v, decay)
        fast.append(forward.fast_launches - before)
        out_ref = reference.attention_quadratic(q.double(), k.double(), v.double(), decay.double(), 1.0, None)[0]
        assert rel_error(out, out_ref) < GPU_TOLERANCE[torch.bfloat16], offset
    # the first misaligned call goes through Triton (as the first aligned one, unless an earlier
    # test launched this shape), the repeats do not
    assert fast[1:] == [1, 0, 1, 1] and fast[0] in (0, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dk, dv", [(256, 256), (128, 128), (200, 40)])
def test_cuda_transposed_output_kernel(dtype, dk, dv):
    """The opt-in transposed output kernel (forward and the dq pass) against the oracle, in the
    tiles the sweeps time: value blocks of 128 in two stages (float32: chunks of 32, blocks of 64;
    float16 keys wider than 128: chunks of 32, as its float32 state operand needs 256 KiB of
    shared memory in chunks of 64)."""
    from lightning_op.kernels import config_override

    if dtype == torch.float32:
        wide = dict(chunk=32, block_v=64)
    elif dtype == torch.float16 and dk > 128:
        wide = dict(chunk=32, block_v=128)
    else:
        wide = dict(block_v=128)
    with config_override(transposed=1, num_stages=2, **wide):
        _check(1, 2, 300, dk, dv, dtype, torch.tensor([0.05, 2.0], device="cuda"), True)
        _check(1, 2, 4100, dk, dv, dtype, torch.tensor([1e-4, 0.5], device="cuda"), False)


@pytest.mark.parametrize("n, d", [(300, 64), (8192, 128), (300, 256)])
def test_cuda_vanishing_memory_heads(n, d):
    """Decays of inf, past -decay * log2(e)'s float32 range, and merely large: lam = 0, finite
    results equal to the oracle's (every kernel form: one segment, several, wide keys)."""
    decay = torch.tensor([float("inf"), 3.0e38, 1.0e5, 0.5], device="cuda")
    _check(1, 4, n, d, d, torch.bfloat16, decay, True)
    q, k, v = make_inputs(1, 4, 3, d, d, torch.float32, "cuda", seed=3)
    state = torch.randn(1, 4, d, d, device="cuda")
    expected = lightning_attn(q, k, v, decay, initial_state=state)
    assert rel_error(lightning_op.attn_step(q, k, v, state, decay), expected) < GPU_TOLERANCE[torch.float32]


def test_cuda_changed_decays_are_read_again():
    q, k, v = make_inputs(1, 2, 100, 64, 64, torch.bfloat16, "cuda")
    decay = torch.tensor([0.1, 0.2], device="cuda")
    lightning_attn(q, k, v, decay)
    decay[0] = -1.0  # in place: a new version
    with pytest.raises(ValueError, match="slopes >= 0"):
        lightning_attn(q, k, v, decay)
    decay.data = torch.tensor([0.1, float("nan")], device="cuda")  # new storage
    with pytest.raises(ValueError, match="slopes >= 0"):
        lightning_attn(q, k, v, decay)


def test_cuda_forward_mode_derivative():
    from lightning_op import reference

    q, k, v = make_inputs(1, 2, 700, 64, 64, torch.float32, "cuda", seed=4)
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    decay = torch.tensor([0.01, 0.5], device="cuda")
    _, (d_out, d_final) = torch.func.jvp(
        lambda q, k, v: lightning_attn(q, k, v, decay, output_final_state=True), (q, k, v), tangents)
    _, (ref_out, ref_final) = torch.func.jvp(
        lambda q, k, v: reference.attention_quadratic(q, k, v, decay.double()),
        tuple(x.double() for x in (q, k, v)), tuple(t.double() for t in tangents))
    assert rel_error(d_out, ref_out) < GPU_TOLERANCE[torch.float32]
    assert rel_error(d_final, ref_final) < GPU_TOLERANCE[torch.float32]


def test_cuda_backward_op_refuses_short_gradients():
    q, k, v = make_inputs(1, 2, 100, 64, 64, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="grad_out must have the output's shape"):
        torch.ops.lightning.attn_bwd(torch.randn(1, 2, 50, 64, device="cuda", dtype=torch.bfloat16), None,
                                     q, k, v, None, 1.0, None)


# ----------------------------------------------------------------------------- packed, grouped, learnable decay, pools


def _check_forms(h, hkv, n, d, dtype, decay, cu_seqlens=None, with_init=True, layout="bhnd"):
    """The op on CUDA against autograd through the float64 quadratic oracle, the decay's gradient included."""
    from lightning_op import reference

    gen = torch.Generator(device="cuda").manual_seed(n)

    def one(heads):
        x = 0.5 * torch.randn(1, n, heads, d, device="cuda", generator=gen)
        x = x.to(dtype).transpose(1, 2) if layout == "bnhd" else x.transpose(1, 2).contiguous().to(dtype)
        return x.requires_grad_()

    q, k, v = one(h), one(hkv), one(hkv)
    dec = decay.clone().requires_grad_()
    rows = 1 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    init = (0.3 * torch.randn(rows, reference.state_heads(h, hkv, decay), d, d, device="cuda")).requires_grad_() \
        if with_init else None
    out, final = lightning_attn(q, k, v, dec, scale=0.5, initial_state=init, output_final_state=True,
                                cu_seqlens=cu_seqlens)
    wide = [x.detach().double().requires_grad_() for x in (q, k, v, dec)]
    wide_init = None if init is None else init.detach().double().requires_grad_()
    want_out, want_final = reference.attention_quadratic(*wide[:3], wide[3], 0.5, wide_init, cu_seqlens)
    # the same output gradient for both sides, in the output's dtype (a bf16 rounding of grad_out
    # alone moves the decay's gradient by 1e-2 and more against its float64 source)
    grad_out, grad_final = torch.randn_like(want_out).to(dtype).double(), torch.randn_like(want_final)
    inputs = [q, k, v, dec] + ([init] if init is not None else [])
    wide_inputs = wide + ([wide_init] if wide_init is not None else [])
    got = torch.autograd.grad((out, final), inputs, (grad_out.to(out.dtype), grad_final.float()))
    want = torch.autograd.grad((want_out, want_final), wide_inputs, (grad_out, grad_final))
    errors = {"out": rel_error(out, want_out), "final": rel_error(final, want_final)}
    errors.update({name: rel_error(g, w) for name, g, w in zip(("dq", "dk", "dv", "ddecay", "dinit"), got, want)})
    tol = GPU_TOLERANCE[dtype]
    assert all(e < (max(tol, 3e-4) if name == "ddecay" else tol) for name, e in errors.items()), errors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hkv,decay_heads", [(8, 8), (2, 2), (2, 8)])
def test_cuda_grouped_heads_and_decay_gradient(dtype, hkv, decay_heads):
    decay = torch.tensor([1e-4, 0.01, 0.3, 3.0, 0.05, 0.0, 1.0, 0.2], device="cuda")[:decay_heads]
    _check_forms(8, hkv, 700, 64, dtype, decay)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_cuda_packed_sequences(dtype, layout):
    cu = torch.tensor([0, 1, 300, 300, 2500, 2600], device="cuda")
    _check_forms(4, 2, 2600, 64, dtype, torch.tensor([0.01, 0.5], device="cuda"), cu, layout=layout)


def test_cuda_pooled_decode_and_mixed_step():
    """A mixed step (decode tokens, a prefill chunk of several segments, padding) continuing pool
    rows in place in the tiled kernels, groups sharing their states and heads with their own,
    then the same step captured in a CUDA graph and replayed."""
    from lightning_op import reference

    for decay in (torch.tensor([0.05, 0.8], device="cuda"), torch.tensor([0.05, 0.8, 0.01, 0.3], device="cuda")):
        hs = decay.shape[0]
        pool = torch.randn(6, hs, 64, 64, device="cuda")
        cu = torch.tensor([0, 1, 3000, 3001, 3700], device="cuda")
        slots = torch.tensor([3, 0, -1, 5], device="cuda")
        q, k, v = (0.5 * torch.randn(1, heads, 3700, 64, device="cuda") for heads in (4, 2, 2))

        def check(out, before):
            live = slots.clamp(min=0)
            want, final = reference.attention_recurrent(
                q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1),
                decay.double().repeat_interleave(4 // hs), 1.0,
                before[live].double().repeat_interleave(4 // hs, 1), cu)
            final = final[:, :: 4 // hs]
            assert rel_error(out[:, :, :3000], want[:, :, :3000]) < 2e-5
            assert rel_error(out[:, :, 3001:], want[:, :, 3001:]) < 2e-5
            assert torch.equal(out[:, :, 3000:3001], torch.zeros_like(out[:, :, 3000:3001]))
            for index, slot in ((0, 3), (1, 0), (3, 5)):
                assert rel_error(pool[slot], final[index]) < 2e-5
            for slot in (1, 2, 4):
                assert torch.equal(pool[slot], before[slot])

        before = pool.clone()
        check(lightning_op.attn_step(q, k, v, pool, decay, cu_seqlens=cu, state_indices=slots), before)
        pool.copy_(before)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = lightning_op.attn_step(q, k, v, pool, decay, cu_seqlens=cu, state_indices=slots)
        pool.copy_(before)
        graph.replay()
        check(out, before)


def test_cuda_repeated_packed_pooled_steps_skip_triton_dispatch():
    """Pooled packed launches pass their tables by keyword, new tensors every step: a repeated
    step of one shape launches the plan, both segment passes and the output kernel through the
    remembered launchers (kernels/_launch.py), and a step without padding rows, whose output is
    not zeroed first, matches the oracle every time."""
    from lightning_op import reference
    from lightning_op.kernels import _launch, chunked

    names = ("_packed_plan_kernel", "_segment_state_kernel", "_segment_scan_kernel", "_chunk_output_kernel")
    launchers = {name: _launch.launcher(getattr(chunked, name)) for name in names}
    assert all(isinstance(x, _launch.FastLauncher) for x in launchers.values())
    decay = torch.tensor([0.05, 0.8], device="cuda")  # per kv head: groups share their states (lead slots)
    pool = torch.randn(6, 2, 64, 64, device="cuda")
    q, k, v = (0.5 * torch.randn(1, heads, 3700, 64, device="cuda") for heads in (4, 2, 2))
    for _ in range(3):
        cu = torch.tensor([0, 1, 3000, 3001, 3700], device="cuda")
        slots = torch.tensor([3, 0, 2, 5], device="cuda")
        counts = {name: x.fast_launches for name, x in launchers.items()}
        before = pool.clone()
        out = lightning_op.attn_step(q, k, v, pool, decay, cu_seqlens=cu, state_indices=slots)
        fast = {name: x.fast_launches - counts[name] for name, x in launchers.items()}
        want, final = reference.attention_recurrent(
            q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1),
            decay.double().repeat_interleave(2), 1.0, before[slots].double().repeat_interleave(2, 1), cu)
        assert rel_error(out, want) < 2e-5
        for index, slot in enumerate((3, 0, 2, 5)):
            assert rel_error(pool[slot], final[index, ::2]) < 2e-5
        assert torch.equal(pool[1], before[1]) and torch.equal(pool[4], before[4])
    assert all(count == 1 for count in fast.values()), fast


@pytest.mark.parametrize("decay_heads", [4, 2, 0], ids=["own-states", "shared-states", "no-decay"])
def test_cuda_pooled_rows_and_grouped_heads_in_the_decode_kernel(decay_heads):
    """attn_step's pooled and grouped rows (the decode kernel) against a float64 token loop, then
    the same step captured in a CUDA graph and replayed: padding rows touch nothing."""
    from lightning_op import reference

    gen = torch.Generator(device="cuda").manual_seed(5)
    decay = torch.tensor([0.05, 0.8, 0.0, 2.0], device="cuda")[:decay_heads] if decay_heads else None
    hs = reference.state_heads(4, 2, decay)
    pool = torch.randn(9, hs, 64, 64, device="cuda", generator=gen)
    slots = torch.tensor([7, -1, 2, 0], device="cuda", dtype=torch.int32)
    q = torch.randn(4, 4, 1, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(4, 2, 1, 64, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))

    def expected(before):
        want = torch.zeros(4, 4, 1, 64, dtype=torch.float64, device="cuda")
        states = before.double().clone()
        for row, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            for h in range(4):
                s = h if hs == 4 else h // 2
                lam = 1.0 if decay is None else torch.exp(-decay[s if hs == 2 else h].double())
                state = lam * before[slot, s].double() + k[row, h // 2, 0].double()[:, None] * v[row, h // 2, 0].double()[None]
                want[row, h, 0] = 0.5 * q[row, h, 0].double() @ state
                states[slot, s] = state
        return want, states

    before = pool.clone()
    out = lightning_op.attn_step(q, k, v, pool, decay, scale=0.5, state_indices=slots)
    want, states = expected(before)
    assert rel_error(out, want) < 1e-2 and torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel_error(pool, states) < 1e-5
    for slot in (1, 3, 4, 5, 6, 8):
        assert torch.equal(pool[slot], before[slot])

    graph = torch.cuda.CUDAGraph()
    static_out = torch.empty_like(out)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_out.copy_(lightning_op.attn_step(q, k, v, pool, decay, scale=0.5, state_indices=slots))
    pool.copy_(before)  # capture ran nothing: start the replay from the same pool
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(static_out, want) < 1e-2 and rel_error(pool, states) < 1e-5


def test_cuda_package_of_packed_grouped_heads(tmp_path):
    """test_deploy's packed, grouped-head model (decay [H] and [Hkv], initial states) as a CUDA
    package through the Triton kernels, exported with N and the number of sequences dynamic, run
    without lightning_op at other counts: zero-length sequences, N across a 2048-row segment."""
    from lightning_op.deploy import for_package

    from _helpers import run_script
    from test_deploy import _PackedGrouped, _packed_inputs

    gen = torch.Generator().manual_seed(0)
    model = _PackedGrouped().cuda().eval()

    def inputs(lengths):
        return tuple(x.cuda() for x in _packed_inputs(lengths, gen))

    rows, sequences = torch.export.Dim("rows", min=1, max=1 << 16), torch.export.Dim("sequences", min=1, max=1 << 12)
    ep = torch.export.export(model, inputs([40, 0, 60]),
                             dynamic_shapes=({1: rows}, {0: sequences + 1}, {0: sequences}, {0: sequences}))
    torch._inductor.aoti_compile_and_package(for_package(ep), package_path=str(tmp_path / "model_aoti.pt2"))
    all_lengths = ([77], [0, 130, 0, 7, 1], [3000, 1, 2100])
    with torch.no_grad():
        cases = [(f"lengths {lengths}", x, model(*x)) for lengths in all_lengths for x in [inputs(lengths)]]
    torch.save(cases, tmp_path / "cases.pt")
    out = run_script("examples/run_package.py", str(tmp_path))
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "max |diff| vs eager" in line]
    assert len(diffs) == len(all_lengths) and max(diffs) < 1e-3, out
    assert "lightning_op imported: False" in out


def test_cuda_training_step_with_initial_state_never_waits_for_the_device():
    """An eager forward+backward with an initial state, once its decay has been checked, enqueues
    its work without synchronising the host with the device (a copy from the host, such as a
    ``torch.tensor`` on the GPU, waits for the stream): ``torch.cuda.set_sync_debug_mode``
    raises on any such wait."""
    q, k, v = make_inputs(1, 4, 1000, 64, 64, torch.bfloat16, "cuda", seed=3)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    init = (0.3 * torch.randn(1, 4, 64, 64, device="cuda")).requires_grad_()
    decay = torch.tensor([0.01, 0.1, 0.3, 1.0], device="cuda")

    def step():
        out, final = lightning_attn(*leaves, decay, initial_state=init, output_final_state=True)
        (out.float().sum() + final.sum()).backward()

    step()  # the decay's values are read once, the kernels compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert init.grad is not None and torch.isfinite(init.grad).all()
