"""``torch.ops.lightning.attn``: values, final state and gradients against the float64 oracle,
through both CPU implementations (chunked PyTorch, interpreted Triton kernels); opcheck;
validation errors."""

import pytest
import torch

import lightning_op
from lightning_op import lightning_attn

from _helpers import TOLERANCE, RecordedOps, make_inputs, oracle, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# per-head slopes spanning the range users meet: almost none (1e-5) to vanishing memory (30)
MIXED_DECAY = torch.tensor([1e-5, 0.05, 1.0, 30.0])


def _check_against_oracle(q, k, v, decay, scale, init, *, with_grad_final=True):
    dtype = q.dtype
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    init_leaf = None if init is None else init.detach().clone().requires_grad_()
    out, final = lightning_attn(*leaves, decay, scale=scale, initial_state=init_leaf, output_final_state=True)
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == dtype
    assert final.shape == (q.shape[0], q.shape[1], q.shape[3], v.shape[3]) and final.dtype == torch.float32

    gen = torch.Generator().manual_seed(99)
    grad_out = torch.randn(out.shape, generator=gen).to(dtype)
    grad_final = torch.randn(final.shape, generator=gen) if with_grad_final else None
    loss = (out.float() * grad_out.float()).sum()
    if with_grad_final:
        loss = loss + (final * grad_final).sum()
    inputs = leaves + ([init_leaf] if init_leaf is not None else [])
    grads = torch.autograd.grad(loss, inputs)

    out_ref, final_ref, grads_ref = oracle(q, k, v, decay, scale, init, grad_out, grad_final)
    tol = TOLERANCE[dtype]
    assert rel_error(out, out_ref) < tol
    assert rel_error(final, final_ref) < tol
    for name, g, g_ref in zip(("dq", "dk", "dv", "d_initial_state"), grads, grads_ref):
        assert g.shape == g_ref.shape, name
        assert rel_error(g, g_ref) < tol, name
    if init_leaf is not None:
        assert grads[3].dtype == init.dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 65, 200])
@pytest.mark.parametrize("decay", [None, MIXED_DECAY], ids=["no-decay", "decay"])
@pytest.mark.parametrize("with_init", [False, True], ids=["zero-state", "init-state"])
def test_matches_oracle(cpu_backend, dtype, n, decay, with_init):
    q, k, v = make_inputs(2, 4, n, 32, 48, dtype, seed=n)
    init = torch.randn(2, 4, 32, 48) * 0.3 if with_init else None
    _check_against_oracle(q, k, v, decay, 0.25, init)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_odd_length(cpu_backend, dtype):
    q, k, v = make_inputs(1, 4, 513, 16, 24, dtype, seed=7)
    init = torch.randn(1, 4, 16, 24)
    _check_against_oracle(q, k, v, MIXED_DECAY, 1.0, init)


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_bnhd_views_and_odd_head_dims(cpu_backend, layout):
    q, k, v = make_inputs(2, 2, 70, 24, 40, torch.float32, layout=layout, seed=8)
    if layout == "bnhd":
        assert not q.is_contiguous()
    _check_against_oracle(q, k, v, torch.tensor([0.1, 2.0]), 0.5, None, with_grad_final=False)


def test_gradients_come_back_in_the_inputs_layout(cpu_backend):
    """[B, N, H, D] leaves seen as [B, H, N, D] views get gradients stored as [B, N, H, D] from the
    backward op itself (no copy by autograd); its fake agrees (opcheck), in both layouts."""
    leaves = [torch.randn(2, 70, 3, d, requires_grad=True) for d in (24, 24, 40)]
    q, k, v = (x.transpose(1, 2) for x in leaves)
    decay = torch.tensor([0.1, 2.0, 0.0])
    out = lightning_attn(q, k, v, decay, scale=0.5)
    grad_out = torch.randn_like(out)
    dq, dk, dv, _, _ = torch.ops.lightning.attn_bwd(grad_out, None, q, k, v, decay, 0.5, None, bnhd_grads=True)
    for grad, x in zip((dq, dk, dv), (q, k, v)):
        assert grad.stride() == x.stride()
    out.backward(grad_out)
    for leaf, grad in zip(leaves, (dq, dk, dv)):
        assert leaf.grad.is_contiguous() and torch.equal(leaf.grad, grad.transpose(1, 2))
    # what autograd kept is what the op allocated: no copy on the way to the leaves
    grads = torch.autograd.grad(lightning_attn(q, k, v, decay, scale=0.5), leaves, grad_out)
    for got in grads:
        assert got.is_contiguous() and got._base is not None
    plain = torch.ops.lightning.attn_bwd(grad_out, None, q, k, v, decay, 0.5, None)
    for grad, bnhd in zip(plain[:3], (dq, dk, dv)):
        assert grad.is_contiguous() and torch.equal(grad, bnhd)
    for flag in (False, True):  # attn_bwd has no backward: detached inputs
        inputs = (grad_out, None, q.detach(), k.detach(), v.detach(), decay, 0.5, None, flag)
        torch.library.opcheck(torch.ops.lightning.attn_bwd.default, inputs)


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_output_comes_back_in_the_query_layout(cpu_backend, packed):
    """q seen through transpose(1, 2) of [B, N, H, D] storage: the output is stored the same way,
    so the usual transpose(1, 2).reshape(B, N, H * Dv) before an output projection is a view, on
    every entry (the wrapper, the op, its fake: opcheck), with the values of the contiguous call;
    a contiguous q keeps a contiguous output. Grouped heads and packed sequences too."""
    b, n, h, hkv, dk, dv = (1, 37, 4, 2, 16, 24) if packed else (2, 37, 4, 2, 16, 24)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(b, n, h, dk, generator=gen).transpose(1, 2)
    k = torch.randn(b, n, hkv, dk, generator=gen).transpose(1, 2)
    v = torch.randn(b, n, hkv, dv, generator=gen).transpose(1, 2)
    decay = torch.tensor([0.1, 2.0])
    cu = torch.tensor([0, 10, 10, n]) if packed else None
    want, want_final = lightning_attn(*(x.contiguous() for x in (q, k, v)), decay, cu_seqlens=cu,
                                      output_final_state=True)
    assert want.is_contiguous()
    for out, final in (lightning_attn(q, k, v, decay, cu_seqlens=cu, output_final_state=True),
                       torch.ops.lightning.attn(q, k, v, decay, 1.0, None, cu)):
        assert out.stride() == (n * h * dv, dv, h * dv, 1)
        flat = out.transpose(1, 2).reshape(b, n, h * dv)
        assert flat.data_ptr() == out.data_ptr() and flat._base is not None  # a view, no copy
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final, want_final, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.lightning.attn.default, (q, k, v, decay, 1.0, None, cu))
    # one head: both layouts are one storage order, and the output is contiguous
    one = torch.randn(b, n, 1, dk, generator=gen).transpose(1, 2)
    assert torch.ops.lightning.attn(one, one, one[..., :dk], None, 1.0, None, cu)[0].is_contiguous()


def test_gradient_of_an_output_in_the_query_layout_is_read_in_place(cpu_backend, monkeypatch):
    """The gradient of an output stored as [B, N, H, Dv] reaches the backward op without a copy
    (the op reads either layout); gradients in any other layout (expanded, sliced) are copied
    into one and give the same values."""
    from lightning_op import ops

    gen = torch.Generator().manual_seed(6)
    leaves = [torch.randn(2, 21, 3, 16, generator=gen, requires_grad=True) for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in leaves)
    decay = torch.tensor([0.0, 0.5, 3.0])
    seen = []
    real = ops._attn_bwd_impl

    def spy(grad_out, *args, **kwargs):
        seen.append(grad_out)
        return real(grad_out, *args, **kwargs)

    want = oracle(*(x.detach() for x in (q, k, v)), decay, 1.0, None,
                  torch.ones(2, 3, 21, 16, dtype=torch.float64), None)[2]
    stored = torch.ones(2, 21, 3, 16).transpose(1, 2)
    for grad_out in (stored, torch.ones(()).expand(2, 3, 21, 16), torch.ones(2, 3, 21, 32)[..., ::2]):
        seen.clear()
        with monkeypatch.context() as patch:
            patch.setattr(ops, "_attn_bwd_impl", spy)
            grads = torch.autograd.grad(lightning_attn(q, k, v, decay), (q, k, v), grad_out)
        if grad_out is stored:
            assert seen[0] is grad_out
        else:
            assert seen[0].stride() in ((1008, 336, 16, 1), (1008, 16, 48, 1))
        for got, ref in zip(grads, want):
            assert rel_error(got, ref) < TOLERANCE[torch.float32]


def test_gradient_layout_check_allocates_nothing_when_the_layout_is_right():
    """attn_bwd's final layout check must not allocate a gradient-sized buffer (that would add
    0.25 GiB of peak memory at the main benchmark shape); it copies only a tensor in the wrong layout."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lightning_op._layout import in_layout

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.new_empty):
                self.count += 1
            return func(*args, **(kwargs or {}))

    bhnd = torch.randn(2, 3, 5, 4)
    bnhd = torch.randn(2, 5, 3, 4).transpose(1, 2)
    for x, flag in ((bhnd, False), (bnhd, True)):
        with Allocations() as mode:
            assert in_layout(x, flag) is x
        assert mode.count == 0
    with Allocations() as mode:
        moved = in_layout(bhnd, True)
    assert mode.count == 1 and moved.stride() == bnhd.stride() and torch.equal(moved, bhnd)


def test_only_final_state_used(cpu_backend):
    q, k, v = make_inputs(1, 2, 40, 16, 16, torch.float32, seed=9)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    _, final = lightning_attn(*leaves, torch.tensor([0.2, 0.0]), output_final_state=True)
    final.sum().backward()
    _, _, grads_ref = oracle(q, k, v, torch.tensor([0.2, 0.0]), 1.0, None, torch.zeros(1, 2, 40, 16),
                             torch.ones(1, 2, 16, 16))
    for leaf, g_ref in zip(leaves, grads_ref):
        assert rel_error(leaf.grad, g_ref) < TOLERANCE[torch.float32]


def test_empty_sequence(cpu_backend):
    q, k, v = make_inputs(2, 3, 0, 16, 32, torch.float32)
    init = torch.randn(2, 3, 16, 32, requires_grad=True)
    out, final = lightning_attn(q, k, v, torch.ones(3), initial_state=init, output_final_state=True)
    assert out.shape == (2, 3, 0, 32)
    torch.testing.assert_close(final, init.detach())
    assert final.data_ptr() != init.data_ptr()  # a new tensor, never an alias of the input
    grad = torch.randn(2, 3, 16, 32)
    (final * grad).sum().backward()
    torch.testing.assert_close(init.grad, grad)
    out, final = lightning_attn(q, k, v, output_final_state=True)
    assert final.abs().sum() == 0


def test_two_pieces_equal_one_pass(cpu_backend):
    q, k, v = make_inputs(2, 4, 150, 32, 32, torch.float32, seed=10)
    whole, whole_final = lightning_attn(q, k, v, MIXED_DECAY, output_final_state=True)
    first, state = lightning_attn(q[:, :, :77], k[:, :, :77], v[:, :, :77], MIXED_DECAY, output_final_state=True)
    second, final = lightning_attn(q[:, :, 77:], k[:, :, 77:], v[:, :, 77:], MIXED_DECAY, initial_state=state,
                                   output_final_state=True)
    torch.testing.assert_close(torch.cat([first, second], 2), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, whole_final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_sequence_without_decay_stays_finite(cpu_backend, dtype):
    n = 4096 if cpu_backend == "reference" else 1024
    q, k, v = (torch.ones(1, 1, n, 16, dtype=dtype) for _ in range(3))
    out, final = lightning_attn(q, k, v, scale=1.0 / 256, output_final_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    # o_t = scale * (t+1) * 16 for all-ones inputs
    expected = (torch.arange(1, n + 1, dtype=torch.float64) * 16 / 256)[:, None].expand(n, 16)
    assert rel_error(out[0, 0], expected) < TOLERANCE[dtype]


def test_scale_is_applied_to_the_initial_state_term(cpu_backend):
    q, k, v = make_inputs(1, 1, 5, 16, 16, torch.float32)
    init = torch.randn(1, 1, 16, 16)
    out = lightning_attn(q, k * 0, v, initial_state=init, scale=3.0)
    torch.testing.assert_close(out, 3.0 * q @ init)


def test_opcheck(cpu_backend):
    q, k, v = make_inputs(1, 2, 33, 16, 32, torch.float32)
    decay = torch.tensor([0.5, 0.01])
    init = torch.randn(1, 2, 16, 32)
    variants = [
        (q, k, v, None, 1.0, None),
        (q, k, v, decay, 0.3, None),
        (q, k, v, None, 1.0, init),
        (q, k, v.transpose(1, 2).contiguous().transpose(1, 2), decay, 0.3, init),
    ]
    for args in variants:
        grad_args = tuple(
            x.clone().requires_grad_() if isinstance(x, torch.Tensor) and i in (0, 1, 2, 5) else x
            for i, x in enumerate(args)
        )
        for sample in (args, grad_args):
            torch.library.opcheck(torch.ops.lightning.attn.default, sample)
    grad_out = torch.randn(1, 2, 33, 32)
    for bwd_args in (
        (grad_out, None, q, k, v, None, 1.0, None),
        (grad_out, torch.randn(1, 2, 16, 32), q, k, v, decay, 0.5, init),
    ):
        torch.library.opcheck(torch.ops.lightning.attn_bwd.default, bwd_args)


def test_opcheck_training_forward_and_its_states(cpu_backend):
    """``attn_train`` (what the op's autograd runs where the forward's cut is known) and
    ``attn_bwd`` taking its start states: fakes, schemas and autograd registration (opcheck),
    dense and packed with a shared state; the op's grads under a forced cut (which takes
    ``attn_train``) equal the oracle's. Bad cuts and states are refused, naming the argument."""
    from lightning_op.kernels import config_override

    q, k, v = make_inputs(1, 4, 300, 16, 32, torch.float32)
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    decay = torch.tensor([0.5, 0.01])
    init = torch.randn(1, 2, 16, 32)
    cu = torch.tensor([0, 30, 30, 300])
    grad_out = torch.randn(1, 4, 300, 32)
    for cu_, init_ in ((None, init), (cu, torch.randn(3, 2, 16, 32))):
        out, final, states = torch.ops.lightning.attn_train(q, k, v, decay, 0.3, init_, cu_, 128, 2)
        assert states.shape == (4, 2 * 2 + 1, 16, 32) and states.dtype == torch.float32  # ceil(300 / 128) = 3
        want_out, want_final = torch.ops.lightning.attn(q, k, v, decay, 0.3, init_, cu_)
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(final, want_final)
        torch.library.opcheck(torch.ops.lightning.attn_train.default, (q, k, v, decay, 0.3, init_, cu_, 128, 2))
        torch.library.opcheck(torch.ops.lightning.attn_bwd.default,
                              (grad_out, None, q, k, v, decay, 0.3, init_, False, cu_, False, states, 128, 2))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, init)]
    with config_override(chunk=16, segment_len=32, state_split=2):
        out, final = torch.ops.lightning.attn(*leaves[:3], decay, 0.3, leaves[3])
    grad_final = torch.randn_like(final)
    torch.autograd.backward((out, final), (grad_out, grad_final))
    expected = oracle(q, k, v, decay, 0.3, init, grad_out, grad_final)
    for got, want in zip((out, final, *(x.grad for x in leaves)), (expected[0], expected[1], *expected[2])):
        assert rel_error(got, want) < 1e-5
    with pytest.raises(ValueError, match="segment_len must be a positive int"):
        torch.ops.lightning.attn_train(q, k, v, decay, 0.3, init, None, 0, 1)
    with pytest.raises(ValueError, match=r"forward_states must have attn_train's start states' shape"):
        torch.ops.lightning.attn_bwd(grad_out, None, q, k, v, decay, 0.3, init, False, None, False,
                                     torch.zeros(4, 6, 16, 32), 128, 2)
    with pytest.raises(TypeError, match="forward_states must be float32"):
        torch.ops.lightning.attn_bwd(grad_out, None, q, k, v, decay, 0.3, init, False, None, False,
                                     torch.zeros(4, 5, 16, 32, dtype=torch.float64), 128, 2)


@pytest.mark.parametrize("path", ["op", "op-keeping-states", "wrapper"])
def test_each_input_gets_its_gradient_alone(cpu_backend, path, monkeypatch):
    """Each input requiring grad alone, and all but the decay, through the op's own autograd (as
    compiled graphs and direct calls of ``torch.ops.lightning.attn`` run it; with a cut that
    takes ``attn_train``) and through the wrapper: the gradient of what requires it (the float64
    oracle's), None for the rest, and the decay's moment pass only when the decay asks for it."""
    from lightning_op import backends
    from lightning_op.kernels import config_override

    if path == "op-keeping-states" and cpu_backend == "reference":
        pytest.skip("the chunked form keeps no start states")
    q, k, v = make_inputs(1, 2, 150, 16, 24, torch.float32)
    decay = torch.tensor([0.05, 0.4], dtype=q.dtype)
    init = torch.randn(1, 2, 16, 24, dtype=q.dtype)
    grad_out = torch.randn(1, 2, 150, 24, dtype=q.dtype)
    wide = [x.detach().double().clone().requires_grad_() for x in (q, k, v, decay, init)]
    out, final = lightning_op.reference.attention_quadratic(*wide[:3], wide[3], 0.6, wide[4])
    expected = torch.autograd.grad((out * grad_out.double()).sum() + final.sum(), wide)
    moment_passes = []
    real_backward = backends.backward

    def counted(*args, **kwargs):
        moment_passes.append(kwargs.get("decay_grad", False))
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(backends, "backward", counted)
    attention = lightning_op.lightning_attn if path == "wrapper" else (
        lambda *a, **kw: torch.ops.lightning.attn(*a[:4], kw["scale"], kw["initial_state"]))
    cut = dict(chunk=16, segment_len=64, state_split=2) if path == "op-keeping-states" else {}
    for wanted in ([0], [1], [2], [3], [4], [0, 1, 2, 4]):
        leaves = [x.clone().requires_grad_(i in wanted) for i, x in enumerate((q, k, v, decay, init))]
        with config_override(**cut):
            out, final = attention(*leaves[:4], scale=0.6, initial_state=leaves[4], output_final_state=True)
        ((out * grad_out).sum() + final.sum()).backward()
        for i, (leaf, want) in enumerate(zip(leaves, expected)):
            if i in wanted:
                assert rel_error(leaf.grad, want) < 1e-4, (wanted, i)
            else:
                assert leaf.grad is None, (wanted, i)
        assert moment_passes == [3 in wanted], (wanted, moment_passes)
        moment_passes.clear()


# ----------------------------------------------------------------------------- bad input


def _good():
    q, k, v = make_inputs(2, 3, 10, 16, 32, torch.float32)
    return dict(q=q, k=k, v=v, decay=torch.ones(3), initial_state=torch.zeros(2, 3, 16, 32))


BAD_INPUTS = [
    (dict(k=torch.randn(2, 3, 11, 16)), ValueError, r"k has sequence length 11"),
    (dict(v=torch.randn(2, 4, 10, 32)), ValueError, r"v has 4 heads but k has 3"),
    (dict(k=torch.randn(1, 3, 10, 16)), ValueError, r"k has batch size 1"),
    (dict(k=torch.randn(2, 3, 10, 32)), ValueError, r"k has head dim 32 but q has 16"),
    (dict(q=torch.randn(2, 3, 10, 8), k=torch.randn(2, 3, 10, 8)), ValueError, r"head dim of q and k must be between 16 and 256, got 8"),
    (dict(v=torch.randn(2, 3, 10, 300)), ValueError, r"head dim of v must be between 16 and 256, got 300"),
    (dict(q=torch.randn(2, 3, 10)), ValueError, r"q must have 4 dimensions"),
    (dict(k=torch.randn(2, 3, 10, 16, dtype=torch.float64)), TypeError, r"k must have q's dtype"),
    (dict(q=torch.randn(2, 3, 10, 16).half()), TypeError, r"k must have q's dtype torch.float16"),
    (dict(q=torch.ones(2, 3, 10, 16, dtype=torch.int64)), TypeError, r"q must be a floating-point tensor"),
    (dict(q=torch.randn(2, 3, 10, 16, dtype=torch.float64), k=torch.randn(2, 3, 10, 16, dtype=torch.float64),
          v=torch.randn(2, 3, 10, 32, dtype=torch.float64)), TypeError, r"q must be float16, bfloat16 or float32"),
    (dict(v=[[1.0]]), TypeError, r"v must be a torch.Tensor"),
    (dict(decay=torch.ones(4)), ValueError, r"decay must have shape \[H\] = \[3\]"),
    (dict(decay=torch.ones(3, 1)), ValueError, r"decay must have 1 dimensions"),
    (dict(decay=torch.tensor([0.1, -0.2, 0.3])), ValueError, r"decay must hold slopes >= 0"),
    (dict(decay=torch.tensor([0.1, float("nan"), 0.3])), ValueError, r"decay must hold slopes >= 0"),
    (dict(decay=torch.ones(3, dtype=torch.int32)), TypeError, r"decay must be a floating-point tensor"),
    (dict(initial_state=torch.zeros(2, 3, 32, 16)), ValueError, r"initial_state must have shape \[B, H, Dk, Dv\] = \[2, 3, 16, 32\]"),
    (dict(initial_state=torch.zeros(2, 3, 16)), ValueError, r"initial_state must have 4 dimensions"),
    (dict(initial_state=torch.zeros(2, 3, 16, 32, dtype=torch.int32)), TypeError, r"initial_state must be a floating-point"),
    (dict(k=torch.randn(2, 3, 10, 16, device="meta")), ValueError, r"k is on meta but q is on cpu"),
]


@pytest.mark.parametrize("override, error, message", BAD_INPUTS)
def test_bad_input_names_the_argument(override, error, message):
    args = {**_good(), **override}
    with pytest.raises(error, match=message):
        lightning_attn(args["q"], args["k"], args["v"], args["decay"], initial_state=args["initial_state"])


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), "1.0", None])
def test_bad_scale(scale):
    args = _good()
    with pytest.raises(TypeError, match="scale must be a finite float"):
        lightning_attn(args["q"], args["k"], args["v"], scale=scale)


def test_decay_check_sees_in_place_changes():
    args = _good()
    decay = torch.ones(3)
    lightning_attn(args["q"], args["k"], args["v"], decay)
    decay[1] = -1.0  # same storage, new version: checked again
    with pytest.raises(ValueError, match="slopes >= 0"):
        lightning_attn(args["q"], args["k"], args["v"], decay)


def test_strided_decay_views(cpu_backend):
    """A decay given as a strided view (every other slope) means its own values, forward, backward
    and in the decode step (the kernels index the decays densely: they get a contiguous copy)."""
    q, k, v = make_inputs(1, 4, 70, 16, 16, torch.float32, seed=8)
    decay = torch.tensor([0.1, 5.0, 0.5, 3.0, 1.0, 0.2, 2.0, 0.05])[::2]
    assert decay.stride() == (2,)
    _check_against_oracle(q, k, v, decay, 0.8, None)
    state = torch.zeros(1, 4, 16, 16)
    steps = torch.cat([lightning_op.attn_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, decay)
                       for t in range(5)], dim=2)
    expected = lightning_attn(q[:, :, :5], k[:, :, :5], v[:, :, :5], decay.contiguous())
    assert rel_error(steps, expected) < TOLERANCE[torch.float32]


def test_inference_mode_decays(cpu_backend):
    """Tensors made under torch.inference_mode keep no version counter: the decay check reads
    them on every call (an in-place change is still seen) instead of failing on the counter."""
    from lightning_op import ops

    args = _good()
    q, k, v = args["q"], args["k"], args["v"]
    with torch.inference_mode():
        decay = lightning_op.slopes(3)
        out = lightning_attn(q, k, v, decay)
        op_out, _ = ops.attn(q, k, v, decay, 1.0, None)
        state = torch.zeros(q.shape[0], 3, q.shape[3], v.shape[3])
        step = lightning_op.attn_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state, decay)
        assert torch.equal(out, op_out) and step.shape == (q.shape[0], 3, 1, v.shape[3])
        decay[1] = -1.0
        for call in (lambda: lightning_attn(q, k, v, decay), lambda: ops.attn(q, k, v, decay, 1.0, None),
                     lambda: lightning_op.attn_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state, decay)):
            with pytest.raises(ValueError, match="slopes >= 0"):
                call()


def test_backend_variable_is_checked(monkeypatch):
    args = _good()
    monkeypatch.setenv("LIGHTNING_OP_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LIGHTNING_OP_BACKEND must be"):
        lightning_attn(args["q"], args["k"], args["v"])


def test_public_api():
    assert set(lightning_op.__all__) >= {"lightning_attn", "slopes"}
    assert hasattr(torch.ops.lightning, "attn") and hasattr(torch.ops.lightning, "attn_bwd")


# ----------------------------------------------------------------------------- the eager path


class _CountingOp:
    """Stands in for ``ops.attn`` (the custom op) and counts the calls that reach it."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.op(*args, **kwargs)


def _eager_and_op(q, k, v, decay, init, use_out, use_final):
    """Outputs and gradients of lightning_attn (the eager path) and of the op itself."""
    from lightning_op import ops

    results = []
    for call in (lambda *a: lightning_attn(*a[:4], scale=0.7, initial_state=a[4], output_final_state=True),
                 lambda *a: ops.attn(*a[:4], 0.7, a[4])):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        init_leaf = None if init is None else init.detach().clone().requires_grad_()
        out, final = call(*leaves, decay, init_leaf)
        loss = 0
        if use_out:
            loss = loss + (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()
        if use_final:
            loss = loss + (final * torch.linspace(1, -2, final.numel()).view(final.shape)).sum()
        inputs = leaves + ([init_leaf] if init_leaf is not None else [])
        results.append((out, final, torch.autograd.grad(loss, inputs)))
    return results


@pytest.mark.parametrize("use_out, use_final", [(True, False), (False, True), (True, True)],
                         ids=["out", "final", "both"])
@pytest.mark.parametrize("with_decay, with_init", [(True, True), (False, False)], ids=["decay+init", "plain"])
def test_eager_path_matches_the_op(cpu_backend, use_out, use_final, with_decay, with_init, monkeypatch):
    """Plain eager calls skip the dispatcher (the op's bodies under their own autograd), with the
    op's values and gradients, whichever outputs the loss uses (an unused one's gradient is None
    there, zeros through the op)."""
    from lightning_op import ops

    q, k, v = make_inputs(1, 2, 75, 16, 24, torch.float32, seed=3)
    decay = torch.tensor([0.1, 2.0]) if with_decay else None
    init = torch.randn(1, 2, 16, 24) if with_init else None
    counting = _CountingOp(ops.attn)
    monkeypatch.setattr(ops, "attn", counting)
    (out, final, grads), (out_op, final_op, grads_op) = _eager_and_op(q, k, v, decay, init, use_out, use_final)
    assert counting.calls == 1  # the op's own call in the comparison only
    # the same computation, but not bitwise: CPU matmuls round differently with the operands'
    # alignment (differences up to 8e-6 seen between two identical calls)
    for got, want in zip((out, final, *grads), (out_op, final_op, *grads_op)):
        assert rel_error(got, want) < 1e-5
    # and both against the oracle, for the loss that used the final state only
    if not use_out:
        grad_final = torch.linspace(1, -2, final.numel()).view(final.shape)
        _, _, grads_ref = oracle(q, k, v, decay, 0.7, init, torch.zeros_like(out), grad_final)
        for g, g_ref in zip(grads, grads_ref):
            assert rel_error(g, g_ref) < TOLERANCE[torch.float32]


def test_eager_path_without_grad_records_nothing(monkeypatch):
    from lightning_op import ops

    counting = _CountingOp(ops.attn)
    monkeypatch.setattr(ops, "attn", counting)
    q, k, v = (x.requires_grad_() for x in make_inputs(1, 2, 20, 16, 16, torch.float32))
    with torch.no_grad():
        out = lightning_attn(q, k, v)
    assert out.grad_fn is None and counting.calls == 0
    out = lightning_attn(q.detach(), k.detach(), v.detach())
    assert out.grad_fn is None and counting.calls == 0


def test_observed_calls_go_through_the_op(monkeypatch):
    """A dispatch mode, a function mode or a tensor subclass may trace or intercept the call: it
    must see ``lightning::attn``, so those calls take the op."""
    from torch.overrides import TorchFunctionMode

    from lightning_op import ops

    class PassThrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Marked(torch.Tensor):
        pass

    q, k, v = make_inputs(1, 2, 20, 16, 16, torch.float32)
    with RecordedOps() as recorder:
        lightning_attn(q, k, v)
    assert any(name.startswith("lightning.attn") for name in recorder.names), recorder.names[:5]

    counting = _CountingOp(ops.attn)
    monkeypatch.setattr(ops, "attn", counting)
    with PassThrough():
        lightning_attn(q, k, v)
    assert counting.calls == 1
    lightning_attn(q.as_subclass(Marked), k, v)
    assert counting.calls == 2
    lightning_attn(q, k, v)
    assert counting.calls == 2


def test_eager_path_is_named_in_profiles():
    q, k, v = make_inputs(1, 2, 20, 16, 16, torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        lightning_attn(q, k, v)
    assert any(event.key == "lightning::attn" for event in prof.key_averages())


def test_eager_path_and_the_op_give_the_same_decay_gradient():
    q, k, v = (x.requires_grad_() for x in make_inputs(1, 2, 20, 16, 16, torch.float32))
    grads = []
    for call in (lambda d: lightning_attn(q, k, v, d), lambda d: torch.ops.lightning.attn(q, k, v, d)[0]):
        decay = torch.tensor([0.1, 0.2], requires_grad=True)
        grads.append(torch.autograd.grad(call(decay).square().sum(), decay)[0])
    assert grads[0].shape == (2,) and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("path", ["eager", "op"])
def test_gradients_are_not_silently_differentiated(cpu_backend, path):
    """Under create_graph=True the first gradients are right, and differentiating them raises on
    both paths (the kernels' gradients have no history: a gradient penalty must not silently lose
    its dependence on the inputs)."""
    from lightning_op import ops

    q, k, v = (x.requires_grad_() for x in make_inputs(1, 2, 40, 16, 16, torch.float32))
    init = torch.randn(1, 2, 16, 16, requires_grad=True)
    decay = torch.tensor([0.1, 1.0])

    def call():
        if path == "eager":
            return lightning_attn(q, k, v, decay, initial_state=init)
        return ops.attn(q, k, v, decay, 1.0, init)[0]

    plain = torch.autograd.grad(call().sum(), (q, init))
    graphed = torch.autograd.grad(call().sum(), (q, init), create_graph=True)
    for a, b in zip(graphed, plain):
        assert rel_error(a, b) < 1e-5 and a.requires_grad
    with pytest.raises(RuntimeError, match="not differentiable|no autograd formula"):
        (graphed[0].pow(2).sum() + graphed[1].sum()).backward()


# ----------------------------------------------------------------------------- hostile values


def test_decay_check_sees_writes_that_bypass_the_version_counter(cpu_backend):
    """Writes through ``.data`` or a NumPy view leave the version counter alone: a negative slope
    written that way after a first call must still be refused, never turned into NaN (CPU decays
    are read on every call)."""
    args = _good()
    q, k, v = args["q"], args["k"], args["v"]
    for write in (lambda d: d.data.__setitem__(1, -1.0), lambda d: d.numpy().__setitem__(1, -1.0),
                  lambda d: d.data.__setitem__(2, float("nan"))):
        decay = torch.ones(3)
        lightning_attn(q, k, v, decay)
        write(decay)
        with pytest.raises(ValueError, match="slopes >= 0"):
            lightning_attn(q, k, v, decay)
        with pytest.raises(ValueError, match="slopes >= 0"):
            lightning_op.attn_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], torch.zeros(2, 3, 16, 32), decay)


def test_remembered_decays_are_read_again_when_changed(cpu_backend, monkeypatch):
    """GPU decays are read when first seen and after any change the version counter or the
    storage shows (reading them is a host synchronisation); the same rule, forced on CPU here."""
    from lightning_op import ops

    monkeypatch.setattr(ops, "_reads_every_call", lambda decay: False)
    monkeypatch.setattr(ops, "_remembered_decays", {})
    reads = []
    real = ops._checked_decay_values
    monkeypatch.setattr(ops, "_checked_decay_values", lambda d: reads.append(1) or real(d))
    args = _good()
    q, k, v = args["q"], args["k"], args["v"]
    decay = torch.ones(3)
    for _ in range(3):
        lightning_attn(q, k, v, decay)
    assert len(reads) == 1
    decay[0] = 0.5  # in place: a new version
    lightning_attn(q, k, v, decay)
    assert len(reads) == 2
    decay.data = torch.tensor([0.1, -1.0, 0.1])  # new storage
    with pytest.raises(ValueError, match="slopes >= 0"):
        lightning_attn(q, k, v, decay)
    huge = torch.tensor([float("inf"), 1.0, 1.0])  # the saturation is remembered too
    first = lightning_attn(q, k, v, huge)
    assert torch.isfinite(first).all() and torch.equal(lightning_attn(q, k, v, huge), first)


@pytest.mark.parametrize("decay_values, decay_dtype", [
    ([float("inf"), 0.5, 30.0], torch.float32),        # -log(sigmoid(g)) underflowing
    ([1e300, 2.0, 1e-5], torch.float64),              # above float32's max: inf after the cast
    ([3.0e38, 1e5, 2.5e38], torch.float32),           # finite, but -decay * log2(e) overflows
], ids=["inf", "float64-huge", "float32-huge"])
def test_vanishing_memory_heads_are_finite(cpu_backend, decay_values, decay_dtype):
    """lam = exp(-decay) = 0: each token sees only itself, ``o_t = scale (q_t . k_t) v_t``, and the
    final state is the last token's ``k^T v`` (plus nothing of the initial state)."""
    q, k, v = make_inputs(1, 3, 70, 16, 24, torch.float32, seed=11)
    init = torch.randn(1, 3, 16, 24)
    decay = torch.tensor(decay_values, dtype=decay_dtype)
    out, final = lightning_attn(q, k, v, decay, scale=0.5, initial_state=init, output_final_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    # the first head by the closed form, written independently of the reference module
    q64, k64, v64 = q.double(), k.double(), v.double()
    expected_out = 0.5 * (q64[:, 0] * k64[:, 0]).sum(-1, keepdim=True) * v64[:, 0]
    expected_final = k64[:, 0, -1, :, None] * v64[:, 0, -1, None, :]
    assert rel_error(out[:, 0], expected_out) < TOLERANCE[torch.float32]
    assert rel_error(final[:, 0], expected_final) < TOLERANCE[torch.float32]
    # every head, values and gradients, against the float64 oracle
    _check_against_oracle(q, k, v, decay, 0.5, init)
    state = init.clone()
    step = lightning_op.attn_step(q[:, :, :3], k[:, :, :3], v[:, :, :3], state, decay, scale=0.5)
    expected_step = lightning_attn(q[:, :, :3], k[:, :, :3], v[:, :, :3], decay, scale=0.5, initial_state=init)
    assert rel_error(step, expected_step) < TOLERANCE[torch.float32]


def test_float16_state_beyond_float16_range(cpu_backend):
    """States are float32 whatever the inputs: here the state's entries pass float16's largest
    value (65504) while every input and output stays inside its range."""
    gen = torch.Generator().manual_seed(5)
    n = 1100
    q = (torch.rand(1, 2, n, 16, generator=gen) + 0.5).half()
    k = (torch.rand(1, 2, n, 16, generator=gen) * 2 + 7).half()
    v = (torch.rand(1, 2, n, 16, generator=gen) * 2 + 7).half()
    init = torch.full((1, 2, 16, 16), 6.0e4)
    out, final = lightning_attn(q, k, v, torch.tensor([0.0, 1e-4]), scale=2e-6, initial_state=init,
                                output_final_state=True)
    assert final.min() > 65504 * 1.5
    assert out.abs().max() < 65504
    _check_against_oracle(q, k, v, torch.tensor([0.0, 1e-4]), 2e-6, init, with_grad_final=False)


def test_backward_op_validates_its_inputs():
    """``attn_bwd`` is a documented op: wrong gradients are refused, naming the argument, instead
    of being read out of bounds."""
    args = _good()
    q, k, v, decay, init = args["q"], args["k"], args["v"], args["decay"], args["initial_state"]
    good_out, good_final = torch.randn(2, 3, 10, 32), torch.randn(2, 3, 16, 32)
    cases = [
        (dict(grad_out=torch.randn(2, 3, 12, 32)), ValueError, r"grad_out must have the output's shape .* \(N differs\)"),
        (dict(grad_out=torch.randn(2, 3, 10, 16)), ValueError, r"grad_out must have .* \(Dv differs\)"),
        (dict(grad_out=torch.randn(2, 3, 10)), ValueError, r"grad_out must have 4 dimensions"),
        (dict(grad_out=torch.randn(2, 3, 10, 32, dtype=torch.float64)), TypeError, r"grad_out must have the output's dtype"),
        (dict(grad_out=torch.ones(2, 3, 10, 32, dtype=torch.int32)), TypeError, r"grad_out must be a floating-point"),
        (dict(grad_final_state=torch.randn(2, 3, 32, 16)), ValueError, r"grad_final_state must have the final state's shape"),
        (dict(grad_final_state=torch.randn(2, 3, 16, 32, dtype=torch.float64)), TypeError,
         r"grad_final_state must be float16, bfloat16 or float32"),
        (dict(q=torch.randn(2, 3, 11, 16)), ValueError, r"k has sequence length 10"),
        (dict(decay=torch.tensor([0.1, -1.0, 0.1])), ValueError, r"slopes >= 0"),
    ]
    for override, error, message in cases:
        call = dict(grad_out=good_out, grad_final_state=good_final, q=q, k=k, v=v, decay=decay, initial_state=init)
        call.update(override)
        with pytest.raises(error, match=message):
            torch.ops.lightning.attn_bwd(call["grad_out"], call["grad_final_state"], call["q"], call["k"], call["v"],
                                         call["decay"], 1.0, call["initial_state"])


def test_meta_tensors():
    """Shapes only: nothing reads values (the decay check skips meta tensors)."""
    q, k, v = (torch.empty(2, 3, 100, 16, device="meta") for _ in range(3))
    decay = lightning_op.slopes(3).to("meta")
    out, final = lightning_attn(q, k, v, decay, initial_state=torch.empty(2, 3, 16, 16, device="meta"),
                                output_final_state=True)
    assert out.shape == (2, 3, 100, 16) and out.device.type == "meta"
    assert final.shape == (2, 3, 16, 16) and final.dtype == torch.float32


# ----------------------------------------------------------------------------- function transforms


def _transform_inputs():
    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=gen) * 0.5 for _ in range(3))
    init = torch.randn(1, 2, 16, 16, generator=gen) * 0.3
    tangents = tuple(torch.randn(x.shape, generator=gen) for x in (q, k, v, init))
    return (q, k, v, init), tangents


_TRANSFORM_DECAY = torch.tensor([0.05, 1.5])


def _ours(q, k, v, init):
    return lightning_attn(q, k, v, _TRANSFORM_DECAY, scale=0.7, initial_state=init, output_final_state=True)


def _spec(q, k, v, init):  # the float64 quadratic form, which PyTorch differentiates itself
    return lightning_op.reference.attention_quadratic(q, k, v, _TRANSFORM_DECAY.double(), 0.7, init)


def test_forward_mode_derivatives(cpu_backend):
    """jvp (torch.func and torch.autograd.forward_ad), jacfwd and linearize through lightning_attn
    equal PyTorch's own derivatives of the float64 quadratic form: every input's tangent at once,
    and each alone (a dropped term would show in one of them)."""
    primals, tangents = _transform_inputs()
    primals64, tangents64 = [x.double() for x in primals], [t.double() for t in tangents]
    for keep in [(0, 1, 2, 3), (0,), (1,), (2,), (3,)]:
        tan = tuple(t if i in keep else torch.zeros_like(t) for i, t in enumerate(tangents))
        tan64 = tuple(t.double() for t in tan)
        _, (d_out, d_final) = torch.func.jvp(_ours, primals, tan)
        _, (ref_out, ref_final) = torch.func.jvp(_spec, tuple(primals64), tan64)
        assert rel_error(d_out, ref_out) < TOLERANCE[torch.float32], keep
        assert rel_error(d_final, ref_final) < TOLERANCE[torch.float32], keep
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        out, final = _ours(*duals)
        d_out, d_final = fwAD.unpack_dual(out).tangent, fwAD.unpack_dual(final).tangent
    _, (ref_out, ref_final) = torch.func.jvp(_spec, tuple(primals64), tuple(tangents64))
    assert d_out is not None and rel_error(d_out, ref_out) < TOLERANCE[torch.float32]
    assert d_final is not None and rel_error(d_final, ref_final) < TOLERANCE[torch.float32]
    _, linear = torch.func.linearize(lambda q: _ours(q, *primals[1:])[0], primals[0])
    ref = torch.func.jvp(lambda q: _spec(q, *primals64[1:])[0], (primals64[0],), (tangents64[0],))[1]
    assert rel_error(linear(tangents[0]), ref) < TOLERANCE[torch.float32]
    small = tuple(x[:, :, :5] for x in primals[:3])
    jac = torch.func.jacfwd(lambda v: _ours(small[0], small[1], v, primals[3])[0])(small[2])
    jac_ref = torch.func.jacfwd(lambda v: _spec(small[0].double(), small[1].double(), v, primals64[3])[0])(
        small[2].double())
    assert rel_error(jac, jac_ref) < TOLERANCE[torch.float32]


def test_reverse_mode_function_transforms(cpu_backend):
    """torch.func.grad, vjp and jacrev through lightning_attn equal the float64 quadratic form's."""
    primals, _ = _transform_inputs()
    primals64 = tuple(x.double() for x in primals)
    weight = torch.linspace(-1, 1, 37 * 16).view(37, 16)

    def loss(fn):
        return lambda *xs: (fn(*xs)[0] * weight.to(xs[0].dtype)).sum() + fn(*xs)[1].square().sum()

    grads = torch.func.grad(loss(_ours), argnums=(0, 1, 2, 3))(*primals)
    grads_ref = torch.func.grad(loss(_spec), argnums=(0, 1, 2, 3))(*primals64)
    for g, g_ref in zip(grads, grads_ref):
        assert rel_error(g, g_ref) < TOLERANCE[torch.float32]
    small = tuple(x[:, :, :5] for x in primals[:3])
    jac = torch.func.jacrev(lambda q: _ours(q, small[1], small[2], primals[3])[0])(small[0])
    jac_ref = torch.func.jacrev(lambda q: _spec(q, small[1].double(), small[2].double(), primals64[3])[0])(
        small[0].double())
    assert rel_error(jac, jac_ref) < TOLERANCE[torch.float32]
    with pytest.raises(RuntimeError, match="not differentiable"):  # no silent wrong second derivative
        torch.func.grad(lambda q: torch.func.grad(loss(_ours))(q, *primals[1:]).sum())(primals[0])


def test_raw_op_refuses_dual_inputs():
    """The registered op cannot carry a tangent (custom_op has no forward-mode formula): a dual
    input is refused rather than given a zero tangent."""
    import torch.autograd.forward_ad as fwAD

    (q, k, v, _), (tq, *_) = _transform_inputs()
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match="no forward-mode derivative of its own; call lightning_op.lightning_attn"):
            torch.ops.lightning.attn(fwAD.make_dual(q, tq), k, v, None, 1.0, None)


def test_decay_tangent_is_refused():
    import torch.autograd.forward_ad as fwAD

    (q, k, v, _), _ = _transform_inputs()
    with fwAD.dual_level():
        decay = fwAD.make_dual(_TRANSFORM_DECAY.clone(), torch.ones(2))
        with pytest.raises(ValueError, match="decay has a tangent"):
            lightning_attn(q, k, v, decay)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("decay", [None, torch.tensor([0.1, 2.0])], ids=["no-decay", "decay"])
def test_garbage_in_later_rows_does_not_reach_earlier_outputs(cpu_backend, dtype, decay):
    """NaN or inf at a token (padding left uninitialised, say) leaves every earlier output exactly
    as it is with finite values there, also in the token's own 64-row chunk; the outputs that do
    depend on it, and the final state where k or v carry it, are not finite."""
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 2, 150, 32, generator=gen).to(dtype) for _ in range(3))
    clean = lightning_attn(q, k, v, decay)
    for bad_row in (100, 130, 149):  # inside a chunk, another chunk, the last row
        for name in ("q", "k", "v"):
            inputs = dict(q=q.clone(), k=k.clone(), v=v.clone())
            inputs[name][0, 1, bad_row, 3] = float("nan")
            inputs[name][0, 0, bad_row, 5] = float("inf")
            out, final = lightning_attn(inputs["q"], inputs["k"], inputs["v"], decay, output_final_state=True)
            assert torch.equal(out[:, :, :bad_row], clean[:, :, :bad_row]), (name, bad_row)
            assert not torch.isfinite(out[:, :, bad_row]).all(-1).any(), (name, bad_row)
            assert torch.isfinite(final).all() == (name == "q"), (name, bad_row)
            if name != "q":  # every later output reads the state that holds it
                assert not torch.isfinite(out[:, :, bad_row:]).all(-1).any(), (name, bad_row)


def test_garbage_in_later_rows_in_the_scan_form():
    """The same for the traceable scan form that CPU packages run (deploy)."""
    gen = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(1, 2, 150, 32, generator=gen) for _ in range(3))
    decay = torch.tensor([0.1, 2.0])
    clean, _ = lightning_op.reference.attention_forward_scan(q, k, v, decay)
    for bad_row in (10, 100):  # the first chunk (its state feeds the scan) and a later one
        bad_v = v.clone()
        bad_v[0, 1, bad_row, 3] = float("nan")
        out, final = lightning_op.reference.attention_forward_scan(q, k, bad_v, decay)
        assert torch.equal(out[:, :, :bad_row], clean[:, :, :bad_row]), bad_row
        assert not torch.isfinite(out[:, 1, bad_row:]).all(-1).any() and not torch.isfinite(final).all()


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_a_final_state_nobody_asked_for_is_not_stored(monkeypatch, packed):
    """``lightning_attn`` without ``output_final_state`` runs its forward without storing the final
    states (one per sequence and head, written for nothing), with and without grad; the output and
    the gradients are those of the call that asks for the state; a call that asks stores it."""
    from lightning_op import reference

    calls = []
    real = reference.linear_attention_chunked

    def spy(*args, **kwargs):
        if not kwargs.get("reverse", False) and kwargs.get("value_scale", 1.0) == 1.0:
            calls.append(kwargs.get("store_final", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "linear_attention_chunked", spy)
    q, k, v = make_inputs(1, 2, 40, 16, 16, torch.float32, "cpu", seed=4)
    cu = torch.tensor([0, 7, 7, 40]) if packed else None
    grad = torch.randn(1, 2, 40, 16)
    results = []
    for wanted in (False, True):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        calls.clear()
        got = lightning_attn(*leaves, MIXED_DECAY[:2], cu_seqlens=cu, output_final_state=wanted)
        out = got[0] if wanted else got
        assert calls[:1] == [wanted], calls
        out.backward(grad)
        results.append([out.detach()] + [x.grad for x in leaves])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    calls.clear()
    with torch.no_grad():
        lightning_attn(q, k, v, MIXED_DECAY[:2], cu_seqlens=cu)
    assert calls == [False]
