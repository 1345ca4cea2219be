"""Time forward and forward+backward under several launch configurations (input to choose_config).

    python3 benchmarks/sweep_configs.py [--shapes 8x8192x16x128,1x65536x16x128] [--backward]

Each line: shape, the forced parameters (``kernels.config_override``; everything else as
``choose_config`` picks), median forward ms with its bandwidth (q, k, v read + o written) as a
fraction of a device copy measured in the same run, and with ``--backward`` the median
forward+backward ms. Not part of the test suite: an experiment log for benchmarks/RESULTS.md.
"""

import argparse
import os

import torch
from triton.testing import do_bench

import lightning_op
from lightning_op.kernels import choose_config, config_override, state_itemsize_of

VARIANTS = [
    {}, dict(kv_fused=0), dict(segment_len=2048), dict(segment_len=4096), dict(segment_len=8192),
    dict(segment_len=16384), dict(state_split=1, kv_state_split=1), dict(state_split=4, kv_state_split=4),
    dict(block_v=64), dict(kv_segment_len=4096), dict(kv_num_stages=3), dict(kv_num_stages=1), dict(kv_chunk=32),
    dict(num_stages=2), dict(chunk=128, num_stages=2, kv_chunk=64),
    # 15-23: the fused backward in one segment (D = 64), warps, D = 256 tiles, two state pieces,
    # the two kernel forms, the widest value block
    dict(kv_segment_len=8192), dict(segment_len=8192, kv_segment_len=8192), dict(num_warps=8),
    dict(block_v=64, chunk=64), dict(num_warps=4), dict(state_split=2, kv_state_split=2),
    dict(accumulate=0), dict(accumulate=1), dict(block_v=128),
    # 24-27: the D = 64 backward (fused pass stages and warps, eight warps in one segment)
    dict(kv_num_stages=2), dict(kv_num_warps=8), dict(kv_num_warps=8, kv_num_stages=2),
    dict(num_warps=8, segment_len=8192, kv_segment_len=8192),
    # 28-33: D = 256 tiles (16 warps, the whole 128-column value block in 2 stages, chunks of 32)
    dict(num_warps=16), dict(block_v=128, num_stages=2), dict(block_v=128, num_stages=2, num_warps=16),
    dict(chunk=32, block_v=128), dict(chunk=32), dict(num_stages=2, num_warps=16),
    # 34-35: long sequences with half-width value blocks (twice the programs, fewer segments)
    dict(block_v=64, num_warps=4), dict(block_v=64, accumulate=1),
    # 36-38: D = 256 with the state update's row weights on the values (WEIGHT_VALUES: more shared
    # memory, so fewer stages or narrower chunks)
    dict(weight_values=1, num_stages=2), dict(weight_values=1, chunk=32), dict(weight_values=1, num_stages=2, num_warps=16),
    # 39-41: the segment-state pass in the ACCUMULATE form alone (its products accumulated in
    # place, no rescaled state), in one or two pieces per segment; the other form in two pieces
    dict(state_accumulate=1), dict(state_accumulate=1, state_split=2), dict(state_accumulate=0, state_split=2),
    # 42-44: the output pass's state update alone accumulating (UPDATE_ACCUMULATE), also with 16
    # warps; 16 warps in the default form
    dict(update_accumulate=1), dict(update_accumulate=1, num_warps=16), dict(num_warps=16, num_stages=2),
    # 45: the output pass's state update in the other form (the default until 2026-12-02, session 4)
    # (45-47 at 51adac3 timed the fused multiply-add combination, since the only form)
    dict(update_accumulate=0),
    # 46: the fused backward's state update in the other form (its default until 2026-12-02, session 4)
    dict(kv_update_accumulate=0),
    # 47: D = 256 with the state update accumulating and its weights on the value rows (fewest
    # loop instructions on sm_90; three stages would need 245,760 B of shared memory)
    dict(update_accumulate=1, weight_values=1, num_stages=2),
    # 48: the fused backward's dk scores after dv's store (LATE_DK_SCORES: half the loop's spills on sm_90)
    dict(kv_late_dk_scores=1),
    # 49: D = 256 in small programs, two per multiprocessor (value blocks and chunks of 32, four
    # warps, 86 KB of shared memory; registers.py: 771 loop instructions per 32 rows, 19 local)
    dict(block_v=32, chunk=32, num_warps=4, update_accumulate=1, weight_values=1),
    # 50-52: the transposed output kernel (state S^T in parts of 64 key columns; the default since
    # session 6 at D = 128 and bf16 D = 256), at D = 256 in value blocks of 128 (2 stages: 3 do not
    # fit) or 64, and at D = 128 in the default tiles
    dict(transposed=1, block_v=128, num_stages=2), dict(transposed=1, num_stages=2), dict(transposed=1),
    # 53-54: the transposed kernel with eight warps (D = 64 defaults to four), and the other output
    # kernel (the default before session 6 at every D)
    dict(transposed=1, num_warps=8), dict(transposed=0),
    # 55: the transposed kernel in chunks of 32 (float16 at D = 256: chunks of 64 overflow shared memory)
    dict(transposed=1, chunk=32, block_v=128, num_stages=2),
]


def profile(step, label: str, repeats: int = 5, leaves=()) -> None:
    """Per-kernel device time of ``step`` (averaged over ``repeats`` calls), largest first, and the
    host time of one call (launches only, no synchronisation): when it exceeds the device time
    the timings measure the host. ``leaves`` get their gradients cleared before each call, as
    ``do_bench(grad_to_none=...)`` does (else each backward adds into the previous gradients)."""
    import time

    def clean_step():
        for leaf in leaves:
            leaf.grad = None
        step()

    clean_step()
    torch.cuda.synchronize()
    host = []
    for _ in range(repeats):
        begin = time.perf_counter()
        clean_step()
        host.append(time.perf_counter() - begin)
        torch.cuda.synchronize()
    print(f"  host time of one {label} call: {sorted(host)[len(host) // 2] * 1e6:.0f} us (median)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            clean_step()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None)
        if total is None:
            total = getattr(event, "cuda_time_total", 0.0)
        if total > 0:
            rows.append((total / repeats, event.count // repeats, event.key))
    print(f"  profile {label}: {sum(r[0] for r in rows if not r[2].startswith('ProfilerStep')):.0f} us per call")
    for us, count, name in sorted(rows, reverse=True)[:8]:
        print(f"    {us:8.1f} us  x{count:<3} {name[:70]}")


DECODE_VARIANTS = [
    {}, dict(decode_block_v=8), dict(decode_block_v=16), dict(decode_block_v=32), dict(decode_block_v=64),
    dict(decode_block_v=16, decode_num_warps=2), dict(decode_block_v=8, decode_num_warps=1),
    dict(decode_block_v=32, decode_num_warps=8),
]


def sweep_decode(device, batches=(1, 16, 256), heads=16, head_dim=128, steps=16) -> None:
    """Per-step time of the decode step, ``steps`` chained steps captured in one CUDA graph (the GPU
    time a decode loop inside a model graph pays), under each decode configuration."""
    decay = lightning_op.slopes(heads).to(device)
    for batch in batches:
        q, k, v = (torch.randn(batch, heads, 1, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
        state = torch.zeros(batch, heads, head_dim, head_dim, device=device)
        step_bytes = 2 * state.numel() * 4 + 4 * q.numel() * q.element_size()
        line = f"  decode B{batch}:"
        for changes in DECODE_VARIANTS:
            label = ",".join(f"{key.removeprefix('decode_')}={value}" for key, value in changes.items()) or "default"
            with config_override(**changes):
                for _ in range(2):  # compile outside the capture
                    lightning_op.attn_step(q, k, v, state, decay)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(steps):
                        lightning_op.attn_step(q, k, v, state, decay)
            us = do_bench(graph.replay, return_mode="median") * 1e3 / steps
            line += f" {label} {us:.2f}us/{step_bytes / (us * 1e-6) / 1e12:.2f}TB/s |"
        print(line, flush=True)


def timed_line(label: str, q, k, v, grad, decay, nbytes: float, copy_bps: float, backward: bool = True) -> str:
    """``label``, the median forward ms and its fraction of copy bandwidth and, with ``backward``,
    the median forward+backward ms, under whatever configuration is in force."""
    with torch.no_grad():
        fwd = do_bench(lambda: lightning_op.lightning_attn(q, k, v, decay), return_mode="median")
    line = f"  {label:<34} fwd {fwd:.3f} ms {nbytes / (fwd * 1e-3) / copy_bps:4.0%} of copy"
    if backward:
        both = do_bench(lambda: lightning_op.lightning_attn(q, k, v, decay).backward(grad),
                        grad_to_none=[q, k, v], return_mode="median")
        line += f"  fwd+bwd {both:.3f} ms"
    return line


def tuned_line(q, k, v, grad, decay, nbytes: float, copy_bps: float) -> None:
    """Autotuning on a fresh cache: the time its first forward+backward took (the tuning), what it
    chose per kind, and the tuned forward and forward+backward times (to set beside the default's)."""
    import json
    import tempfile
    import time

    path = lightning_op.enable_autotune(os.path.join(tempfile.mkdtemp(), "autotune.json"))
    try:
        begin = time.perf_counter()
        lightning_op.lightning_attn(q, k, v, decay).backward(grad)
        torch.cuda.synchronize()
        tuning_s = time.perf_counter() - begin
        line = timed_line("autotuned", q, k, v, grad, decay, nbytes, copy_bps)
    finally:
        lightning_op.disable_autotune()
    print(f"{line}  (tuning took {tuning_s:.1f} s)", flush=True)
    with open(path) as f:
        for key, record in json.load(f)["entries"].items():
            kind = next(part for part in key.split(";") if part.startswith("kind="))
            print(f"    {kind} reverse={key.rsplit('reverse=', 1)[-1][:5]}: {record}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="8x8192x16x128,1x65536x16x128,8x8192x16x64")
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--profile", action="store_true", help="per-kernel times of the default config first")
    parser.add_argument("--variants", default=None, help="indices into VARIANTS to run, comma-separated (default all)")
    parser.add_argument("--decode", action="store_true", help="only the decode-step configurations")
    parser.add_argument("--autotune", action="store_true", help="also autotune each shape (fresh cache) and time that")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="input dtype")
    args = parser.parse_args()
    device = torch.device("cuda")
    src = torch.empty(2**31, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_bps = 2 * src.numel() / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
    del src, dst
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} copy {copy_bps / 1e12:.2f} TB/s", flush=True)
    if args.decode:
        sweep_decode(device)
        return
    dtype = getattr(torch, args.dtype)
    for shape in args.shapes.split(","):
        b, n, h, d = (int(x) for x in shape.split("x"))
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        decay = lightning_op.slopes(h).to(device)
        nbytes = 4 * q.numel() * q.element_size()
        default = choose_config(b * h, n, d, d, device, itemsize=q.element_size(),
                                state_itemsize=state_itemsize_of(q.dtype))
        print(f"B{b} N{n} H{h} D{d} {args.dtype}: default {default}", flush=True)
        if args.profile:
            with torch.no_grad():
                profile(lambda: lightning_op.lightning_attn(q, k, v, decay), "forward")
            profile(lambda: lightning_op.lightning_attn(q, k, v, decay).backward(grad), "forward+backward",
                    leaves=(q, k, v))
        chosen = VARIANTS if args.variants is None else [VARIANTS[int(i)] for i in args.variants.split(",")]

        def results():
            """Output and (with --backward) the three gradients: each variant is checked against the
            default configuration (which the GPU tests check against the float64 oracle)."""
            out = lightning_op.lightning_attn(q, k, v, decay)
            if not args.backward:
                return [out.detach()]
            return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]

        baseline = results()
        for changes in chosen:
            label = ",".join(f"{key}={value}" for key, value in changes.items()) or "default"
            try:
                with config_override(**changes):
                    error = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                                for a, b in zip(results(), baseline))
                with config_override(**changes):
                    line = timed_line(label, q, k, v, grad, decay, nbytes, copy_bps, args.backward)
                print(f"{line}  rel. diff {error:.0e}", flush=True)
            except Exception as exc:  # an infeasible tile (shared memory, registers) is a data point too
                print(f"  {label:<34} failed: {str(exc).splitlines()[0][:100]}", flush=True)
        if args.autotune:
            tuned_line(q, k, v, grad, decay, nbytes, copy_bps)
        del q, k, v, grad


if __name__ == "__main__":
    main()
