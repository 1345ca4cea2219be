"""Time one mixed serving step: prompt chunks and decode tokens continuing the states of a pool.

The step (default: 4 prompt chunks of 2048 tokens and 60 decode tokens, H 16, D 128, bf16, a
float32 pool of 256 states, slots a random choice of distinct rows) runs three ways:

  packed      one ``lightning_op.attn_step(q, k, v, pool, decay, cu_seqlens=cu, state_indices=slots)``:
              on a GPU the tiled kernels read each sequence's state from its pool row and write it back
  composed    the same packed call composed from the op: the slots gathered, ``lightning_attn`` with
              ``cu_seqlens`` from them, the final states written back (the chunked CPU path's way)
  per_call    the way engines run it today with the same kernels: one pooled decode call for the
              decode tokens, then per prompt a gather of its state, ``lightning_attn`` with it as the
              initial state, and a write-back of the final state

Each is timed eager (the host's launches included) and, on a GPU, captured in one CUDA graph
(replays: GPU time alone). Before timing, each one's outputs and pool are checked against
``packed``'s from the same pool.

  python3 benchmarks/bench_serve.py                       # the default step
  python3 benchmarks/bench_serve.py --prompts 8 --prompt-len 1024 --decodes 120
  python3 benchmarks/bench_serve.py --segment-lens 256,512,2048   # the packed way at other segment lengths
  python3 benchmarks/bench_serve.py --profile       # and each way's kernels with their GPU time per step
  python benchmarks/bench_serve.py --smoke --out /tmp/smoke   # tiny fp32 shapes on CPU

Writes results.csv and results.json under --out and prints a table last.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lightning_op  # noqa: E402
from lightning_op import ops  # noqa: E402
from lightning_op.kernels import config_override  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_common_arguments, apply_common_defaults, common_metadata, free, measure_copy,  # noqa: E402
                    package_version, start_run, write_results)

WAYS = ("packed", "composed", "per_call")


def make_step(args, device, dtype):
    """Packed q, k, v [1, H, N, D] (prompts first, then one token per decode), cu_seqlens, the
    pool, the slots (distinct rows) and the decay."""
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    lengths = [args.prompt_len] * args.prompts + [1] * args.decodes
    n, h, d = sum(lengths), args.heads, args.head_dim
    q, k, v = ((0.5 * torch.randn(1, h, n, d, generator=gen)).to(device=device, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    pool = (0.1 * torch.randn(args.pool, h, d, d, generator=gen)).to(device)
    slots = torch.randperm(args.pool, generator=gen)[: len(lengths)].to(device=device, dtype=torch.int32)
    return q, k, v, cu, pool, slots, lightning_op.slopes(h).to(device), lengths


def ways(q, k, v, cu, pool, slots, decay, lengths, args):
    """name -> step(pool) -> out [1, H, N, D], each updating ``pool`` in place."""
    scale = args.scale
    prompts = args.prompts
    bounds = [(int(a), int(b)) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    first_decode = bounds[prompts][0] if args.decodes else q.shape[2]
    # the decode tokens as rows [B, H, 1, D], as an engine keeps them (copied once, outside the step)
    rows = [x[0, :, first_decode:].transpose(0, 1).unsqueeze(2).contiguous() for x in (q, k, v)]
    decode_slots = slots[prompts:].contiguous()
    prompt_slots = [slots[i:i + 1].long() for i in range(prompts)]

    def packed(pool):
        return lightning_op.attn_step(q, k, v, pool, decay, scale=scale, cu_seqlens=cu, state_indices=slots)

    def composed(pool):
        return ops._pooled_step(q, k, v, pool, decay, scale, cu, slots)

    def per_call(pool):
        out = torch.empty(1, q.shape[1], q.shape[2], v.shape[3], dtype=q.dtype, device=q.device)
        if args.decodes:
            step = lightning_op.attn_step(*rows, pool, decay, scale=scale, state_indices=decode_slots)
            out[0, :, first_decode:] = step[:, :, 0].transpose(0, 1)
        for i in range(prompts):
            a, b = bounds[i]
            start = pool.index_select(0, prompt_slots[i])
            o, final = lightning_op.lightning_attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], decay, scale=scale,
                                                   initial_state=start, output_final_state=True)
            out[:, :, a:b] = o
            pool.index_copy_(0, prompt_slots[i], final)
        return out

    return {"packed": packed, "composed": composed, "per_call": per_call}


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def captured(step, pool: Tensor):
    """``step(pool)`` captured in a CUDA graph (warmed up on a side stream first): a replay runs it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step(pool)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(pool)
    return graph


def kernel_times(step, pool: Tensor, steps: int = 10) -> list[tuple[str, int, float]]:
    """``(kernel, launches per step, GPU microseconds per step)`` of ``step(pool)``, slowest first,
    from torch.profiler's CUDA activity over ``steps`` warm steps."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step(pool)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(pool)
        torch.cuda.synchronize()
    totals: dict = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.device_time_total
    return sorted(((name, count // steps, us / steps) for name, (count, us) in totals.items()), key=lambda x: -x[2])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, out="benchmarks/out/serve", dtype_help="inputs' dtype (default bf16; fp32 --smoke)",
                         rep_help="timing window per case, ms (default 100; 20 with --smoke)")
    parser.add_argument("--prompts", type=int, default=None, help="prompt chunks (default 4; 2 with --smoke)")
    parser.add_argument("--prompt-len", type=int, default=None, help="tokens per chunk (default 2048; 40 --smoke)")
    parser.add_argument("--decodes", type=int, default=None, help="decode tokens (default 60; 3 with --smoke)")
    parser.add_argument("--pool", type=int, default=None, help="pool rows (default 256; 8 with --smoke)")
    parser.add_argument("--heads", type=int, default=None, help="default 16 (2 with --smoke)")
    parser.add_argument("--head-dim", type=int, default=None, help="Dk = Dv; default 128 (32 with --smoke)")
    parser.add_argument("--segment-lens", default="",
                        help="comma-separated forward segment lengths: the packed way again at each, "
                             "forced with config_override (rows packed_seg<L>)")
    parser.add_argument("--profile", action="store_true",
                        help="GPU: each way's kernels and their time per step (torch.profiler), before the table")
    args = parser.parse_args(argv)
    apply_common_defaults(args)
    args.segment_lens = [int(x) for x in args.segment_lens.split(",") if x.strip()]
    small = args.smoke
    for name, full, smoke in (("prompts", 4, 2), ("prompt_len", 2048, 40), ("decodes", 60, 3), ("pool", 256, 8),
                              ("heads", 16, 2), ("head_dim", 128, 32)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if small else full)
    if args.prompts + args.decodes > args.pool:
        parser.error(f"--pool ({args.pool}) must hold a row per sequence ({args.prompts + args.decodes})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = start_run(args)
    if started is None:
        return 1
    device, dtype, timer = started
    torch.manual_seed(args.seed)
    step = make_step(args, device, dtype)
    q, k, v, cu, pool, slots, decay, lengths = step
    shape = (f"{args.prompts} x {args.prompt_len} prompt tokens + {args.decodes} decodes, H{args.heads} "
             f"D{args.head_dim} {args.dtype}, pool {args.pool}")
    copy_bytes, copy_bytes_per_s = measure_copy(timer, device, args.copy_gib, shape)
    steps = ways(*step, args)
    for length in args.segment_lens:  # the packed call with its segments forced to ``length`` rows
        def forced(pool, length=length):
            with config_override(forward={"segment_len": length}):
                return steps["packed"](pool)
        steps[f"packed_seg{length}"] = forced
    original = pool.clone()
    if args.profile and device.type == "cuda":
        for name in steps:
            times = kernel_times(steps[name], pool)
            print(f"{name}: {sum(t for _, _, t in times):.1f} us of kernels per step", flush=True)
            for kernel, count, us in times[:12]:
                print(f"  {us:8.1f} us  x{count:<3d} {kernel[:90]}", flush=True)
        pool.copy_(original)
    reference_out = steps["packed"](pool)
    reference_pool = pool.clone()
    rows = []
    for name in steps:
        pool.copy_(original)
        out = steps[name](pool)
        err_out, err_pool = relative_error(out, reference_out), relative_error(pool, reference_pool)
        eager_ms = timer(lambda: steps[name](pool))
        graph_ms = float("nan")
        if device.type == "cuda":
            graph = captured(steps[name], pool)
            graph_ms = timer(graph.replay)
            del graph
        rows.append(dict(way=name, eager_ms=eager_ms, graph_ms=graph_ms, err_out_vs_packed=err_out,
                         err_pool_vs_packed=err_pool))
        print(f"{name}: eager {eager_ms:.3f} ms, graph {graph_ms:.3f} ms, rel. diff out {err_out:.1e} "
              f"pool {err_pool:.1e}", flush=True)
        free(device)
    meta = common_metadata(args, device, dtype, copy_bytes, copy_bytes_per_s, {},
                           {"lightning_op": package_version("lightning_op")})
    meta.update(prompts=args.prompts, prompt_len=args.prompt_len, decodes=args.decodes, pool=args.pool,
                heads=args.heads, head_dim=args.head_dim, timer=timer.method)
    write_results(rows, meta, args.out)
    base = {row["way"]: row for row in rows}["packed"]
    print(f"\nmixed step: {shape}; {meta['device']}, torch {meta['torch']}, triton {meta['triton']}")
    print("| way | eager ms | x packed | graph ms | x packed |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['way']} | {row['eager_ms']:.3f} | {row['eager_ms'] / base['eager_ms']:.2f} | "
              f"{row['graph_ms']:.3f} | {row['graph_ms'] / base['graph_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
