"""The two layouts of [B, H, N, D] tensors the op reads and writes in place: contiguous [B, H, N, D]
(``scaled_dot_product_attention``'s) and [B, N, H, D] storage seen through ``transpose(1, 2)``
(what a projection followed by ``view`` gives). Gradients are written in their input's layout, so
autograd hands them to [B, N, H, D] leaves without a copy."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["empty_bhnd", "in_layout", "stored_bnhd", "output_bnhd"]


def empty_bhnd(shape, dtype: torch.dtype, device, bnhd: bool = False) -> Tensor:
    """An uninitialised [B, H, N, D] tensor of ``shape``, stored as [B, N, H, D] when ``bnhd``."""
    b, h, n, d = shape
    if bnhd:
        return torch.empty(b, n, h, d, dtype=dtype, device=device).transpose(1, 2)
    return torch.empty(b, h, n, d, dtype=dtype, device=device)


def in_layout(x: Tensor, bnhd: bool) -> Tensor:
    """``x`` stored as :func:`empty_bhnd` would store it (a copy only where it is not; the check
    allocates nothing, so the backward's peak memory holds no spare gradient-sized buffer)."""
    b, h, n, d = x.shape
    wanted = (n * h * d, d, h * d, 1) if bnhd else (h * n * d, n * d, d, 1)
    if all(size == 1 or stride == want for size, stride, want in zip(x.shape, x.stride(), wanted)):
        return x
    return empty_bhnd(x.shape, x.dtype, x.device, bnhd).copy_(x)


def stored_bnhd(x: Tensor) -> bool:
    """Whether a [B, H, N, D] tensor keeps its heads inside its sequence positions ([B, N, H, D]
    storage). Decided without guards on symbolic sizes: unknown counts as no."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(x.stride(1) < x.stride(2))


def output_bnhd(q: Tensor) -> bool:
    """Whether the op's output is stored as [B, N, H, Dv], the layout q is stored in: then
    ``out.transpose(1, 2).reshape(B, N, H * Dv)`` before an output projection is a view, not a copy.

    The op's fake and its kernels both decide with this function, so the strides a traced graph
    expects are the ones the kernels write: sizes known to the tracer are compared without a
    guard; where symbolic sizes leave the comparison open (a dynamic head count), it is decided by
    the example's values under a guard (a graph traced for one layout is not reused for the other)."""
    if q.shape[1] == 1:  # one head: the two layouts are the same storage order
        return False
    rows_apart = q.stride(1) < q.stride(2)
    if isinstance(rows_apart, bool):  # concrete sizes (every eager call): nothing to prove
        return rows_apart
    from torch.fx.experimental.symbolic_shapes import guard_or_false, statically_known_true

    if statically_known_true(rows_apart):
        return True
    if statically_known_true(q.stride(1) >= q.stride(2)):
        return False
    return guard_or_false(rows_apart)
