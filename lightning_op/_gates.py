"""Availability gates in one place: which backend can run where."""

from __future__ import annotations

import importlib.util
import os

#: Triton's interpreter runs kernels on CPU tensors; it is chosen when triton is first imported.
TRITON_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

HAS_TRITON = importlib.util.find_spec("triton") is not None


def cpu_backend() -> str:
    """``"reference"`` (chunked PyTorch, the default) or ``"triton"`` (interpreted kernels).

    Set by ``LIGHTNING_OP_BACKEND``; read on every call so tests can switch it.
    """
    backend = os.environ.get("LIGHTNING_OP_BACKEND", "reference")
    if backend not in ("reference", "triton"):
        raise ValueError(f"LIGHTNING_OP_BACKEND must be 'reference' or 'triton', got {backend!r}")
    if backend == "triton" and not (HAS_TRITON and TRITON_INTERPRETING):
        raise RuntimeError(
            "LIGHTNING_OP_BACKEND=triton on CPU tensors needs triton installed and TRITON_INTERPRET=1 "
            "set before lightning_op is imported"
        )
    return backend
