"""Generate with a tiny causal LM built from LightningAttention: constant memory per step.

    python examples/generate.py                      # contexts 1K .. 1M on CPU or GPU
    python examples/generate.py --contexts 1024,8192 --steps 32

The model is randomly initialised (the point is the machinery, not the text): a prompt is
prefilled in pieces, carrying each layer's state in a StateCache, then tokens are sampled one at a
time with the in-place decode step. At each context length it prints decode tokens/s and memory:
the state cache is the same size at 1K and at 1M tokens of context.

First it checks the cached paths against recomputing the whole sequence without a cache, printing
`check <name>: max_rel_err=<e> tol=<t>` (the largest difference over the largest logit), and
exits non-zero if one is above its tolerance.
"""

import argparse
import os
import sys
import time

import torch
from torch import nn

from lightning_op.nn import LightningAttention, StateCache


class TinyLM(nn.Module):
    def __init__(self, vocab=256, hidden=128, heads=4, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.attn_norms = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(layers))
        self.attns = nn.ModuleList(
            LightningAttention(hidden, heads, layer_idx=i, num_layers=layers) for i in range(layers)
        )
        self.mlp_norms = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)) for _ in range(layers)
        )
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens, cache=None):
        x = self.embed(tokens)
        for attn_norm, attn, mlp_norm, mlp in zip(self.attn_norms, self.attns, self.mlp_norms, self.mlps):
            x = x + attn(attn_norm(x), cache=cache)[0]
            x = x + mlp(mlp_norm(x))
        return self.head(self.norm(x))


def resident_bytes() -> int:
    """This process's resident memory (Linux), or 0 where /proc is absent."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def check(name, got, want, tol) -> bool:
    error = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
    print(f"check {name}: max_rel_err={error:.2e} tol={tol:.0e}")
    return error <= tol  # False for NaN too


def check_cache_against_recompute(model, device, prompt_len=300, piece=100, steps=4, tol=1e-4) -> bool:
    """Prefill a prompt in pieces and decode a few greedy tokens with a StateCache: the logits must
    match running the model over the whole sequence so far without a cache (which recomputes the
    prefix at every step, so it is only done here, on a short sequence)."""
    tokens = torch.randint(0, 256, (1, prompt_len), device=device)
    cache = StateCache()
    pieces = [model(tokens[:, start:start + piece], cache=cache) for start in range(0, prompt_len, piece)]
    ok = check("prefill_pieces_vs_one_pass", torch.cat(pieces, 1), model(tokens), tol)
    logits, decoded, recomputed = pieces[-1][:, -1], [], []
    for _ in range(steps):
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
        logits = model(tokens[:, -1:], cache=cache)[:, -1]
        decoded.append(logits)
        recomputed.append(model(tokens)[:, -1])
    return check("decode_vs_full_recompute", torch.stack(decoded), torch.stack(recomputed), tol) and ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="1024,16384,131072,1048576", help="context lengths, comma-separated")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed at each context length")
    parser.add_argument("--prefill-chunk", type=int, default=65536, help="tokens per prefill piece")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = TinyLM().to(device).eval()
    print(f"TinyLM on {device}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    with torch.no_grad():
        if not check_cache_against_recompute(model, device):  # timing wrong logits would be pointless
            sys.exit("generate: the cached logits differ from a full recompute")
    cache = StateCache()
    contexts = sorted(int(c) for c in args.contexts.split(","))
    seen = 0
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    print(f"{'context':>10} {'prefill s':>10} {'decode tok/s':>13} {'state cache':>12} {'step alloc':>11} {'process RSS':>12}")
    with torch.no_grad():
        for context in contexts:
            start = time.perf_counter()
            while seen < context:  # prefill in pieces: memory bounded by the piece, not the context
                piece = min(args.prefill_chunk, context - seen)
                model(torch.randint(0, 256, (1, piece), device=device), cache=cache)
                seen += piece
            prefill_s = time.perf_counter() - start
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            generated = []
            for _ in range(args.steps):
                logits = model(token, cache=cache)[:, -1]
                token = torch.multinomial(torch.softmax(logits.float(), -1), 1)
                generated.append(token.item())
            seen += args.steps
            seconds = time.perf_counter() - start
            step_alloc = f"{(torch.cuda.max_memory_allocated() - base) / 1024:.0f} KiB" if device == "cuda" else "n/a"
            print(f"{context:>10} {prefill_s:>10.2f} {args.steps / seconds:>13.1f} {cache.nbytes / 1024:>9.0f} KiB"
                  f" {step_alloc:>11} {resident_bytes() / 2**20:>8.0f} MiB", flush=True)
    print(f"last tokens: {generated[-10:]}")


if __name__ == "__main__":
    main()
