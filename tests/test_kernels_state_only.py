"""``kernels.final_state``: the state a sequence ends in, without its outputs (what context
parallelism exchanges), through the interpreter on CPU, against the float64 oracle."""

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


@pytest.mark.parametrize(
    "n, block, h, hkv, dtype, decay",
    [(100, 32, 2, 2, torch.float32, [0.02, 3.0]),     # odd length, a partial last block, weak and strong
     (96, 32, 2, 2, torch.float32, [0.005, 40.0]),    # whole blocks; a vanishing memory
     (20, 64, 4, 2, torch.bfloat16, [0.1, 0.0, 1.0, 0.01]),  # one partial block; grouped kv heads
     (77, 16, 2, 1, torch.float16, None)],            # no decay; one kv head
    ids=["odd", "whole-blocks", "short-grouped", "no-decay"],
)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_final_state_against_the_oracle(n, block, h, hkv, dtype, decay, reverse):
    """Forward: ``sum_t lam^(N-1-t) s k_t^T v_t``, the op's final state; reverse: ``sum_t lam^t s
    k_t^T v_t``, the final state of the rows walked from the end. Per compute head, k and v read
    per group; without a decay, one state per kv head."""
    from lightning_op.kernels import final_state

    gen = torch.Generator().manual_seed(n)
    k = (0.5 * torch.randn(2, hkv, n, 16, generator=gen)).to(dtype=dtype, device=DEVICE)
    v = (0.5 * torch.randn(2, hkv, n, 24, generator=gen)).to(dtype=dtype, device=DEVICE)
    decay_h = None if decay is None else torch.tensor(decay, device=DEVICE)
    got = final_state(k, v, decay_h, block, value_scale=0.5, reverse=reverse)
    h = h if decay is not None else hkv  # without a decay the heads of a group share one state
    wide = [x.double().repeat_interleave(h // hkv, 1) for x in (k, v)]
    if reverse:
        wide = [x.flip(2) for x in wide]
    lam = torch.zeros(h, dtype=torch.float64, device=DEVICE) if decay_h is None else decay_h.double()
    _, want = reference.attention_quadratic(torch.zeros_like(wide[0]), wide[0], wide[1], lam, 1.0)
    assert got.shape == (2, h, 16, 24) and got.dtype == torch.float32
    assert rel_error(got, 0.5 * want) < TOLERANCE[dtype]


def test_final_state_of_no_rows_is_zero():
    from lightning_op.kernels import final_state

    k = torch.zeros(1, 2, 0, 16, device=DEVICE)
    assert torch.equal(final_state(k, k, None, 32), torch.zeros(1, 2, 16, 16, device=DEVICE))


@pytest.mark.parametrize("decay_heads", [4, 2, 0], ids=["own-states", "shared-states", "no-decay"])
def test_context_parallel_state_passes_on_the_kernels(monkeypatch, decay_heads):
    """Context parallelism's two state-only passes where the Triton kernels run: the state a
    rank's tokens leave (``L``) and the gradient reaching its initial state (``G = scale sum_t
    lam^(t+1) q_t^T do_t``, summed over a group sharing a state), against float64 formulas;
    grouped heads with states per query head, shared per group, and without decay."""
    from lightning_op.distributed import OP_ATTENTION

    monkeypatch.setenv("LIGHTNING_OP_BACKEND", "triton")
    gen = torch.Generator().manual_seed(3)
    n, h, hkv = 70, 4, 2
    q, k, v, do = (0.5 * torch.randn(1, heads, n, 16, generator=gen).to(DEVICE) for heads in (h, hkv, hkv, h))
    decay = torch.tensor([0.05, 0.8, 0.01, 2.0][:decay_heads], device=DEVICE) if decay_heads else None
    hs = reference.state_heads(h, hkv, decay)
    lam = torch.zeros(hs, dtype=torch.float64) if decay is None else decay.double().cpu()
    lam_h = lam.repeat_interleave(h // hs)
    t = torch.arange(n, dtype=torch.float64)
    weights = torch.exp(-lam_h[:, None] * (n - 1 - t))  # [H, N]
    kd, vd = (x.double().cpu().repeat_interleave(h // hkv, 1) for x in (k, v))
    want_state = torch.einsum("hn,bhnk,bhnv->bhkv", weights, kd, vd)[:, :: h // hs]
    grad_weights = torch.exp(-lam_h[:, None] * (t + 1))
    want_grad = 0.7 * torch.einsum("hn,bhnk,bhnv->bhkv", grad_weights, q.double().cpu(), do.double().cpu())
    want_grad = want_grad.unflatten(1, (hs, -1)).sum(2)
    assert rel_error(OP_ATTENTION.state(q, k, v, decay).cpu(), want_state) < TOLERANCE[torch.float32]
    assert rel_error(OP_ATTENTION.state_gradient(q, do, decay, 0.7, hs).cpu(), want_grad) < TOLERANCE[torch.float32]
