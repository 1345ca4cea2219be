"""Rewrite a model we did not write: transformers' MiniMax, whose lightning-attention layers run
the chunked block loop of Lightning Attention in plain PyTorch.

A tiny randomly initialised MiniMax (no weights are downloaded) is exported, rewritten with
``lightning_op.rewrite`` and compared with the original: how many attention regions now call
``lightning::attn`` (``rewrites n<N>: lightning_attn_calls=<c> expected=<e>``, one per
linear-attention layer), the logits (``check <name>: max_rel_err=<e> tol=<t>``, the largest
difference over the largest logit), what was rewritten, and the time per forward pass; in a 16-bit
dtype also how far each is from the original run in float32. Exits non-zero when a layer was not
rewritten or the logits differ beyond the tolerance. Needs ``pip install transformers``.

    python examples/rewrite_existing_model.py                      # CPU, small, a few seconds
    python examples/rewrite_existing_model.py --device cuda --dtype bfloat16 \\
        --hidden 1024 --heads 16 --layers 4 --lengths 4096 16384 --compile

``--compile`` also times ``torch.compile`` with Inductor alone and with ``backend="lightning"``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

import lightning_op

try:
    from transformers import MiniMaxConfig, MiniMaxForCausalLM
except ImportError as error:  # pragma: no cover - optional dependency
    raise SystemExit("this example needs transformers: pip install transformers") from error


def tiny_minimax(args) -> MiniMaxForCausalLM:
    """Linear-attention layers with one softmax-attention layer last (which must stay as it is)."""
    layer_types = ["linear_attention"] * (args.layers - 1) + ["full_attention"]
    config = MiniMaxConfig(
        vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, head_dim=args.hidden // args.heads,
        block_size=256, num_local_experts=2, num_experts_per_tok=1, layer_types=layer_types,
        max_position_embeddings=max(args.lengths),
    )
    torch.manual_seed(0)
    return MiniMaxForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()


# float32: the block loop and the op differ in rounding only; 16-bit: the block loop rounds its
# intermediates to the dtype, the op accumulates in float32, so the two differ by that rounding
# (2e-2 in bfloat16, 1.3e-2 in float16 at the default size on CPU)
TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-1, "float16": 1e-1}


def milliseconds(fn, repeats: int) -> float:
    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    fn()  # warm up (and compile)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (Inductor vs lightning)")
    args = parser.parse_args()

    model = tiny_minimax(args)
    model_fp32 = copy.deepcopy(model).float() if args.dtype != "float32" else None
    rows, records, failures = [], [], []
    for n in args.lengths:
        ids = torch.randint(0, 1024, (args.batch, n), device=args.device)
        with torch.no_grad():
            exported = torch.export.export(model, (ids,), {"use_cache": False}, strict=False)
            rewritten = lightning_op.rewrite(exported)
            records = records or lightning_op.rewrite_report()
            calls = sum(node.target is torch.ops.lightning.attn.default for node in rewritten.graph.nodes)
            print(f"rewrites n{n}: lightning_attn_calls={calls} expected={args.layers - 1}")
            if calls != args.layers - 1:  # every linear-attention layer, and not the softmax one
                failures.append(f"rewrites n{n}")
            original, fast = exported.module(), rewritten.module()
            want = original(ids, use_cache=False).logits.double()
            got = fast(ids, use_cache=False).logits.double()
            error = ((got - want).abs().max() / want.abs().max()).item()
            print(f"check rewritten_vs_original_n{n}: max_rel_err={error:.2e} tol={TOLERANCE[args.dtype]:.0e}")
            if not error <= TOLERANCE[args.dtype]:  # NaN fails too
                failures.append(f"rewritten_vs_original_n{n}")
            row = {"N": n, "max rel. err": f"{error:.1e}"}
            if args.dtype != "float32":
                # how far each is from the original model run in float32: the block loop rounds
                # its intermediates to the 16-bit dtype, the op accumulates in float32
                exact = model_fp32(ids, use_cache=False).logits.float()
                for key, value in (("orig. vs fp32", want), ("ours vs fp32", got)):
                    row[key] = f"{((value - exact).norm() / exact.norm()).item():.1e}"
                del exact
            row.update({
                "original ms": milliseconds(lambda: original(ids, use_cache=False), args.repeats),
                "rewritten ms": milliseconds(lambda: fast(ids, use_cache=False), args.repeats),
            })
            if args.compile:
                torch._dynamo.reset()
                inductor = torch.compile(model)
                row["inductor ms"] = milliseconds(lambda: inductor(ids, use_cache=False), args.repeats)
                torch._dynamo.reset()
                lightning = torch.compile(model, backend="lightning")
                row["lightning ms"] = milliseconds(lambda: lightning(ids, use_cache=False), args.repeats)
        row["speed-up"] = row["original ms"] / row["rewritten ms"]
        rows.append(row)
        print(f"N={n}: " + ", ".join(f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}"
                                     for key, value in row.items() if key != "N"), flush=True)

    print(f"rewrites at N = {args.lengths[0]}:")
    for record in records:
        print("  ", record)
    print(f"\nMiniMax, {args.layers} layers ({args.layers - 1} lightning + 1 softmax), hidden {args.hidden}, "
          f"{args.heads} heads, batch {args.batch}, {args.dtype} on {args.device}")
    columns = list(rows[0])
    print(" | ".join(f"{c:>12}" for c in columns))
    for row in rows:
        print(" | ".join(f"{row[c]:>12.2f}" if isinstance(row[c], float) else f"{row[c]:>12}" for c in columns))
    if failures:
        sys.exit(f"rewrite_existing_model: checks failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
