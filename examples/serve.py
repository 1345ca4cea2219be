"""Continuous batching from a StatePool: many requests, one packed call per layer per engine step.

    python examples/serve.py                      # GPU sizes (bf16; CUDA graphs for decode-only steps)
    python examples/serve.py --device cpu --dtype float32 --requests 12 --max-prompt 300 --max-new 24 \\
        --budget 128 --slots 4 --layers 2 --hidden 64 --heads 4 --kv-heads 2 --decode-graphs pad --threads 1

A tiny randomly initialised LM (embedding, blocks of LightningAttention and an MLP, each with a
norm and a residual, LM head) serves requests that arrive over time (exponential gaps, in engine
steps) with random prompt and output lengths. Each step admits arrived requests while slots are
free, then runs ONE call per layer over a packed row: every ongoing decode (one token) and prompt
chunks up to `--budget` tokens (a long prompt is split over steps), each sequence continuing its
slot's state in place (`layer(x, cache=pool, slots=..., cu_seqlens=...)`). Sampling is greedy;
a finished request frees its slot. Steps with no prompt chunk can run at bucketed batch sizes,
padded with slot -1 rows (zeros out, no slot touched), which CUDA graphs replay on a GPU.

It prints throughput and per-step latency, then runs each request alone, one after the other
(plain prefill and StateCache decoding, from an empty state, fed the engine's tokens: a server
without batching), prints that loop's throughput beside the engine's, and checks: the logits
every generated token was chosen from must agree within the dtype's tolerance (the decisive
`check` line), and it reports how many tokens equal the alone run's greedy choice. A token that
differs must be a near tie there (top logits within that tolerance), or the script exits non-zero.
"""

import argparse
import math
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_op.nn import LightningAttention, StateCache, StatePool

#: Bound on max |engine - alone| / max |alone| over a request's logits. The two runs split the
#: prompt differently (chunks, matrix shapes), so they differ by rounding: below 1e-6 in float32 on CPU.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class TinyLM(nn.Module):
    def __init__(self, vocab, hidden, heads, kv_heads, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.attn_norms = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(layers))
        self.attns = nn.ModuleList(LightningAttention(hidden, heads, num_kv_heads=kv_heads, layer_idx=i,
                                                      num_layers=layers) for i in range(layers))
        self.mlp_norms = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
                                  for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens, rows=None, **cache):
        """Logits ``[B, rows, vocab]`` for tokens ``[B, N]``, at positions ``rows`` (all if None);
        ``cache`` goes to every attention layer (``cache=`` a StateCache, or a StatePool with
        ``slots=`` and ``cu_seqlens=``)."""
        x = self.embed(tokens)
        for attn_norm, attn, mlp_norm, mlp in zip(self.attn_norms, self.attns, self.mlp_norms, self.mlps):
            x = x + attn(attn_norm(x), **cache)[0]
            x = x + mlp(mlp_norm(x))
        if rows is not None:  # the LM head only where a token is sampled
            x = x[:, rows]
        return self.head(self.norm(x))


@dataclass
class Request:
    index: int
    arrival: int  # the engine step it arrives at
    prompt: list
    max_new: int
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in its slot's state
    tokens: list = field(default_factory=list)  # generated
    logits: list = field(default_factory=list)  # host float32 rows the generated tokens were chosen from


def make_requests(args, generator):
    gaps = torch.empty(args.requests, dtype=torch.float64).exponential_(args.arrival_rate, generator=generator)
    arrivals = gaps.cumsum(0).floor().long().tolist()
    prompts = torch.randint(1, args.max_prompt + 1, (args.requests,), generator=generator).tolist()
    outputs = torch.randint(1, args.max_new + 1, (args.requests,), generator=generator).tolist()
    return [Request(i, arrivals[i], torch.randint(0, args.vocab, (prompts[i],), generator=generator).tolist(),
                    outputs[i]) for i in range(args.requests)]


class DecodeBuckets:
    """Decode-only steps at a few fixed batch sizes (powers of two up to the slot count): rows
    beyond the batch are padding, slot -1, which gives zeros and touches no slot. Static input
    buffers per size; with ``capture`` (CUDA) each size's step is captured once as a CUDA graph
    and replayed, else (or if capture fails: ``capture_error``) it runs eagerly on the same buffers."""

    def __init__(self, model, pool, num_slots, device, capture):
        self.model, self.pool = model, pool
        self.sizes = sorted({min(2 ** i, num_slots) for i in range(math.ceil(math.log2(num_slots)) + 1)})
        self.inputs = {b: (torch.zeros(b, 1, dtype=torch.long, device=device),
                           torch.full((b,), -1, dtype=torch.long, device=device)) for b in self.sizes}
        self.graphs, self.outputs, self.capture_error = {}, {}, None
        if capture:
            self._capture()

    def _forward(self, size):
        tokens, slots = self.inputs[size]
        logits = self.model(tokens, cache=self.pool, slots=slots)[:, -1]
        return logits, logits.argmax(-1)

    def _capture(self):
        memory = torch.cuda.graph_pool_handle()
        try:
            for size in reversed(self.sizes):  # largest first, the others reuse its memory
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up outside capture: the op's host checks run here
                    for _ in range(2):
                        self._forward(size)  # every slot -1: no state touched
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=memory):
                    self.outputs[size] = self._forward(size)
                self.graphs[size] = graph
        except RuntimeError as error:  # e.g. a host read inside the step, which a capture cannot hold
            self.graphs.clear()
            self.outputs.clear()
            self.capture_error = str(error).strip().splitlines()[0]

    def run(self, tokens, slots):
        n = len(tokens)
        size = next(b for b in self.sizes if b >= n)
        token_buffer, slot_buffer = self.inputs[size]
        token_buffer.copy_(torch.tensor(tokens + [0] * (size - n)).view(size, 1))
        slot_buffer.copy_(torch.tensor(slots + [-1] * (size - n)))
        if size in self.graphs:
            self.graphs[size].replay()
            logits, chosen = self.outputs[size]
        else:
            logits, chosen = self._forward(size)
        return logits[:n], chosen[:n]


class Engine:
    def __init__(self, model, pool, requests, budget, device, buckets):
        self.model, self.pool, self.budget, self.device, self.buckets = model, pool, budget, device, buckets
        self.waiting = deque(sorted(requests, key=lambda r: r.arrival))
        self.running, self.finished = [], []
        self.step_index = 0

    def idle(self) -> bool:
        return not self.running and not self.waiting

    def step(self) -> str:
        """Admit, run one packed call per layer, sample; returns the step's kind."""
        if not self.running and self.waiting[0].arrival > self.step_index:
            self.step_index = self.waiting[0].arrival  # nothing to do until the next arrival
        while self.waiting and self.waiting[0].arrival <= self.step_index and self.pool.free_slots:
            request = self.waiting.popleft()
            request.slot = self.pool.allocate()
            self.running.append(request)
        decodes = [r for r in self.running if r.prefilled == len(r.prompt)]
        chunks, budget = [], self.budget
        for r in self.running:
            if r.prefilled < len(r.prompt) and budget > 0:
                chunks.append((r, min(len(r.prompt) - r.prefilled, budget)))
                budget -= chunks[-1][1]
        if chunks:
            emitting, logits, chosen = self._packed(decodes, chunks)
        else:  # decode-only: a row per request, no cu_seqlens
            emitting, tokens, slots = decodes, [r.tokens[-1] for r in decodes], [r.slot for r in decodes]
            if self.buckets is not None:
                logits, chosen = self.buckets.run(tokens, slots)
            else:
                logits = self.model(self._tensor(tokens)[:, None], cache=self.pool, slots=self._tensor(slots))[:, -1]
                chosen = logits.argmax(-1)
        for r, n in chunks:
            r.prefilled += n
        for r, token, row in zip(emitting, chosen.tolist(), logits.float().cpu()):
            r.tokens.append(token)
            r.logits.append(row)
            if len(r.tokens) == r.max_new:
                self.pool.free(r.slot)
                self.running.remove(r)
                self.finished.append(r)
        self.step_index += 1
        return "mixed" if chunks else "decode"

    def _packed(self, decodes, chunks):
        """Decode tokens, then prompt chunks: packed sequences of one row, one call per layer."""
        tokens, bounds, slots, emitting, rows = [], [0], [], [], []
        pieces = [(r, [r.tokens[-1]]) for r in decodes]
        pieces += [(r, r.prompt[r.prefilled:r.prefilled + n]) for r, n in chunks]
        for r, piece in pieces:
            tokens += piece
            bounds.append(len(tokens))
            slots.append(r.slot)
            if r.prefilled + len(piece) >= len(r.prompt):  # a decode, or a chunk ending its prompt: sample there
                emitting.append(r)
                rows.append(len(tokens) - 1)
        logits = self.model(self._tensor(tokens)[None], rows=self._tensor(rows), cache=self.pool,
                            slots=self._tensor(slots), cu_seqlens=self._tensor(bounds))[0]
        return emitting, logits, logits.argmax(-1)

    def _tensor(self, values):
        return torch.tensor(values, dtype=torch.long, device=self.device)


def warm_up(model, pool, device, vocab):
    """Make the pools and compile what the first steps would: packed calls and decode rows whose
    slots are all -1 (padding), which touch no state."""
    lengths = [1, 1, 63, 64, 65, 300]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    tokens = torch.randint(0, vocab, (1, sum(lengths)), device=device)
    padding = torch.full((len(lengths),), -1, device=device)
    model(tokens, cache=pool, slots=padding, cu_seqlens=bounds)
    model(tokens[:, :len(lengths)].T, cache=pool, slots=padding)


def alone(model, request, device):
    """The request by itself: its prompt in one plain prefill, then StateCache decode steps fed
    the engine's tokens. Returns the logits each generated token is chosen from."""
    cache = StateCache()
    prompt = torch.tensor(request.prompt, device=device)[None]
    logits = [model(prompt, rows=[-1], cache=cache)[0, -1]]
    for token in request.tokens[:-1]:
        logits.append(model(torch.tensor([[token]], device=device), cache=cache)[0, -1])
    return torch.stack(logits).float().cpu()


def one_at_a_time(model, requests, device):
    """Each request alone, one after the other (what a server without batching does), timed:
    (the logits of each, seconds)."""
    start = time.perf_counter()
    logits = [alone(model, r, device) for r in requests]  # each ends on the host: nothing left queued
    return logits, time.perf_counter() - start


def compare(requests, alone_logits, tol):
    """Max relative logit error over requests; (requests, tokens) agreeing; mismatches that are no
    near tie; the smallest top-2 margin seen (relative to the largest logit)."""
    errors, same_requests, same_tokens, total, not_ties, margin = [], 0, 0, 0, [], math.inf
    for r, want in zip(requests, alone_logits):
        got = torch.stack(r.logits)
        scale = want.abs().amax(-1)
        errors.append(((got - want).abs().amax(-1) / scale).max())
        greedy = want.argmax(-1)
        engine = torch.tensor(r.tokens)
        agree = greedy == engine
        same_tokens += int(agree.sum())
        total += len(r.tokens)
        same_requests += bool(agree.all())
        top2 = want.topk(2, -1).values
        margin = min(margin, ((top2[:, 0] - top2[:, 1]) / scale).min().item())
        gap = (want.gather(-1, greedy[:, None]) - want.gather(-1, engine[:, None]))[:, 0] / scale
        not_ties += [(r.index, i) for i in (~agree & (gap > tol)).nonzero()[:, 0].tolist()]
    worst = torch.stack(errors).max().item()  # NaN if any is
    return worst, same_requests, same_tokens, total, not_ties, margin


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def main():
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-prompt", type=int, default=4096, help="prompt lengths uniform in 1..max")
    parser.add_argument("--max-new", type=int, default=256, help="output lengths uniform in 1..max")
    parser.add_argument("--budget", type=int, default=2048, help="prompt tokens per step (decode tokens on top)")
    parser.add_argument("--slots", type=int, default=64, help="StatePool slots: requests served at once")
    parser.add_argument("--arrival-rate", type=float, default=0.5, help="mean requests arriving per engine step")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--decode-graphs", choices=["cuda", "pad", "off"], default=None,
                        help="decode-only steps: padded to bucketed batch sizes and replayed from CUDA graphs "
                        "(cuda), padded and run eagerly (pad), or run unpadded (off); default: cuda on CUDA, else off")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); 1 suits tiny shapes on a busy machine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    graphs = args.decode_graphs or ("cuda" if device.type == "cuda" else "off")
    if graphs == "cuda" and device.type != "cuda":
        sys.exit("serve: --decode-graphs cuda needs a CUDA device")
    torch.manual_seed(args.seed)
    model = TinyLM(args.vocab, args.hidden, args.heads, args.kv_heads or args.heads, args.layers)
    model = model.to(device=device, dtype=dtype).eval()
    requests = make_requests(args, torch.Generator().manual_seed(args.seed))
    pool = StatePool(args.slots)
    print(f"serve: {args.requests} requests (prompts {min(len(r.prompt) for r in requests)}.."
          f"{max(len(r.prompt) for r in requests)} tokens, {min(r.max_new for r in requests)}.."
          f"{max(r.max_new for r in requests)} new), {args.layers} layers, hidden {args.hidden}, {args.heads} heads / "
          f"{args.kv_heads or args.heads} kv, {str(dtype)[6:]} on {device}; {args.slots} slots, budget {args.budget} "
          f"prompt tokens/step; decode-only steps: {graphs}")

    with torch.no_grad():
        warm_up(model, pool, device, args.vocab)
        start = time.perf_counter()
        buckets = None if graphs == "off" else DecodeBuckets(model, pool, args.slots, device, capture=graphs == "cuda")
        if graphs == "cuda" and buckets.capture_error:
            print(f"CUDA graph capture failed ({buckets.capture_error}); decode-only steps run padded, eagerly")
        elif graphs == "cuda":
            print(f"captured CUDA graphs for batch sizes {buckets.sizes} in {time.perf_counter() - start:.1f} s")
        engine = Engine(model, pool, requests, args.budget, device, buckets)
        latencies = {"mixed": [], "decode": []}
        start = time.perf_counter()
        while not engine.idle():
            begun = time.perf_counter()
            kind = engine.step()  # ends with the sampled tokens on the host: the step is done
            latencies[kind].append(time.perf_counter() - begun)
        seconds = time.perf_counter() - start
        assert pool.free_slots == args.slots and len(engine.finished) == args.requests

        prompt_tokens = sum(len(r.prompt) for r in requests)
        generated = sum(len(r.tokens) for r in requests)
        every = latencies["mixed"] + latencies["decode"]
        print(f"steps: {len(every)} ({len(latencies['mixed'])} with prompt chunks, {len(latencies['decode'])} "
              f"decode-only) in {seconds:.2f} s")
        print(f"throughput: {(prompt_tokens + generated) / seconds:,.0f} tokens/s ({prompt_tokens} prompt + "
              f"{generated} generated), {generated / seconds:,.0f} generated tokens/s")
        for name, values in (("all", every), ("with prompt chunks", latencies["mixed"]),
                             ("decode-only", latencies["decode"])):
            if values:
                print(f"step latency ms, {name}: median {1e3 * statistics.median(values):.2f}, "
                      f"p90 {1e3 * percentile(values, 0.9):.2f}")

        alone_logits, alone_seconds = one_at_a_time(model, requests, device)
        print(f"one request at a time: {(prompt_tokens + generated) / alone_seconds:,.0f} tokens/s in "
              f"{alone_seconds:.2f} s; the engine's throughput is {alone_seconds / seconds:.2f}x that")
        tol = TOLERANCE[dtype]
        worst, same_requests, same_tokens, total, not_ties, margin = compare(requests, alone_logits, tol)
    print(f"check logits_vs_alone: max_rel_err={worst:.2e} tol={tol:.0e}")
    print(f"agreement: {same_requests}/{len(requests)} requests, {same_tokens}/{total} tokens equal the alone run's "
          f"greedy choice ({str(dtype)[6:]}; alone = plain prefill + StateCache decode fed the engine's tokens, so "
          "where all agree it is the request's own greedy run)")
    print(f"smallest top-2 logit margin in the alone runs: {margin:.1e} of the largest logit")
    if not_ties:
        print(f"tokens that differ without a near tie (request, position): {not_ties[:8]}")
    if not worst <= tol or not_ties:  # NaN fails too
        sys.exit("serve: the engine's outputs differ from running the requests alone")


if __name__ == "__main__":
    main()
