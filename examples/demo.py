"""lightning_op in five steps: call the op, check it, compile a model with it, export it, decode.

    python examples/demo.py

Runs on CPU (chunked PyTorch path) or, when a GPU is present, on the Triton kernels.
"""

import os
import tempfile
import time

import torch

import lightning_op

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
torch.manual_seed(0)
print(f"lightning_op {lightning_op.__version__} | torch {torch.__version__} | device {device} | dtype {dtype}")

# 1. Call the op: q, k, v in the scaled_dot_product_attention layout [B, H, N, D].
B, H, N, D = 2, 8, 1000, 64
q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) * 0.5 for _ in range(3))
decay = lightning_op.slopes(H).to(device)
out, state = lightning_op.lightning_attn(q, k, v, decay, scale=D ** -0.5, output_final_state=True)
print(f"[1] lightning_attn: q {tuple(q.shape)} -> out {tuple(out.shape)} {out.dtype}, "
      f"final state {tuple(state.shape)} {state.dtype}")

# 2. Check it against the quadratic form ((Q K^T) * M) V computed in float64.
expected, _ = lightning_op.reference.attention_quadratic(
    q.double().cpu(), k.double().cpu(), v.double().cpu(), decay.double().cpu(), D ** -0.5
)
error = ((out.double().cpu() - expected).norm() / expected.norm()).item()
print(f"[2] relative error vs float64 masked-attention form: {error:.2e}")

# Running the sequence in two pieces, carrying the state, equals one pass.
first, mid = lightning_op.lightning_attn(q[:, :, :600], k[:, :, :600], v[:, :, :600], decay,
                                         scale=D ** -0.5, output_final_state=True)
second = lightning_op.lightning_attn(q[:, :, 600:], k[:, :, 600:], v[:, :, 600:], decay,
                                     scale=D ** -0.5, initial_state=mid)
piece_error = (torch.cat([first, second], 2).float() - out.float()).abs().max().item()
print(f"    two pieces with the carried state vs one pass: max difference {piece_error:.1e}")


class Block(torch.nn.Module):
    """A small linear-attention block in the [B, N, H, D] layout models keep."""

    def __init__(self, dim=256, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.register_buffer("decay", lightning_op.slopes(heads))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).unbind(2)
        q, k = torch.nn.functional.silu(q), torch.nn.functional.silu(k)
        o = lightning_op.lightning_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.decay,
                                        scale=q.shape[-1] ** -0.5)
        return x + self.proj(o.transpose(1, 2).reshape(b, n, -1))


# 3. torch.compile: one graph for every sequence length, forward and backward through our ops.
model = Block().to(device)
compiled = torch.compile(model, fullgraph=True, dynamic=True)
start = time.perf_counter()
for n in (128, 300, 1000):
    x = torch.randn(2, n, 256, device=device, requires_grad=True)
    y = compiled(x)
    y.square().mean().backward()
    torch.testing.assert_close(y, model(x), rtol=1e-3, atol=1e-3)
print(f"[3] torch.compile(fullgraph=True, dynamic=True): lengths 128, 300, 1000 match eager, "
      f"forward+backward ({time.perf_counter() - start:.1f} s including compilation)")

# 4. torch.export with a dynamic sequence length, saved and loaded again.
model.eval()
seq = torch.export.Dim("seq", min=2, max=1 << 20)
exported = torch.export.export(model, (torch.randn(1, 64, 256, device=device),), dynamic_shapes=({1: seq},))
ops_in_graph = sorted({str(n.target) for n in exported.graph.nodes if "lightning" in str(n.target)})
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "block.pt2")
    torch.export.save(exported, path)
    loaded = torch.export.load(path)
x = torch.randn(1, 777, 256, device=device)
torch.testing.assert_close(loaded.module()(x), model(x))
print(f"[4] torch.export (dynamic seq) -> save -> load: graph calls {ops_in_graph}; N=777 matches eager")

# 5. Constant-size state: decode token by token by carrying the final state.
x = torch.randn(1, H, 1, D, device=device, dtype=dtype)
state = torch.zeros(1, H, D, D, device=device)
for _ in range(16):
    y, state = lightning_op.lightning_attn(x, x, x, decay, scale=D ** -0.5, initial_state=state,
                                           output_final_state=True)
print(f"[5] 16 decode steps with a carried {tuple(state.shape)} float32 state "
      f"({state.numel() * 4 / 1024:.0f} KiB, whatever the context length)")
print("demo finished")
