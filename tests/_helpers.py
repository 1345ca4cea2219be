"""Shared helpers: random inputs and error measures against the float64 oracle."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_op import reference

# relative-error bounds ||x - ref|| / ||ref|| per input dtype (fp32 accumulation everywhere)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# on the GPU a float32 dot may run in tf32 for the state products of float16 inputs
GPU_TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest ``||x - ref|| / ||ref||`` over the (batch, head) slices of [B, H, ...] tensors
    (over the whole tensor otherwise): one norm over all heads would let a wrong strongly decayed
    head, whose values are small, hide behind the others."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values"
    if actual.dim() >= 3:
        actual, expected = actual.flatten(2).flatten(0, 1), expected.flatten(2).flatten(0, 1)
    else:
        actual, expected = actual.reshape(1, -1), expected.reshape(1, -1)
    # a head whose reference is 1e5 times smaller than the largest (a gradient decayed by lam^N,
    # below float32's range) is measured against that floor instead of its own norm
    denom = expected.norm(dim=1)
    floor = 1e-5 * denom.max().item() if denom.numel() else 0.0
    diff = (actual - expected).norm(dim=1)
    denom = denom.clamp(min=floor)
    errors = torch.where(denom > 0, diff / denom.clamp(min=1e-300), diff)
    return errors.max().item() if errors.numel() else 0.0


def make_inputs(b, h, n, dk, dv, dtype, device="cpu", layout="bhnd", seed=0):
    """q, k, v of the given layout ([B,H,N,D] contiguous, or [B,N,H,D] storage seen as [B,H,N,D])."""
    gen = torch.Generator().manual_seed(seed)

    def one(d):
        if layout == "bnhd":
            x = torch.randn(b, n, h, d, generator=gen).transpose(1, 2)
        else:
            x = torch.randn(b, h, n, d, generator=gen)
        # moderate magnitudes, as after a normalisation or activation
        return (x * 0.5).to(dtype=dtype, device=device)

    return one(dk), one(dk), one(dv)


def oracle(q, k, v, decay, scale, initial_state, grad_out, grad_final, cu_seqlens=None):
    """Output, final state and the gradients (q, k, v, initial_state) in float64 from the quadratic
    form, computed on the inputs' device (float64 matmuls are fast enough on the GPU)."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    init = None if initial_state is None else initial_state.detach().double().requires_grad_()
    dec = None if decay is None else decay.detach().double()
    out, final = reference.attention_quadratic(*leaves, dec, scale, init, cu_seqlens)
    loss = (out * grad_out.double()).sum()
    if grad_final is not None:
        loss = loss + (final * grad_final.double()).sum()
    inputs = leaves + ([init] if init is not None else [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return out, final, grads


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(relative_path: str, *args: str, timeout: int = 600) -> str:
    """Run one of the repo's scripts in a fresh interpreter (repo on the path, default backend);
    assert it exits 0 and return its standard output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    env.pop("LIGHTNING_OP_BACKEND", None)
    result = subprocess.run([sys.executable, os.path.join(ROOT, relative_path), *args],
                            capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


class RecordedOps(TorchDispatchMode):
    """A dispatch mode that lets every op run and keeps its name (``names``): what a tracer sees."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))
