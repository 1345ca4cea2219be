"""Deploy a model that uses lightning_op: torch.export, then an AOTInductor package, load and run.

    python examples/export_deploy.py [--out DIR]

The model maps (tokens, per-layer states) to (logits, new states), so one exported program serves
prefill (any length: the sequence dimension is dynamic) and decoding (one token, carried states).
`lightning_op.deploy.for_package` swaps the program's `lightning::attn` calls for
`lightning::attn_inference`, whose body Inductor compiles into the package (the Triton kernels on
CUDA, ATen ops on CPU), so the package runs with torch alone: `examples/run_package.py` loads and
runs it in a fresh process that cannot import lightning_op. Prints what it did and, at each stage,
`check <name>: max_rel_err=<e> tol=<t>` (over the logits and the states, the largest difference
relative to that output's largest value); exits non-zero if one is above its tolerance.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

import lightning_op
from lightning_op.deploy import for_package
from lightning_op.nn import LightningAttention


class StatefulLM(nn.Module):
    """A tiny LM whose forward is functional in its attention states (exportable)."""

    def __init__(self, vocab=256, hidden=128, heads=4, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(layers))
        self.attns = nn.ModuleList(
            LightningAttention(hidden, heads, layer_idx=i, num_layers=layers) for i in range(layers)
        )
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens, states):
        x = self.embed(tokens)
        new_states = []
        for norm, attn, state in zip(self.norms, self.attns, states):
            y, new_state = attn(norm(x), state)
            x = x + y
            new_states.append(new_state)
        return self.head(x), new_states


TOLERANCE = 1e-4  # float32 model: eager, exported and packaged differ only in rounding
failures = []


def check(name, got, want, tol=TOLERANCE):
    """Print how far the outputs `got` are from `want` and remember a failure (exit status at the end)."""
    errors = []
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), strict=True):
        assert a.shape == b.shape, f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)}"  # no broadcasting
        errors.append(((a.double() - b.double()).abs().max() / b.double().abs().max()).item())
    error = max(errors)
    print(f"    check {name}: max_rel_err={error:.2e} tol={tol:.0e}")
    if not error <= tol:  # NaN fails too
        failures.append(name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for model.pt2 and model_aoti.pt2 (default: a temp dir)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = StatefulLM().to(device).eval()
    states = [torch.zeros(1, 4, 32, 32, device=device) for _ in model.attns]
    prompt = torch.randint(0, 256, (1, 100), device=device)

    seq = torch.export.Dim("seq", min=1, max=1 << 20)
    start = time.perf_counter()
    ep = torch.export.export(model, (prompt, states), dynamic_shapes=({1: seq}, [None] * len(states)))
    ops = sorted({str(n.target) for n in ep.graph.nodes if "lightning" in str(n.target)})
    print(f"[1] torch.export with a dynamic sequence length ({time.perf_counter() - start:.1f} s): graph calls {ops}")

    out_dir = args.out or tempfile.mkdtemp(prefix="lightning_op_deploy_")
    os.makedirs(out_dir, exist_ok=True)
    program_path = os.path.join(out_dir, "model.pt2")
    torch.export.save(ep, program_path)
    reloaded = torch.export.load(program_path)
    with torch.no_grad():
        eager = model(prompt, states)
        print(f"[2] exported program saved to {program_path} and reloaded:")
        check("reloaded_vs_eager", reloaded.module()(prompt, states), eager)

    start = time.perf_counter()
    standalone = for_package(ep)
    ops = sorted({str(n.target) for n in standalone.graph.nodes if "lightning" in str(n.target)})
    package_path = torch._inductor.aoti_compile_and_package(
        standalone, package_path=os.path.join(out_dir, "model_aoti.pt2")
    )
    print(f"[3] for_package (graph now calls {ops}), AOTInductor package written to {package_path} "
          f"({time.perf_counter() - start:.1f} s)")
    runner = torch._inductor.aoti_load_package(package_path)
    with torch.no_grad():
        print("[4] package loaded and run: a 100-token prompt, one decode step from the carried states, "
              "a 777-token prompt (same package, dynamic length)")
        logits, new_states = runner(prompt, states)
        check("package_vs_eager_prompt_100", (logits, new_states), eager)
        token = logits[:, -1:].argmax(-1)
        stepped = runner(token, new_states)
        check("package_vs_eager_decode_step", stepped, model(token, eager[1]))
        # decoding from the carried states continues the prompt: as if the 101 tokens came at once
        prefill_logits, prefill_states = runner(torch.cat([prompt, token], 1), states)
        check("package_decode_step_vs_prefill", stepped, (prefill_logits[:, -1:], prefill_states))
        longer = torch.randint(0, 256, (1, 777), device=device)
        check("package_vs_eager_prompt_777", runner(longer, states), model(longer, states))
        cases = [(name, args, model(*args)) for name, args in (
            ("prompt_100", (prompt, states)),
            ("decode_step", (token, eager[1])),
            ("prompt_777", (longer, states)),
        )]
    torch.save(cases, os.path.join(out_dir, "cases.pt"))
    runner_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_package.py")
    result = subprocess.run([sys.executable, runner_script, out_dir], capture_output=True, text=True)
    print(f"[5] a fresh process without lightning_op loaded and ran the package:\n{result.stdout.rstrip()}")
    if result.returncode != 0:
        failures.append(f"run_package.py (exit status {result.returncode}):\n{result.stderr}")
    if failures:
        sys.exit("export_deploy: checks failed: " + ", ".join(failures))
    print(f"lightning_op {lightning_op.__version__}, torch {torch.__version__}, device {device}: deploy example finished")


if __name__ == "__main__":
    main()
