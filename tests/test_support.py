"""support.unsupported: the one statement of what lightning::attn accepts."""

import numpy as np
import pytest
import torch
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from lightning_op.support import MAX_HEAD_DIM, MIN_HEAD_DIM, unsupported


def test_accepted_inputs():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert unsupported(dtypes=(("q", dtype),)) is None
    for size in (MIN_HEAD_DIM, 64, 100, MAX_HEAD_DIM, np.int64(128)):
        assert unsupported(head_dims=(("v", size),)) is None
    assert unsupported(device=torch.device("cpu")) is None and unsupported(device="cuda:1") is None
    # a symbolic head dim is checked when the graph runs
    assert unsupported(head_dims=(("v", ShapeEnv().create_unbacked_symint()),)) is None


@pytest.mark.parametrize("arguments, error, reason", [
    (dict(dtypes=(("q", torch.float64),)), TypeError, "q must be float16, bfloat16 or float32, got torch.float64"),
    (dict(dtypes=(("q", torch.float32), ("k", torch.int32))), TypeError, "k must be float16, bfloat16 or float32"),
    (dict(head_dims=(("q and k", MIN_HEAD_DIM - 1),)), ValueError, "head dim of q and k must be between 16 and 256, got 15"),
    (dict(head_dims=(("v", MAX_HEAD_DIM + 1),)), ValueError, "head dim of v must be between 16 and 256, got 257"),
    (dict(head_dims=(("v", 64.0),)), TypeError, "head dim of v must be an int, got 64.0"),
    (dict(device=torch.device("meta")), ValueError, "device meta is not supported"),
])
def test_refusals_name_the_argument(arguments, error, reason):
    refused = unsupported(**arguments)
    assert refused is not None and refused.error is error and reason in refused.reason
