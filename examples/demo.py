"""lightning_op in five steps: call the op, check it, compile a model with it, export it, decode.

    python examples/demo.py

Runs on CPU (chunked PyTorch path) or, when a GPU is present, on the Triton kernels. Every
comparison prints a line `check <name>: max_rel_err=<e> tol=<t>` (the largest difference over the
largest expected value); the script exits non-zero if any is above its tolerance.
"""

import os
import sys
import tempfile
import time

import torch

import lightning_op

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
# float32 accumulates in float32 throughout; 16-bit values are rounded on the way (bf16: 2^-8 relative)
tol = 1e-4 if dtype == torch.float32 else 2e-2
torch.manual_seed(0)
print(f"lightning_op {lightning_op.__version__} | torch {torch.__version__} | device {device} | dtype {dtype}")
failures = []


def check(name, got, want, tol):
    """Print how far `got` is from `want` and remember a failure (the script exits non-zero at the end)."""
    got, want = got.double().cpu(), want.double().cpu()
    error = ((got - want).abs().max() / want.abs().max()).item()
    print(f"    check {name}: max_rel_err={error:.2e} tol={tol:.0e}")
    if not error <= tol:  # NaN fails too
        failures.append(name)


def reference_attention(q, k, v, decay, scale):
    """The definition, written out in float64: o_t = scale * sum_{s <= t} lam^(t-s) (q_t . k_s) v_s
    and final state S = sum_s lam^(N-1-s) k_s^T v_s, with lam = exp(-decay) per head."""
    q, k, v = (x.double().cpu() for x in (q, k, v))
    n = q.shape[2]
    t = torch.arange(n, dtype=torch.float64)
    distance = t[:, None] - t[None, :]                               # t - s
    log_lam = -decay.double().cpu()[:, None, None]                   # [H, 1, 1]
    mask = torch.exp(log_lam * distance.clamp(min=0)) * (distance >= 0)
    out = scale * ((q @ k.transpose(-1, -2)) * mask) @ v
    key_weight = torch.exp(log_lam * (n - 1 - t)[:, None])           # [H, N, 1]
    return out, (k * key_weight).transpose(-1, -2) @ v


# 1. Call the op: q, k, v in the scaled_dot_product_attention layout [B, H, N, D].
B, H, N, D = 2, 8, 1000, 64
q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) * 0.5 for _ in range(3))
decay = lightning_op.slopes(H).to(device)
out, state = lightning_op.lightning_attn(q, k, v, decay, scale=D ** -0.5, output_final_state=True)
print(f"[1] lightning_attn: q {tuple(q.shape)} -> out {tuple(out.shape)} {out.dtype}, "
      f"final state {tuple(state.shape)} {state.dtype}")

# 2. Check it against the masked-attention form ((Q K^T) * M) V computed in float64.
expected_out, expected_state = reference_attention(q, k, v, decay, D ** -0.5)
print("[2] against the float64 masked-attention form:")
check("output_vs_float64", out, expected_out, tol)
check("final_state_vs_float64", state, expected_state, tol)

# Running the sequence in two pieces, carrying the state, equals one pass.
first, mid = lightning_op.lightning_attn(q[:, :, :600], k[:, :, :600], v[:, :, :600], decay,
                                         scale=D ** -0.5, output_final_state=True)
second = lightning_op.lightning_attn(q[:, :, 600:], k[:, :, 600:], v[:, :, 600:], decay,
                                     scale=D ** -0.5, initial_state=mid)
check("two_pieces_vs_one_pass", torch.cat([first, second], 2), out, tol)


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


def output_and_grad(model, x):
    y = model(x)
    return y, torch.autograd.grad(y.square().mean(), x)[0]


# 3. torch.compile: one graph for every sequence length, forward and backward through our ops.
#    (The Block runs in float32, so these and [4] are held to float32's tolerance.)
model = Block().to(device)
compiled = torch.compile(model, fullgraph=True, dynamic=True)
start = time.perf_counter()
print("[3] torch.compile(fullgraph=True, dynamic=True), forward and the input's gradient vs eager:")
for n in (128, 300, 1000):
    x = torch.randn(2, n, 256, device=device, requires_grad=True)
    (y, grad), (y_eager, grad_eager) = output_and_grad(compiled, x), output_and_grad(model, x)
    check(f"compiled_vs_eager_n{n}", y, y_eager, 1e-4)
    check(f"compiled_grad_vs_eager_n{n}", grad, grad_eager, 1e-4)
print(f"    ({time.perf_counter() - start:.1f} s including compilation)")

# 4. torch.export with a dynamic sequence length, saved and loaded again.
model.eval()
seq = torch.export.Dim("seq", min=2, max=1 << 20)
exported = torch.export.export(model, (torch.randn(1, 64, 256, device=device),), dynamic_shapes=({1: seq},))
ops_in_graph = sorted({str(n.target) for n in exported.graph.nodes if "lightning" in str(n.target)})
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "block.pt2")
    torch.export.save(exported, path)
    loaded = torch.export.load(path)
print(f"[4] torch.export (dynamic seq) -> save -> load: graph calls {ops_in_graph}; at N=777:")
with torch.no_grad():
    x = torch.randn(1, 777, 256, device=device)
    check("exported_vs_eager", loaded.module()(x), model(x), 1e-4)

# 5. Constant-size state: continue the sequence of [1] token by token with the in-place decode step.
steps = 16
q_new, k_new, v_new = (torch.randn(B, H, steps, D, device=device, dtype=dtype) * 0.5 for _ in range(3))
decoded = []
for t in range(steps):
    q_t, k_t, v_t = (x[:, :, t:t + 1] for x in (q_new, k_new, v_new))
    decoded.append(lightning_op.attn_step(q_t, k_t, v_t, state, decay, scale=D ** -0.5))  # updates state
print(f"[5] {steps} decode steps after the {N} tokens of [1] with a {tuple(state.shape)} float32 state "
      f"({state.numel() * 4 / 1024:.0f} KiB, whatever the context length), vs float64 over all {N + steps} tokens:")
expected_out, expected_state = reference_attention(
    torch.cat([q, q_new], 2), torch.cat([k, k_new], 2), torch.cat([v, v_new], 2), decay, D ** -0.5)
check("decode_vs_float64", torch.cat(decoded, 2), expected_out[:, :, -steps:], tol)
check("decode_state_vs_float64", state, expected_state, tol)

if failures:
    sys.exit(f"demo: checks failed: {', '.join(failures)}")
print("demo finished: every check passed")
