"""The op under torch.compile (fullgraph, dynamic) and torch.export (dynamic N, save/load)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lightning_op

pytestmark = pytest.mark.slow
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class TinyLinearAttention(torch.nn.Module):
    """Projections around the op, in the [B, N, H, D] layout most models keep."""

    def __init__(self, dim=64, heads=4, with_state=False):
        super().__init__()
        self.heads, self.head_dim, self.with_state = heads, dim // heads, with_state
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.register_buffer("decay", lightning_op.slopes(heads))

    def forward(self, x, state=None):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        q, k = torch.nn.functional.silu(q), torch.nn.functional.silu(k)
        o, final = lightning_op.lightning_attn(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.decay,
            scale=self.head_dim ** -0.5, initial_state=state, output_final_state=True,
        )
        y = self.out(o.transpose(1, 2).reshape(b, n, -1))
        return (y, final) if self.with_state else y


def _grads(model, x):
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.square().sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


def test_compile_fullgraph_dynamic_matches_eager_without_recompiles(cpu_backend):
    torch.manual_seed(0)
    model = TinyLinearAttention().to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (33, 64, 130):
            x = torch.randn(2, n, 64, device=DEVICE)
            y, gx, gp = _grads(compiled, x)
            y_ref, gx_ref, gp_ref = _grads(model, x)
            torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)
            for a, b in zip(gp, gp_ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compile_dynamic_takes_a_float_attribute_as_scale(cpu_backend):
    """Under dynamic=True a float module attribute is traced as a symbolic float: the scale check
    must not break the graph, a changed scale must change the result, and a bad one must still
    raise when the op runs."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = 0.5

        def forward(self, q, k, v):
            return lightning_op.lightning_attn(q, k, v, scale=self.scale)

    torch.manual_seed(0)
    model = Scaled()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    q, k, v = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(3))
    for scale in (0.5, 0.25):
        model.scale = scale
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v), rtol=1e-5, atol=1e-5)
    model.scale = float("inf")
    with pytest.raises(Exception, match="scale must be a finite float"):
        compiled(q, k, v)


def test_compiled_graphs_hold_the_forward_and_backward_ops():
    from torch._dynamo.backends.common import aot_autograd

    graphs, dynamo_graphs = [], []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    aot = aot_autograd(fw_compiler=record, bw_compiler=record)

    def backend(gm, example_inputs):
        dynamo_graphs.append(gm)
        return aot(gm, example_inputs)

    model = TinyLinearAttention().to(DEVICE)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    for n in (17, 40):
        compiled(torch.randn(1, n, 64, device=DEVICE, requires_grad=True)).sum().backward()
    assert len(dynamo_graphs) == 1  # one graph, no recompile for the second length
    targets = [node.target for g in graphs for node in g.graph.nodes]
    assert torch.ops.lightning.attn.default in targets
    assert torch.ops.lightning.attn_bwd.default in targets


def test_export_dynamic_length_save_load_in_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = TinyLinearAttention(with_state=True).eval()
    n = torch.export.Dim("n", min=2, max=4096)
    example = (torch.randn(2, 50, 64), torch.zeros(2, 4, 16, 16))
    ep = torch.export.export(model, example, dynamic_shapes=({1: n}, None))
    assert any(node.target is torch.ops.lightning.attn.default for node in ep.graph.nodes)
    for length in (3, 77, 300):
        x, state = torch.randn(2, length, 64), torch.randn(2, 4, 16, 16)
        for got, want in zip(ep.module()(x, state), model(x, state)):
            torch.testing.assert_close(got, want)

    path = tmp_path / "model.pt2"
    torch.export.save(ep, str(path))
    x, state = torch.randn(2, 123, 64), torch.randn(2, 4, 16, 16)
    torch.save({"x": x, "state": state, "expected": model(x, state)}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import torch, lightning_op
        ep = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        y, final = ep.module()(io["x"], io["state"])
        # another process may take other CPU matmul kernels: y (|y| <= 1.3) came out 2.1e-5 off
        # in two of six fresh processes (2026-12-02) while the final state matched exactly, so y
        # gets fp32 noise room: a decay or initial state 1% off moves it by 5e-3 and more
        torch.testing.assert_close(y, io["expected"][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(final, io["expected"][1])
        print("loaded-and-matched")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded-and-matched" in result.stdout
