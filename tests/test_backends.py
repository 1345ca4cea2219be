"""The backward composed from linear attentions (``backends.backward``) against autograd through
the float64 quadratic form."""

import pytest
import torch

from lightning_op import backends, reference

from test_reference import DECAYS, _inputs


@pytest.mark.parametrize("n", [0, 1, 17, 50])
@pytest.mark.parametrize("decay", DECAYS, ids=["no-decay", "decay"])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("with_grad_final", [False, True])
def test_chunked_backward_matches_autograd(n, decay, with_init, with_grad_final):
    q, k, v, init = _inputs(2, 3, n, 8, 12, seed=1)
    init = init if with_init else None
    leaves = [x.clone().requires_grad_() for x in (q, k, v)] + ([init.clone().requires_grad_()] if with_init else [])
    out, final = reference.attention_quadratic(*leaves[:3], decay, 0.7, leaves[3] if with_init else None)
    grad_out = torch.randn_like(out)
    grad_final = torch.randn_like(final) if with_grad_final else None
    loss = (out * grad_out).sum() + ((final * grad_final).sum() if with_grad_final else 0)
    expected = torch.autograd.grad(loss, leaves, allow_unused=True)
    actual = backends.backward(backends.chunked(16), grad_out, grad_final, q, k, v, decay, 0.7, init)
    for a, e in zip(actual, expected):
        if e is None:  # n == 0 and no path from the input to the loss
            assert a is None or a.abs().sum() == 0
        else:
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    if not with_init:
        assert actual[3] is None
