"""``torch.ops.lightning.attn_step``: the in-place decode step equals the op with a carried state."""

import pytest
import torch

import lightning_op
from lightning_op import attn_step, lightning_attn

from _helpers import TOLERANCE, RecordedOps, make_inputs, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [0, 1, 3])
@pytest.mark.parametrize("decay", [None, torch.tensor([1e-5, 0.5, 30.0])], ids=["no-decay", "decay"])
def test_step_equals_op_with_initial_state(cpu_backend, dtype, tokens, decay):
    q, k, v = make_inputs(2, 3, tokens, 24, 40, dtype, layout="bnhd", seed=tokens)
    state = torch.randn(2, 3, 24, 40)
    expected, expected_state = lightning_attn(q, k, v, decay, scale=0.7, initial_state=state, output_final_state=True)
    stepped = state.clone()
    before = stepped.data_ptr()
    out = attn_step(q, k, v, stepped, decay, scale=0.7)
    assert stepped.data_ptr() == before  # updated where it lies
    assert out.shape == (2, 3, tokens, 40) and out.dtype == dtype
    if tokens:
        assert rel_error(out, expected) < TOLERANCE[dtype]
    assert rel_error(stepped, expected_state) < (1e-5 if dtype == torch.float32 else TOLERANCE[dtype])


@pytest.mark.parametrize("changes", [dict(decode_block_v=8, decode_num_warps=1), dict(decode_block_v=64)],
                         ids=["block8-warps1", "block64"])
def test_step_under_forced_decode_configs(changes, monkeypatch):
    """Forced decode configurations compute the same step (value blocks narrower and wider than
    the head, with a partial last block)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreted kernels need TRITON_INTERPRET=1 (CPU-only runs)")
    from lightning_op.kernels import config_override

    monkeypatch.setenv("LIGHTNING_OP_BACKEND", "triton")
    q, k, v = make_inputs(2, 3, 2, 24, 40, torch.float32, seed=4)
    decay = torch.tensor([0.01, 0.5, 3.0])
    state = torch.randn(2, 3, 24, 40)
    expected, expected_state = lightning_attn(q, k, v, decay, initial_state=state, output_final_state=True)
    with config_override(**changes):
        out = attn_step(q, k, v, state, decay)
    assert rel_error(out, expected) < 1e-5
    assert rel_error(state, expected_state) < 1e-5


def test_step_updates_a_strided_state(cpu_backend):
    q, k, v = make_inputs(1, 2, 1, 16, 32, torch.float32)
    storage = torch.randn(1, 2, 32, 16)
    state = storage.transpose(-1, -2)  # [1, 2, 16, 32] view, not contiguous
    expected, expected_state = lightning_attn(q, k, v, initial_state=state.clone(), output_final_state=True)
    out = attn_step(q, k, v, state)
    assert rel_error(out, expected) < 1e-5
    assert rel_error(storage.transpose(-1, -2), expected_state) < 1e-5


def test_many_steps_equal_one_pass(cpu_backend):
    q, k, v = make_inputs(2, 2, 40, 16, 16, torch.float32, seed=3)
    decay = torch.tensor([0.05, 0.8])
    expected, expected_state = lightning_attn(q, k, v, decay, output_final_state=True)
    state = torch.zeros(2, 2, 16, 16)
    outs = [attn_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state, decay) for t in range(40)]
    assert rel_error(torch.cat(outs, 2), expected) < 1e-5
    assert rel_error(state, expected_state) < 1e-5


def test_step_under_compile_fullgraph():
    q, k, v = make_inputs(1, 2, 1, 16, 16, torch.float32)
    decay = torch.tensor([0.1, 0.2])

    def step(q, k, v, state):
        return attn_step(q, k, v, state, decay, scale=0.5) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    state_eager, state_compiled = torch.randn(1, 2, 16, 16), None
    state_compiled = state_eager.clone()
    for _ in range(3):
        expected = step(q, k, v, state_eager)
        got = compiled(q, k, v, state_compiled)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(state_compiled, state_eager)


def test_opcheck_step():
    q, k, v = make_inputs(2, 2, 2, 16, 32, torch.float32)
    for decay in (None, torch.tensor([0.3, 0.0])):
        torch.library.opcheck(torch.ops.lightning.attn_step.default, (q, k, v, torch.randn(2, 2, 16, 32), decay, 0.5))


@pytest.mark.parametrize(
    "state, error, message",
    [
        (torch.zeros(1, 2, 16, 32, dtype=torch.float64), TypeError, "state must be float32"),
        (torch.zeros(1, 2, 16, 32).half(), TypeError, "state must be float32"),
        (torch.zeros(1, 2, 32, 16), ValueError, r"initial_state must have shape \[B, H, Dk, Dv\]"),
        (torch.zeros(1, 3, 16, 32), ValueError, r"initial_state must have shape"),
        # one state shared by the heads: each head's in-place update would overwrite the others'
        (torch.zeros(1, 1, 16, 32).expand(1, 2, 16, 32), ValueError, r"state \(strides \(512, 0, 32, 1\)\) has elements sharing memory"),
    ],
)
def test_step_bad_state(state, error, message):
    q, k, v = make_inputs(1, 2, 1, 16, 32, torch.float32)
    with pytest.raises(error, match=message):
        attn_step(q, k, v, state)


def test_step_checks_overlap_per_layout():
    """The validation cache is keyed by the state's strides too: a shared (expanded) state with the
    shape of one seen before is still refused."""
    q, k, v = make_inputs(1, 2, 1, 16, 16, torch.float32)
    attn_step(q, k, v, torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="sharing memory"):
        attn_step(q, k, v, torch.zeros(1, 1, 16, 16).expand(1, 2, 16, 16))


def test_step_refuses_gradients():
    q, k, v = make_inputs(1, 2, 1, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="no backward"):
        attn_step(q.requires_grad_(), k, v, torch.zeros(1, 2, 16, 16))
    with torch.no_grad():
        attn_step(q, k, v, torch.zeros(1, 2, 16, 16))


def test_step_refuses_a_decay_that_requires_grad(cpu_backend):
    """The step has no backward: a learnable decay would silently get no gradient (and on the CPU
    path the state would pick up autograd history)."""
    q, k, v = make_inputs(1, 2, 1, 16, 16, torch.float32)
    state = torch.zeros(1, 2, 16, 16)
    decay = torch.nn.Parameter(torch.tensor([0.1, 0.2]))
    for _ in range(2):  # the second call takes the validated-layout shortcut
        with pytest.raises(ValueError, match="decay require"):
            attn_step(q, k, v, state, decay)
    assert not state.requires_grad and torch.equal(state, torch.zeros(1, 2, 16, 16))
    with torch.no_grad():
        attn_step(q, k, v, state, decay)


def test_step_refuses_inputs_aliasing_the_state(cpu_backend):
    """The state is written while q, k, v and decay are read: inputs that overlap it would give
    results that depend on the order of the kernel's reads. Refused, as PyTorch's in-place ops do,
    also for layouts validated before."""
    state = torch.randn(1, 2, 16, 16)
    q, k, v = make_inputs(1, 2, 1, 16, 16, torch.float32)
    attn_step(q, k, v, state.clone())  # this layout is now validated
    flat = state.view(1, 2, 16, 16)
    view = flat[:, :, :1, :]  # [1, 2, 1, 16]: the first row of each head's state
    for name, args in (("q", (view, k, v, state)), ("k", (q, view, v, state)), ("v", (q, k, view, state)),
                       ("decay", (q, k, v, state, state.view(-1)[:2]))):
        before = state.clone()
        with pytest.raises(ValueError, match=f"{name} shares memory with state"):
            attn_step(*args)
        assert torch.equal(state, before)  # refused before anything was written
    # disjoint parts of one buffer are fine
    buffer = torch.randn(2 * 16 * 16 + 16)
    own_state = buffer[:512].view(1, 2, 16, 16)
    own_q = buffer[512:].view(1, 1, 1, 16).expand(1, 2, 1, 16)
    attn_step(own_q, k, v, own_state)


def test_aliasing_check_of_tensors_without_values():
    """Plain tensors take the aliasing check's short way; meta and fake tensors (tracing) have no
    memory to compare and are never refused, and a Parameter is compared as any tensor."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_op.ops import _may_share_memory

    buffer = torch.randn(8)
    assert _may_share_memory(buffer[:4], buffer[3:]) and not _may_share_memory(buffer[:4], buffer[4:])
    meta = torch.empty(8, device="meta")
    assert not _may_share_memory(meta[:4], meta[3:])
    with FakeTensorMode():
        fake = torch.empty(8)
        assert not _may_share_memory(fake[:4], fake[3:])
    parameter = torch.nn.Parameter(torch.randn(8))
    assert _may_share_memory(parameter, parameter.detach()[3:])


def test_repeated_steps_validate_once_but_still_check_values(monkeypatch):
    """A decode loop pays the full validation once per argument layout; scale, grad mode and
    decay signs are still checked on every call, and new layouts are validated afresh."""
    from lightning_op import ops

    calls = []
    real = ops.validate
    monkeypatch.setattr(ops, "validate", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(ops, "_validated_steps", set())
    q, k, v = make_inputs(1, 2, 1, 16, 16, torch.float32)
    state, decay = torch.zeros(1, 2, 16, 16), torch.tensor([0.1, 0.2])
    for _ in range(3):
        attn_step(q, k, v, state, decay, scale=0.5)
    assert len(calls) == 1
    with pytest.raises(TypeError, match="scale must be a finite float"):
        attn_step(q, k, v, state, decay, scale=float("nan"))
    with pytest.raises(ValueError, match="no backward"):
        attn_step(q.clone().requires_grad_(), k, v, state, decay)
    with pytest.raises(ValueError, match="slopes >= 0"):
        attn_step(q, k, v, state, torch.tensor([0.1, -0.2]))
    with pytest.raises(TypeError, match="state must be float32"):
        attn_step(q, k, v, state.double(), decay)
    with pytest.raises(ValueError, match="decay must have shape"):
        attn_step(q, k, v, state, torch.tensor([0.1, 0.2, 0.3]))


def test_step_is_exported_in_the_api():
    assert lightning_op.attn_step is attn_step
    assert hasattr(torch.ops.lightning, "attn_step")


def _spy_on_direct_calls(monkeypatch):
    """Calls of ``ops._attn_step_impl`` made by name: the direct eager way. The op's registration
    holds the function object itself, so calls through the dispatcher are not counted."""
    from lightning_op import ops

    calls = []
    impl = ops._attn_step_impl

    def spy(*args, **kwargs):
        calls.append(1)
        return impl(*args, **kwargs)

    monkeypatch.setattr(ops, "_attn_step_impl", spy)
    return calls


@pytest.mark.parametrize("form", ["dense", "pooled", "packed"])
def test_eager_step_skips_the_dispatcher_with_the_ops_results(cpu_backend, form, monkeypatch):
    q, k, v = make_inputs(3, 2, 1, 16, 16, torch.float32, seed=5)
    decay = torch.tensor([0.1, 0.7])
    kwargs, state = {}, 0.1 * torch.randn(3, 2, 16, 16)
    if form != "dense":
        state = 0.1 * torch.randn(6, 2, 16, 16)
        kwargs["state_indices"] = torch.tensor([4, -1, 1])
    if form == "packed":
        q, k, v = (x.transpose(0, 2).reshape(1, 2, 3, 16) for x in (q, k, v))
        q, k, v = (torch.cat([x, x[:, :, :2]], 2) for x in (q, k, v))  # sequences of 2, 0 and 3 rows
        kwargs["cu_seqlens"] = torch.tensor([0, 2, 2, 5])
    via_op_state = state.clone()
    want = torch.ops.lightning.attn_step(q, k, v, via_op_state, decay, 0.5, kwargs.get("cu_seqlens"),
                                         kwargs.get("state_indices"))
    calls = _spy_on_direct_calls(monkeypatch)
    got = attn_step(q, k, v, state, decay, scale=0.5, **kwargs)
    assert calls == [1]
    assert torch.equal(got, want) and torch.equal(state, via_op_state)


def test_observed_steps_go_through_the_op(monkeypatch):
    q, k, v = make_inputs(1, 2, 1, 16, 16, torch.float32)
    state = torch.zeros(1, 2, 16, 16)
    calls = _spy_on_direct_calls(monkeypatch)
    with RecordedOps() as mode:
        attn_step(q, k, v, state)
    assert calls == [] and "lightning.attn_step.default" in mode.names
    meta = [x.to("meta") for x in (q, k, v)]
    assert attn_step(*meta, torch.zeros(1, 2, 16, 16, device="meta")).device.type == "meta"
    assert calls == []


def test_eager_step_is_profiled_under_the_ops_name(monkeypatch):
    q, k, v = make_inputs(1, 2, 1, 16, 16, torch.float32)
    calls = _spy_on_direct_calls(monkeypatch)
    with torch.profiler.profile() as prof:
        attn_step(q, k, v, torch.zeros(1, 2, 16, 16))
    assert calls == [1] and any(e.name == "lightning::attn_step" for e in prof.events())
