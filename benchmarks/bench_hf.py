"""transformers' MiniMax in eager mode, original against patched (``lightning_op.integrations.transformers``),
side by side in one process.

For each prompt length: a prefill (``model(ids, use_cache=True, logits_to_keep=1)``, as ``generate()``
runs it), then greedy decoding one token at a time from that cache. Both the whole model and its
lightning-attention layers alone (the same layers called one after another on one input, each with
its own cache entry) are timed:

  prefill ms     median over ``--repeats`` prefills, original and patched alternating
  decode ms      median time of one decode step over ``--new-tokens`` steps (whole model: the greedy
                 loop; layers: one token through every lightning layer against the prompt's states)
  peak GiB       the largest memory allocated beyond what was allocated before (weights, inputs),
                 over one prefill and its decode loop (layers: over one prefill)

Every time is wall-clock between two device synchronisations: eager decoding is paced by the
host, and that is what a user of ``model.generate()`` waits for. ``same tokens`` counts the greedy
tokens the two agree on before the first difference (in bf16 the original rounds its states to
bf16 at every block and token, the op keeps them in float32, so they may part after a while).

  python3 benchmarks/bench_hf.py                       # GPU: hidden 1024, 16 heads, 4 layers, bf16, B 1,
                                                       # prefill 4K and 16K, 256 decode tokens
  python3 benchmarks/bench_hf.py --smoke               # CPU, tiny, seconds: checks the runner works

Writes results.csv and results.json under --out and prints the table last. Needs transformers.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import os
import statistics
import sys
import time
from typing import Callable

import torch

from common import DTYPES, GIB, environment, package_version, run_device, write_results
from lightning_op.integrations.transformers import patch_model

try:
    from transformers import MiniMaxConfig, MiniMaxForCausalLM
    from transformers.models.minimax.modeling_minimax import MiniMaxCache
except ImportError as error:  # pragma: no cover - optional dependency
    raise SystemExit("bench_hf.py needs transformers: pip install transformers") from error

# the cache's argument and output name: ``past_key_values`` before transformers 5.2x, ``cache`` after
CACHE = "cache" if "cache" in inspect.signature(MiniMaxForCausalLM.forward).parameters else "past_key_values"
IMPLS = ("original", "patched")
# the targets: (row, least speed-up original / patched) and peak memory no higher
TARGETS = {"prefill": 5.0, "decode": 3.0}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 model on CPU: checks the runner works")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="prompt lengths (default 4096 16384)")
    parser.add_argument("--new-tokens", type=int, default=None, help="greedy decode steps (default 256)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 1024)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default 16)")
    parser.add_argument("--layers", type=int, default=4, help="layers: all lightning but the last (softmax)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (fp32 with --smoke)")
    parser.add_argument("--repeats", type=int, default=None, help="timed prefills per length and impl (default 5)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "out", "hf"), help="output folder")
    args = parser.parse_args(argv)
    small = args.smoke
    args.lengths = args.lengths or ([64, 160] if small else [4096, 16384])
    args.new_tokens = args.new_tokens or (4 if small else 256)
    args.hidden = args.hidden or (64 if small else 1024)
    args.heads = args.heads or (4 if small else 16)
    args.dtype = args.dtype or ("fp32" if small else "bf16")
    args.repeats = args.repeats or (2 if small else 5)
    return args


def build_model(args, device) -> MiniMaxForCausalLM:
    """The rewrite example's model (examples/rewrite_existing_model.py): lightning layers and one
    softmax-attention layer last, two experts with one per token, randomly initialised."""
    config = MiniMaxConfig(
        vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, head_dim=args.hidden // args.heads,
        block_size=256, num_local_experts=2, num_experts_per_tok=1,
        layer_types=["linear_attention"] * (args.layers - 1) + ["full_attention"],
        max_position_embeddings=max(args.lengths) + args.new_tokens + 1,
    )
    torch.manual_seed(0)
    return MiniMaxForCausalLM(config).to(device=device, dtype=DTYPES[args.dtype]).eval()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn: Callable, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


class PeakMemory:
    """The largest allocation beyond what was allocated on entry, in GiB (0 off CUDA)."""

    def __init__(self, device):
        self.device, self.gib = device, 0.0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.gib = (torch.cuda.max_memory_allocated() - self.base) / GIB


def greedy(model, ids, new_tokens: int, device) -> tuple[list[int], list[float]]:
    """Greedy tokens of the first sequence and the time of each decode step, from a fresh prefill."""
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache, token = getattr(out, CACHE), out.logits[:, -1:].argmax(-1)
    tokens, times = [token[0, 0].item()], []
    for _ in range(new_tokens - 1):
        def step():
            nonlocal out
            out = model(token, use_cache=True, **{CACHE: cache})

        times.append(wall_ms(step, device))
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token[0, 0].item())
    return tokens, times


def lightning_layers(model):
    return [layer.self_attn for layer in model.model.layers if layer.block_type == "linear_attention"]


def run_layers(layers, x, cache):
    for layer in layers:
        layer(x, None, None, **{CACHE: cache})


def measure_length(n: int, models: dict, args, device, dtype) -> list[dict]:
    """Rows (one per impl) of the measurements at prompt length n."""
    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(1, 1024, (args.batch, n), generator=gen).to(device)
    hidden = torch.randn(args.batch, n, args.hidden, generator=gen).to(device=device, dtype=dtype)
    token_hidden = torch.randn(args.batch, 1, args.hidden, generator=gen).to(device=device, dtype=dtype)
    rows = {name: {"N": n, "impl": name} for name in IMPLS}
    layers = {name: lightning_layers(model) for name, model in models.items()}

    # peak memory and tokens: one prefill and its decode loop each (also the warm-up)
    tokens, step_times = {}, {}
    for name, model in models.items():
        with PeakMemory(device) as peak:
            tokens[name], step_times[name] = greedy(model, ids, args.new_tokens, device)
        rows[name]["model_peak_gib"] = peak.gib
        with PeakMemory(device) as peak:
            run_layers(layers[name], hidden, MiniMaxCache())
        rows[name]["layers_peak_gib"] = peak.gib

    # prefill: the whole model and the lightning layers alone, original and patched alternating
    prefill = {name: {"model": [], "layers": []} for name in IMPLS}
    for _ in range(args.repeats):
        for name, model in models.items():
            prefill[name]["model"].append(wall_ms(lambda: model(ids, use_cache=True, logits_to_keep=1), device))
            prefill[name]["layers"].append(wall_ms(lambda: run_layers(layers[name], hidden, MiniMaxCache()), device))

    # decode: the greedy loop again (timed), and one token through the lightning layers' cached states
    for name, model in models.items():
        _, times = greedy(model, ids, args.new_tokens, device)
        cache = MiniMaxCache()
        run_layers(layers[name], hidden, cache)
        layer_times = [wall_ms(lambda: run_layers(layers[name], token_hidden, cache), device)
                       for _ in range(args.new_tokens)]
        rows[name].update(
            model_prefill_ms=statistics.median(prefill[name]["model"]),
            layers_prefill_ms=statistics.median(prefill[name]["layers"]),
            model_decode_ms=statistics.median(times + step_times[name]),
            layers_decode_ms=statistics.median(layer_times),
        )

    agree = next((i for i, (a, b) in enumerate(zip(tokens["original"], tokens["patched"])) if a != b),
                 len(tokens["original"]))
    for row in rows.values():
        row["same_tokens"] = agree
        row["new_tokens"] = args.new_tokens
    return list(rows.values())


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"\nMiniMax {meta['layers']} layers ({meta['layers'] - 1} lightning + 1 softmax), hidden {meta['hidden']}, "
          f"{meta['heads']} heads, batch {meta['batch']}, {meta['dtype']} on {meta['device']}; "
          f"torch {meta['torch']}, transformers {meta['transformers']}; wall-clock medians")
    header = ["N", "part", "original", "patched", "original / patched"]
    lines = []
    by_n = {}
    for row in rows:
        by_n.setdefault(row["N"], {})[row["impl"]] = row
    for n, pair in by_n.items():
        a, b = pair["original"], pair["patched"]
        for key, part in (("model_prefill_ms", "prefill ms, whole model"), ("layers_prefill_ms",
                          "prefill ms, lightning layers"), ("model_decode_ms", "decode ms/token, whole model"),
                          ("layers_decode_ms", "decode ms/token, lightning layers"),
                          ("model_peak_gib", "peak GiB, whole model"), ("layers_peak_gib",
                                                                      "peak GiB, lightning layers")):
            ratio = a[key] / b[key] if b[key] else float("nan")
            lines.append([str(n), part, f"{a[key]:.3f}", f"{b[key]:.3f}", f"{ratio:.2f}"])
        lines.append([str(n), "same greedy tokens", f"{a['same_tokens']} of {a['new_tokens']}", "", ""])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")


def targets_line(rows: list[dict]) -> str:
    longest = max(row["N"] for row in rows)
    pair = {row["impl"]: row for row in rows if row["N"] == longest}
    a, b = pair["original"], pair["patched"]
    parts = []
    for key, what, least in (("model_prefill_ms", "prefill", TARGETS["prefill"]),
                             ("layers_prefill_ms", "prefill (layers)", TARGETS["prefill"]),
                             ("model_decode_ms", "decode", TARGETS["decode"]),
                             ("layers_decode_ms", "decode (layers)", TARGETS["decode"])):
        ratio = a[key] / b[key]
        parts.append(f"{what} {ratio:.2f}x (>= {least:g}x: {'met' if ratio >= least else 'missed'})")
    memory = all(pair["patched"][k] <= pair["original"][k] for k in ("model_peak_gib", "layers_peak_gib"))
    parts.append(f"peak memory no higher: {'met' if memory else 'missed'}")
    return f"targets at N = {longest}: " + "; ".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = run_device(args.smoke)
    if device is None:
        return 2
    dtype = DTYPES[args.dtype]
    original = build_model(args, device)
    patched = copy.deepcopy(original)
    patched_layers = patch_model(patched)
    models = {"original": original, "patched": patched}
    print(f"patched {patched_layers} lightning-attention layers; lengths {args.lengths}, {args.new_tokens} decode "
          f"tokens, {args.repeats} prefills each", flush=True)

    rows = []
    with torch.no_grad():
        for n in args.lengths:
            begin = time.perf_counter()
            rows += measure_length(n, models, args, device, dtype)
            print(f"N={n}: done in {time.perf_counter() - begin:.0f} s", flush=True)

    meta = {**environment(device), "transformers": package_version("transformers"), "dtype": args.dtype,
            "hidden": args.hidden, "heads": args.heads, "layers": args.layers, "batch": args.batch,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "timing": "wall clock between synchronisations"}
    paths = write_results(rows, meta, args.out)
    print("wrote " + ", ".join(paths), flush=True)
    print(targets_line(rows))
    print_table(rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
