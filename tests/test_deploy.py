"""lightning_op.deploy: the triton_op twin of lightning::attn and the for_package transform (CPU).

The GPU side (the Triton kernels through wrap_triton, a CUDA package) is in test_gpu.py; the
package built on CPU and run without lightning_op is in test_examples.py and below.
"""

import pytest
import torch

import lightning_op
from lightning_op.deploy import for_package

from _helpers import TOLERANCE, make_inputs, rel_error, run_script


@pytest.mark.parametrize("n", [0, 1, 65, 300])
@pytest.mark.parametrize("decay_kind", ["none", "mixed"])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attn_inference_equals_attn_on_cpu(n, decay_kind, with_init, dtype):
    q, k, v = make_inputs(2, 4, n, 32, 24, dtype, layout="bnhd", seed=n)
    decay = None if decay_kind == "none" else torch.tensor([1e-5, 0.01, 0.3, 30.0])
    init = torch.randn(2, 4, 32, 24) * 0.3 if with_init else None
    out, final = torch.ops.lightning.attn_inference(q, k, v, decay, 0.6, init)
    expected_out, expected_final = torch.ops.lightning.attn(q, k, v, decay, 0.6, init)
    assert out.dtype == expected_out.dtype and final.dtype == torch.float32
    assert rel_error(out, expected_out) < TOLERANCE[dtype]
    assert rel_error(final, expected_final) < TOLERANCE[torch.float32]


class _TwoLayers(torch.nn.Module):
    """Two attention layers carrying states, as a deployed model would."""

    def __init__(self, hidden=64, heads=2):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            lightning_op.nn.LightningAttention(hidden, heads, layer_idx=i, num_layers=2) for i in range(2)
        )

    def forward(self, x, states):
        new_states = []
        for layer, state in zip(self.layers, states):
            y, state = layer(x, state)
            x = x + y
            new_states.append(state)
        return x, new_states


def _export(model, length=100):
    x = torch.randn(1, length, 64)
    states = [torch.randn(1, 2, 32, 32) * 0.1 for _ in range(2)]
    seq = torch.export.Dim("seq", min=1, max=1 << 16)
    return torch.export.export(model, (x, states), dynamic_shapes=({1: seq}, [None, None])), states


def _lightning_targets(ep):
    return [str(node.target) for node in ep.graph.nodes if "lightning" in str(node.target)]


def test_for_package_swaps_every_attn_node_and_keeps_the_values():
    torch.manual_seed(0)
    model = _TwoLayers().eval()
    ep, states = _export(model)
    standalone = for_package(ep)
    assert _lightning_targets(ep) == ["lightning.attn.default"] * 2  # the input is left alone
    assert _lightning_targets(standalone) == ["lightning.attn_inference.default"] * 2
    with torch.no_grad():
        for length in (1, 64, 77):  # other lengths than the traced one
            x = torch.randn(1, length, 64)
            got, want = standalone.module()(x, states), model(x, states)
            for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
                assert rel_error(a, b) < 1e-5


def test_for_package_refuses_other_lightning_ops():
    class Step(torch.nn.Module):
        def forward(self, q, state):
            return lightning_op.attn_step(q, q, q, state) * 2

    q, state = torch.randn(1, 2, 1, 16), torch.zeros(1, 2, 16, 16)
    with torch.no_grad():
        ep = torch.export.export(Step(), (q, state))
    # as exported (the op itself) and functionalized (auto_functionalized_v2 around it)
    for program in (ep, ep.run_decompositions()):
        with pytest.raises(ValueError, match="lightning.attn_step.*no standalone"):
            for_package(program)
    with pytest.raises(TypeError, match="ExportedProgram"):
        for_package(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_cpu_package_runs_without_lightning_op(tmp_path):
    torch.manual_seed(0)
    model = _TwoLayers().eval()
    ep, states = _export(model)
    torch._inductor.aoti_compile_and_package(for_package(ep), package_path=str(tmp_path / "model_aoti.pt2"))
    with torch.no_grad():
        # lengths on both sides of whole chunks of 64, and one token
        cases = [(f"{n} tokens", (x, states), model(x, states))
                 for n in (1, 63, 64, 65, 300) for x in [torch.randn(1, n, 64)]]
    torch.save(cases, tmp_path / "cases.pt")
    out = run_script("examples/run_package.py", str(tmp_path))
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "max |diff| vs eager" in line]
    assert len(diffs) == 5 and max(diffs) < 1e-4, out
    assert "lightning_op imported: False" in out
