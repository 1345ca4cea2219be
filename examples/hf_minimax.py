"""A Hugging Face model in plain eager mode, patched in place: transformers' MiniMax with its
lightning-attention layers running lightning_op, generate() and training included.

A tiny randomly initialised MiniMax (no weights are downloaded) is copied; the copy is patched
with ``patch_model`` and both are run side by side: logits of a prompt, greedy ``generate()``
(tokens and every step's logits), a left-padded batch, and a training step's loss and gradients.
Each comparison prints ``check <name>: max_rel_err=<e> tol=<t>`` (the largest difference over the
largest value; ``greedy_tokens`` is the fraction of generated tokens that differ), then the time
of a prefill and of a decode step, original against patched. Exits non-zero when a check fails.
Needs ``pip install transformers``.

    python examples/hf_minimax.py                                  # CPU, float32, a few seconds
    python examples/hf_minimax.py --device cuda --dtype bfloat16 --hidden 1024 --heads 16 --length 4096

In 16-bit dtypes the original keeps its states in that dtype, the patched layers in float32, so
the two drift apart over long generations (greedy tokens may then differ after a while).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import sys
import time

import torch

try:
    from transformers import MiniMaxConfig, MiniMaxForCausalLM
except ImportError as error:  # pragma: no cover - optional dependency
    raise SystemExit("this example needs transformers: pip install transformers") from error

from lightning_op.integrations.transformers import patch_model

VOCAB, PAD = 1024, 0
# the cache's argument and output name: ``past_key_values`` before transformers 5.2x, ``cache`` after
CACHE = "cache" if "cache" in inspect.signature(MiniMaxForCausalLM.forward).parameters else "past_key_values"
# float32: the same function in another order (2e-7 to 6e-7 measured on CPU); 16-bit: the
# original rounds its states to the dtype at every block and token, the op keeps them in float32
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-1, "float16": 5e-2}


def tiny_minimax(args) -> MiniMaxForCausalLM:
    """Lightning-attention layers with one softmax-attention layer last (which stays as it is)."""
    config = MiniMaxConfig(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, head_dim=args.hidden // args.heads,
        num_local_experts=2, num_experts_per_tok=1, pad_token_id=PAD,
        layer_types=["linear_attention"] * (args.layers - 1) + ["full_attention"],
        max_position_embeddings=args.length + args.new_tokens + 64,
    )
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(config)
    with torch.no_grad():  # a trained padding embedding rather than zeros, so that the padding mask matters
        model.model.embed_tokens.weight[PAD].normal_(0, 1)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max()).item()


def milliseconds(fn, repeats: int) -> float:
    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    fn()  # warm up
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
    parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--length", type=int, default=100, help="prompt length")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    original = tiny_minimax(args)
    patched = copy.deepcopy(original)
    print(f"patch_model: {patch_model(patched)} lightning-attention layers patched")
    tol = TOLERANCE[args.dtype]
    failures = []

    def check(name: str, error: float, bound: float = tol) -> None:
        print(f"check {name}: max_rel_err={error:.2e} tol={bound:.0e}")
        if not error <= bound:  # NaN fails too
            failures.append(name)

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, args.length), generator=gen).to(args.device)
    with torch.no_grad():
        check("logits_vs_original", max_rel_err(patched(ids).logits, original(ids).logits))

    # greedy generation: the prompt through the op, each new token through the in-place step
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want, got = original.generate(ids, **kwargs), patched.generate(ids, **kwargs)
    check("greedy_tokens", (got.sequences != want.sequences).double().mean().item(), 0.0 if args.dtype == "float32"
          else 1.0)
    steps = min(len(got.logits), len(want.logits))
    check("generate_step_logits_vs_original",
          max(max_rel_err(got.logits[i], want.logits[i]) for i in range(steps)))

    # a left-padded batch: padded positions must not enter the states
    ids_padded, mask = ids.clone(), torch.ones_like(ids)
    ids_padded[1, : args.length // 3], mask[1, : args.length // 3] = PAD, 0
    kwargs.update(attention_mask=mask)
    want, got = original.generate(ids_padded, **kwargs), patched.generate(ids_padded, **kwargs)
    check("padded_batch_step_logits_vs_original",
          max(max_rel_err(got.logits[i], want.logits[i]) for i in range(min(len(got.logits), len(want.logits)))))

    # a training step: loss and gradients
    labels = ids_padded.masked_fill(mask == 0, -100)
    losses = []
    for model in (original, patched):
        model.train()
        loss = model(ids_padded, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
        model.eval()
    check("training_loss_vs_original", max_rel_err(losses[1], losses[0]))
    check("training_grads_vs_original", max(
        max_rel_err(b.grad, a.grad) for a, b in zip(original.parameters(), patched.parameters())
        if a.grad is not None and a.grad.abs().max() > 1e-6 * max(p.grad.abs().max() for p in original.parameters()
                                                                    if p.grad is not None)
    ))

    # time: a prefill of the prompt, and one decode step after it
    prompt = ids[:1]
    rows = []
    for name, model in (("original", original), ("patched", patched)):
        with torch.no_grad():
            prefill = milliseconds(lambda: model(prompt, use_cache=True), args.repeats)
            cache = getattr(model(prompt, use_cache=True), CACHE)
            token = prompt[:, -1:]
            # each step adds a token to the cache (the softmax layer's keys grow by one)
            decode = milliseconds(lambda: model(token, use_cache=True, **{CACHE: cache}), max(args.repeats, 5))
        rows.append((name, prefill, decode))
    print(f"\nMiniMax, {args.layers} layers ({args.layers - 1} lightning + 1 softmax), hidden {args.hidden}, "
          f"{args.heads} heads, {args.dtype} on {args.device}, prompt {args.length}")
    print(f"{'':>9} | {'prefill ms':>10} | {'decode step ms':>14}")
    for name, prefill, decode in rows:
        print(f"{name:>9} | {prefill:>10.2f} | {decode:>14.2f}")
    print(f"{'speed-up':>9} | {rows[0][1] / rows[1][1]:>10.2f} | {rows[0][2] / rows[1][2]:>14.2f}")
    if failures:
        sys.exit(f"hf_minimax: checks failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
