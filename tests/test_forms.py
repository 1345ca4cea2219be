"""Packed sequences (cu_seqlens), grouped-query heads and a learnable decay, alone and combined:
values, final states and every gradient (the decay's included) against the float64 quadratic
oracle, through both CPU implementations; bad input; opcheck; torch.compile and torch.export."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lightning_op
from lightning_op import backends, lightning_attn, reference

from _helpers import TOLERANCE, rel_error

torch.manual_seed(0)


def _inputs(h, hkv, n, dk=16, dv=32, b=1, dtype=torch.float32, layout="bhnd", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def one(heads, d):
        shape = (b, n, heads, d) if layout == "bnhd" else (b, heads, n, d)
        x = (0.5 * torch.randn(shape, generator=gen)).to(dtype)
        return x.transpose(1, 2) if layout == "bnhd" else x

    return one(h, dk), one(hkv, dk), one(hkv, dv)


def _check(q, k, v, decay, scale=0.7, initial_state=None, cu_seqlens=None, tolerance=None):
    """The op's output, final state and gradients (q, k, v, decay, initial state) against autograd
    through ``reference.attention_quadratic`` in float64."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    if q.stride(1) < q.stride(2):  # keep a [B, N, H, D] view's layout
        leaves = [x.detach().transpose(1, 2).clone().transpose(1, 2).requires_grad_() for x in (q, k, v)]
    dec = None if decay is None else decay.detach().clone().requires_grad_()
    init = None if initial_state is None else initial_state.detach().clone().requires_grad_()
    out, final = lightning_attn(*leaves, dec, scale=scale, initial_state=init, output_final_state=True,
                                cu_seqlens=cu_seqlens)
    wide = [x.detach().double().requires_grad_() for x in leaves]
    wide_dec = None if dec is None else dec.detach().double().requires_grad_()
    wide_init = None if init is None else init.detach().double().requires_grad_()
    want_out, want_final = reference.attention_quadratic(*wide, wide_dec, scale, wide_init, cu_seqlens)
    assert out.shape == want_out.shape and final.shape == want_final.shape
    assert final.dtype == torch.float32 and out.dtype == q.dtype
    # the output's gradient in the output's dtype, the same numbers for both sides: the decay's
    # gradient moves by up to a few percent between a 16-bit grad_out and its float64 source
    grad_out, grad_final = torch.randn_like(want_out).to(q.dtype).double(), torch.randn_like(want_final)
    inputs = [x for x in (*leaves, dec, init) if x is not None]
    wide_inputs = [x for x in (*wide, wide_dec, wide_init) if x is not None]
    got = torch.autograd.grad((out, final), inputs, (grad_out.to(out.dtype), grad_final.float()))
    want = torch.autograd.grad((want_out, want_final), wide_inputs, (grad_out, grad_final))
    tol = tolerance or TOLERANCE[q.dtype]
    names = ["q", "k", "v"] + (["decay"] if dec is not None else []) + (["initial_state"] if init is not None else [])
    errors = {"out": rel_error(out, want_out), "final": rel_error(final, want_final)}
    for name, g, w, x in zip(names, got, want, inputs):
        assert g.shape == x.shape, (name, g.shape, x.shape)
        errors[name] = rel_error(g, w)
    # the decay's gradient sums row products whose diagonal terms cancel (weights up to 63 on
    # float32 products): a strongly decayed head keeps about 1e-4 of its small gradient
    decay_tol = max(tol, 3e-4)
    assert all(error < (decay_tol if name == "decay" else tol) for name, error in errors.items()), errors
    return errors


SEQUENCES = torch.tensor([0, 5, 5, 83, 90, 150])  # an empty sequence and one over a chunk of 64


@pytest.mark.parametrize("hkv,decay_heads", [(4, 4), (2, 2), (2, 4), (1, 1)])
def test_grouped_heads(cpu_backend, hkv, decay_heads):
    """decay [H]: a state per query head; [Hkv]: shared by each group's heads (the state is then
    [B, Hkv, Dk, Dv]); weak and strong slopes side by side."""
    q, k, v = _inputs(4, hkv, 70, b=2)
    decay = torch.tensor([0.01, 3.0, 0.2, 0.05])[:decay_heads]
    hs = reference.state_heads(4, hkv, decay)
    _check(q, k, v, decay, initial_state=torch.randn(2, hs, 16, 32))


def test_grouped_heads_without_decay_share_states(cpu_backend):
    q, k, v = _inputs(4, 2, 40)
    errors = _check(q, k, v, None, initial_state=torch.randn(1, 2, 16, 32))
    assert set(errors) == {"out", "final", "q", "k", "v", "initial_state"}


@pytest.mark.parametrize("with_init", [False, True])
def test_packed_sequences(cpu_backend, with_init):
    q, k, v = _inputs(3, 3, 150)
    init = torch.randn(5, 3, 16, 32) if with_init else None
    _check(q, k, v, torch.tensor([0.02, 0.7, 4.0]), initial_state=init, cu_seqlens=SEQUENCES)


def test_packed_sequences_run_each_on_its_own(cpu_backend):
    """Independent of the oracle: each sequence of a pack gives what it gives alone, and an empty
    sequence's final state is its initial state."""
    q, k, v = _inputs(2, 2, 150)
    decay, init = torch.tensor([0.05, 0.5]), torch.randn(5, 2, 16, 32)
    out, final = lightning_attn(q, k, v, decay, initial_state=init, output_final_state=True, cu_seqlens=SEQUENCES)
    bounds = SEQUENCES.tolist()
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone, alone_final = lightning_attn(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], decay,
                                            initial_state=init[s:s + 1], output_final_state=True)
        torch.testing.assert_close(out[:, :, start:end], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final[s:s + 1], alone_final, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final[1], init[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_everything_combined_in_bnhd_views(cpu_backend, dtype):
    """Packed + grouped (shared states) + learnable decay + initial states, [B, N, H, D] views."""
    q, k, v = _inputs(4, 2, 150, dtype=dtype, layout="bnhd")
    _check(q, k, v, torch.tensor([0.3, 0.01]), initial_state=torch.randn(5, 2, 16, 32), cu_seqlens=SEQUENCES)


@pytest.mark.parametrize("decay", [[0.0, 0.001], [0.5, 6.0]], ids=["weak", "strong"])
def test_learnable_decay(cpu_backend, decay):
    q, k, v = _inputs(2, 2, 131, b=2)
    _check(q, k, v, torch.tensor(decay), initial_state=torch.randn(2, 2, 16, 32))


def test_decay_gradient_does_not_cancel_at_long_n():
    """N = 16K, float32: the decay's gradient within 1e-3 of the same formula in float64 (a sum
    weighted by absolute positions loses about N * 1e-7), and the same in float64 as autograd
    through the recurrence on a short prefix."""
    n = 16384
    q, k, v = _inputs(2, 2, n, dk=16, dv=16)
    grad_out = torch.randn(1, 2, n, 16)
    decay = torch.tensor([1e-4, 0.05])
    backend = backends.chunked(64)

    def decay_grad(dtype):
        cast = [x.to(dtype) for x in (grad_out, q, k, v)]
        return backends.backward(backend, cast[0], None, *cast[1:], decay.to(dtype), 0.5, None, decay_grad=True)[4]

    single, double = decay_grad(torch.float32), decay_grad(torch.float64)
    assert ((single.double() - double) / double).abs().max() < 1e-3, (single, double)


def test_decay_gradient_matches_a_second_oracle():
    """The recurrent oracle (token by token, written apart from the quadratic one) agrees on the
    decay's gradient with packed sequences, shared states and initial states."""
    q, k, v = (x.double() for x in _inputs(4, 2, 40))
    cu = torch.tensor([0, 13, 40])
    decay = torch.tensor([0.2, 0.05], dtype=torch.float64, requires_grad=True)
    init = torch.randn(2, 2, 16, 32, dtype=torch.float64)
    grads = []
    for form in (reference.attention_recurrent, reference.attention_quadratic):
        out, final = form(q, k, v, decay, 0.7, init, cu)
        grads.append(torch.autograd.grad(out.sum() + final.square().sum(), decay)[0])
    torch.testing.assert_close(grads[0], grads[1])
    out, final = lightning_attn(q.float(), k.float(), v.float(), decay.detach().float().requires_grad_(), scale=0.7,
                                initial_state=init.float(), cu_seqlens=cu, output_final_state=True)
    leaf = out.grad_fn  # the op's node
    got = torch.autograd.grad(out.sum() + final.square().sum(), leaf.next_functions[3][0].variable)[0]
    assert rel_error(got, grads[0]) < 1e-5


def test_decay_shape_gradient_and_parameter():
    """A decay Parameter (from softplus of a raw parameter, as models write it) trains: its
    gradient has its shape and reaches the raw parameter."""
    raw = torch.nn.Parameter(torch.tensor([-2.0, 0.5]))
    q, k, v = _inputs(4, 2, 30)
    out = lightning_attn(q, k, v, torch.nn.functional.softplus(raw))
    out.square().sum().backward()
    assert raw.grad is not None and raw.grad.shape == (2,) and torch.isfinite(raw.grad).all()
    assert raw.grad.abs().min() > 0


def test_no_copy_of_k_and_v_at_query_heads():
    """Grouped heads read k and v in place: the op allocates nothing the size of k at H heads.
    (Measured as peak CPU allocation through the profiler would be flaky; the chunked path's
    head index is checked instead: its gathers are per chunk.)"""
    q, k, v = _inputs(8, 2, 64)
    big = lightning_attn(q, k, v, torch.full((2,), 0.1))
    wide = lightning_attn(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), torch.full((8,), 0.1))
    torch.testing.assert_close(big, wide)


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    q, k, v = _inputs(4, 2, 20)
    good = dict(q=q, k=k, v=v, decay=None, initial_state=None, cu_seqlens=torch.tensor([0, 7, 20]))
    return good, [
        (dict(cu_seqlens=torch.tensor([0.0, 7.0, 20.0])), TypeError, "cu_seqlens must be int32 or int64"),
        (dict(cu_seqlens=torch.tensor([[0, 7, 20]])), ValueError, r"cu_seqlens must be 1-D"),
        (dict(cu_seqlens=torch.tensor([0, 7, 19])), ValueError, r"cu_seqlens must rise from 0 to N = 20"),
        (dict(cu_seqlens=torch.tensor([1, 7, 20])), ValueError, r"cu_seqlens must rise from 0"),
        (dict(cu_seqlens=torch.tensor([0, 9, 7, 20])), ValueError, r"without decreasing"),
        (dict(cu_seqlens=[0, 7, 20]), TypeError, r"cu_seqlens must be a torch.Tensor"),
        (dict(q=torch.randn(2, 4, 20, 16), k=torch.randn(2, 2, 20, 16), v=torch.randn(2, 2, 20, 32)), ValueError,
         r"with cu_seqlens the batch must be 1"),
        (dict(initial_state=torch.randn(3, 2, 16, 32)), ValueError, r"initial_state must have shape \[S, Hkv, Dk, Dv\]"),
        (dict(k=torch.randn(1, 3, 20, 16), v=torch.randn(1, 3, 20, 32)), ValueError, r"Hkv to divide H"),
        (dict(v=torch.randn(1, 4, 20, 32)), ValueError, r"v has 4 heads but k has 2"),
        (dict(decay=torch.ones(3)), ValueError, r"decay must have shape \[H\] = \[4\] .* or \[Hkv\] = \[2\]"),
        (dict(decay=torch.ones(4), initial_state=torch.randn(2, 2, 16, 32)), ValueError,
         r"initial_state must have shape \[S, H, Dk, Dv\] = \[2, 4, 16, 32\]"),
        (dict(cu_seqlens=None, initial_state=torch.randn(1, 4, 16, 32)), ValueError,
         r"initial_state must have shape \[B, Hkv, Dk, Dv\] = \[1, 2, 16, 32\]"),
    ]


def test_bad_input_names_the_argument():
    good, cases = _bad_cases()
    for override, error, message in cases:
        call = {**good, **override}
        snapshot = {name: x.clone() for name, x in call.items() if isinstance(x, torch.Tensor)}
        with pytest.raises(error, match=message):
            lightning_attn(call["q"], call["k"], call["v"], call["decay"], initial_state=call["initial_state"],
                           cu_seqlens=call["cu_seqlens"])
        if isinstance(call["cu_seqlens"], torch.Tensor) or call["cu_seqlens"] is None:  # else the schema refuses it
            with pytest.raises(error, match=message):
                torch.ops.lightning.attn(call["q"], call["k"], call["v"], call["decay"], 1.0, call["initial_state"],
                                         call["cu_seqlens"])
        for name, x in snapshot.items():  # inputs are never modified
            assert torch.equal(call[name], x), name


def test_remembered_cu_seqlens_are_read_again_after_any_change(monkeypatch):
    """On a GPU reading cu_seqlens on the host waits for the device, so a CUDA cu_seqlens that
    passed is read once for the layers of a model and the backward (the CUDA remembering taken on
    CPU tensors here), and again after any write in place, for another tensor or another N; a bad
    value written in place is still refused."""
    from lightning_op import ops

    reads = []
    check = ops._check_cu_seqlens_list
    monkeypatch.setattr(ops, "_remembered_cu_seqlens", {})
    monkeypatch.setattr(ops, "_remembers", lambda x: not x.is_inference())
    monkeypatch.setattr(ops, "_check_cu_seqlens_list", lambda values, n: reads.append(values) or check(values, n))
    q, k, v = (x.requires_grad_() for x in _inputs(4, 2, 20))
    decay = torch.tensor([0.1, 0.4])
    cu = torch.tensor([0, 7, 20])
    for layer in range(3):  # the layers of one batch, forward and backward
        lightning_attn(q, k, v, decay, cu_seqlens=cu).sum().backward()
        torch.ops.lightning.attn(q, k, v, decay, 1.0, None, cu)[0].sum().backward()
    assert reads == [[0, 7, 20]]
    cu[1] = 21
    with pytest.raises(ValueError, match="without decreasing"):
        lightning_attn(q, k, v, decay, cu_seqlens=cu)
    cu[1] = 9
    want = torch.cat([lightning_attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], decay) for a, b in ((0, 9), (9, 20))], 2)
    torch.testing.assert_close(lightning_attn(q, k, v, decay, cu_seqlens=cu), want)
    assert reads[1:] == [[0, 21, 20], [0, 9, 20]]
    lightning_attn(q, k, v, decay, cu_seqlens=cu.clone())  # another tensor
    with pytest.raises(ValueError, match="to N = 19"):  # another N
        lightning_attn(q[:, :, :19], k[:, :, :19], v[:, :, :19], decay, cu_seqlens=cu)
    assert len(reads) == 5


def test_backward_op_checks_the_decay_gradient_request():
    q, k, v = _inputs(2, 2, 10)
    with pytest.raises(ValueError, match="decay_grad=True needs a decay"):
        torch.ops.lightning.attn_bwd(torch.randn(1, 2, 10, 32), None, q, k, v, None, 1.0, None, False, None, True)


# ----------------------------------------------------------------------------- opcheck, compile, export


def test_opcheck_on_the_new_forms(cpu_backend):
    q, k, v = _inputs(4, 2, 40)
    cu = torch.tensor([0, 11, 11, 40])
    samples = [
        (q, k, v, torch.tensor([0.1, 0.6]), 0.5, torch.randn(3, 2, 16, 32), cu),
        (q, k, v, torch.tensor([0.1, 0.6, 0.0, 2.0]), 0.5, torch.randn(1, 4, 16, 32), None),
        (q, k, v, None, 1.0, None, cu),
    ]
    for q_, k_, v_, decay, scale, init, cu_ in samples:
        leaves = [x.clone().requires_grad_() for x in (q_, k_, v_)]
        dec = None if decay is None else decay.clone().requires_grad_()
        torch.library.opcheck(torch.ops.lightning.attn.default, (*leaves, dec, scale, init, cu_))
    grad_out = torch.randn(1, 4, 40, 32)
    torch.library.opcheck(torch.ops.lightning.attn_bwd.default,
                          (grad_out, torch.randn(3, 2, 16, 32), q, k, v, torch.tensor([0.1, 0.6]), 0.5,
                           torch.randn(3, 2, 16, 32), False, cu, True))


class PackedGroupedLayer(torch.nn.Module):
    """A grouped-query layer with a learnable decay over packed sequences, as a training model writes it."""

    def __init__(self, hidden=64, heads=4, kv_heads=2, head_dim=16):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = torch.nn.Linear(hidden, heads * head_dim)
        self.kv = torch.nn.Linear(hidden, 2 * kv_heads * head_dim)
        self.raw_decay = torch.nn.Parameter(torch.linspace(-3, 0, kv_heads))

    def forward(self, x, cu_seqlens):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).unbind(2)
        out = lightning_attn(q, k.transpose(1, 2), v.transpose(1, 2), torch.nn.functional.softplus(self.raw_decay),
                             scale=self.head_dim ** -0.5, cu_seqlens=cu_seqlens)
        return out.transpose(1, 2).reshape(b, n, -1)


def _train_step(model, x, cu):
    model.zero_grad()
    model(x, cu).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_compile_fullgraph_dynamic_new_packings_and_lengths_without_recompiles(cpu_backend):
    torch.manual_seed(0)
    model = PackedGroupedLayer()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    torch._dynamo.reset()
    # one sequence (S = 1) gets a graph of its own: torch specialises sizes 0 and 1 (the final state's S)
    packs = [(33, [0, 10, 33]), (70, [0, 5, 5, 64, 70]), (41, [0, 40, 41])]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n, bounds in packs:
            x, cu = torch.randn(1, n, 64), torch.tensor(bounds)
            for got, want in zip(_train_step(compiled, x, cu), _train_step(model, x, cu)):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_export_dynamic_length_and_number_of_sequences_save_load(tmp_path):
    model = PackedGroupedLayer().eval()
    n, s = torch.export.Dim("n", min=2, max=4096), torch.export.Dim("s", min=3, max=512)  # S >= 2: see above
    example = (torch.randn(1, 50, 64), torch.tensor([0, 20, 50]))
    ep = torch.export.export(model, example, dynamic_shapes=({1: n}, {0: s}))
    for length, bounds in ((3, [0, 1, 3]), (77, [0, 7, 7, 30, 77])):
        x, cu = torch.randn(1, length, 64), torch.tensor(bounds)
        torch.testing.assert_close(ep.module()(x, cu), model(x, cu))
    path = tmp_path / "packed.pt2"
    torch.export.save(ep, str(path))
    x, cu = torch.randn(1, 123, 64), torch.tensor([0, 60, 61, 123])
    torch.save({"x": x, "cu": cu, "expected": model(x, cu)}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import torch, lightning_op
        ep = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(ep.module()(io["x"], io["cu"]), io["expected"], rtol=1e-4, atol=1e-4)
        print("loaded-and-matched")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded-and-matched" in result.stdout


# ----------------------------------------------------------------------------- the module


def test_module_with_grouped_heads_and_learnable_decay():
    """``LightningAttention(num_kv_heads=, learnable_decay=True)``: shared states of Hkv heads, a
    decay that trains (its gradient as through the float64 oracle), decoding from the cache equal
    to one prefill."""
    from lightning_op.nn import LightningAttention, StateCache

    torch.manual_seed(0)
    layer = LightningAttention(64, 4, 16, num_kv_heads=2, learnable_decay=True, layer_idx=1, num_layers=3)
    torch.testing.assert_close(layer.log_decay.exp(), lightning_op.slopes(2, 1, 3))
    x = torch.randn(2, 30, 64)
    y, state = layer(x)
    assert state.shape == (2, 2, 16, 16)
    y.square().sum().backward()

    def oracle_loss(log_decay):
        h, hkv, d = 4, 2, 16
        q, k, v = torch.nn.functional.silu(layer.qkv_proj(x)).double().split((h * d, hkv * d, hkv * d), dim=-1)
        q, k, v = (t.view(2, 30, heads, d).transpose(1, 2) for t, heads in ((q, h), (k, hkv), (v, hkv)))
        o, _ = reference.attention_quadratic(q, k, v, log_decay.exp(), layer.scale)
        o = o.transpose(1, 2).reshape(2, 30, h * d)
        return layer.out_proj(torch.sigmoid(layer.gate_proj(x)) * layer.norm(o.float())).square().sum()

    wide = layer.log_decay.detach().double().requires_grad_()
    want = torch.autograd.grad(oracle_loss(wide), wide)[0]
    assert rel_error(layer.log_decay.grad, want) < 1e-4
    with torch.no_grad():
        full, _ = layer(x)
        cache = StateCache()
        pieces = [layer(x[:, :20], cache=cache)[0]] + [layer(x[:, t:t + 1], cache=cache)[0] for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.get(layer.layer_idx).shape == (2, 2, 16, 16)
    with pytest.raises(ValueError, match="num_kv_heads must be a positive divisor of num_heads 4"):
        LightningAttention(64, 4, 16, num_kv_heads=3)


def test_decode_step_with_grouped_heads(cpu_backend):
    """``attn_step`` with fewer kv heads updates the shared state in place as the op would."""
    q, k, v = _inputs(4, 2, 3)
    decay, state = torch.tensor([0.2, 0.05]), torch.randn(1, 2, 16, 32)
    want, want_state = lightning_attn(q, k, v, decay, initial_state=state, output_final_state=True)
    out = lightning_op.attn_step(q, k, v, state, decay)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(state, want_state)
