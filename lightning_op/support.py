"""What ``lightning::attn`` accepts, stated once: its dtypes, head dims and devices.

Validation (``ops``), the rewrite's recogniser (before it probes a candidate) and the modules
(``nn``) all ask :func:`unsupported`, so the three cannot drift apart.
"""

from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import torch

__all__ = ["DTYPES", "MIN_HEAD_DIM", "MAX_HEAD_DIM", "DEVICE_TYPES", "Unsupported", "unsupported"]

#: one dtype for q, k and v; the state and the decays are float32 whatever it is
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: head dims of q/k and of v, each; the kernels pad them to a power of two of at least 16
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
#: CUDA tensors run the Triton kernels, CPU tensors the chunked PyTorch form
DEVICE_TYPES = ("cpu", "cuda")


class Unsupported(NamedTuple):
    """Why the op refuses its inputs: ``error`` is the exception type validation raises
    (``TypeError`` for a dtype, ``ValueError`` for a size or a device) and ``reason`` a phrase
    naming the argument, e.g. ``"head dim of v must be between 16 and 256, got 512"``."""

    error: type
    reason: str


def unsupported(
    *,
    dtypes: tuple[tuple[str, torch.dtype], ...] = (),
    head_dims: tuple[tuple[str, object], ...] = (),
    device: Optional[torch.device] = None,
) -> Optional[Unsupported]:
    """The first reason the op would refuse inputs of these dtypes, head dims and device, or None
    when it accepts them.

    ``dtypes`` and ``head_dims`` are ``(argument name, value)`` pairs, e.g.
    ``head_dims=(("q and k", 64), ("v", 128))``. A symbolic head dim (a ``SymInt`` under tracing)
    is accepted here: it is checked when the graph runs.
    """
    for name, dtype in dtypes:
        if dtype not in DTYPES:
            return Unsupported(TypeError, f"{name} must be float16, bfloat16 or float32, got {dtype}")
    for name, size in head_dims:
        if isinstance(size, torch.SymInt):
            continue
        try:
            size = operator.index(size)  # an int-like (numpy integers too); not 8.0, not a string
        except TypeError:
            return Unsupported(TypeError, f"head dim of {name} must be an int, got {size!r}")
        if not MIN_HEAD_DIM <= size <= MAX_HEAD_DIM:
            return Unsupported(
                ValueError, f"head dim of {name} must be between {MIN_HEAD_DIM} and {MAX_HEAD_DIM}, got {size}"
            )
    if device is not None and torch.device(device).type not in DEVICE_TYPES:
        return Unsupported(ValueError, f"device {device} is not supported (CPU or CUDA tensors)")
    return None
