"""One rank's work in context parallelism against the plain op on the same local length (one GPU).

Besides its all-gather, a rank of W runs forward the state-only pass over its k and v, the sum of
the W gathered states into its initial state, and the op from that state; backward, the state-only
pass over q and the output's gradient, the sum of the W gathered state gradients, and the op's
backward. Here the all-gather is simulated by the rank's own buffer repeated W times (the bytes an
all-gather writes, without a transfer), so the times are the per-rank work alone; the rank is the
last (the longest sums). The collective is given analytically: the bytes each all-gather of a layer
delivers to a rank, and their time at NVLink and InfiniBand bandwidths (bandwidth term only; NCCL's
per-step latency comes on top).

    python3 benchmarks/bench_cp.py                         # bf16, B 1, H 16, D 128, N_r 4K..64K, W 8 and 64
    python3 benchmarks/bench_cp.py --lengths 16384 --worlds 2,8
    python3 benchmarks/bench_cp.py --smoke --out /tmp/cp   # tiny fp32 shapes on CPU

Writes results.csv and results.json under --out (default benchmarks/out/cp) and prints a table
last: forward and forward+backward ms of the plain op and of the rank's work, their ratio (the
target is at most 1.15), the forwards' host time alone (where it passes the forward's time, the
host sets the pace), the two state-only passes alone, and the collective per layer.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import common
import lightning_op
from lightning_op import distributed

#: per-GPU, per-direction link bandwidths in bytes/s: NVLink 4 (H100 SXM: 900 GB/s both ways) and
#: one InfiniBand NDR port (400 Gb/s)
LINKS = {"nvlink": 450e9, "infiniband": 50e9}
STATE_BYTES = 4  # float32 states and state gradients


class SimulatedExchange:
    """Rank ``rank`` of ``world`` without a process group: every rank's buffer is this rank's own."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def gather(self, parts):
        flat = torch.cat([x.reshape(-1) for x in parts])
        return flat.repeat(self.world).view(self.world, -1)


def collective_bytes(b: int, h: int, dk: int, dv: int, world: int) -> dict:
    """Bytes one rank receives from the others in a layer's forward and backward all-gathers: the
    forward sends a state and two length numbers a rank, the backward two states."""
    state = b * h * dk * dv
    forward, backward = (world - 1) * (state + 2) * STATE_BYTES, (world - 1) * 2 * state * STATE_BYTES
    row = {"fwd_collective_bytes": forward, "bwd_collective_bytes": backward}
    for link, bytes_per_s in LINKS.items():
        row[f"fwd_collective_us_{link}"] = forward / bytes_per_s * 1e6
        row[f"bwd_collective_us_{link}"] = backward / bytes_per_s * 1e6
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_arguments(parser, out=os.path.join("benchmarks", "out", "cp"), dtype_help="default bf16 (fp32 with --smoke)",
                                rep_help="do_bench repetition time, default 100 (20 with --smoke)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None, help="default 16 (2 with --smoke)")
    parser.add_argument("--head-dim", type=int, default=None, help="default 128 (32 with --smoke)")
    parser.add_argument("--lengths", default=None, help="local lengths N_r, default 4096,16384,65536 (128,256 with --smoke)")
    parser.add_argument("--worlds", default=None, help="simulated group sizes, default 8,64 (2,4 with --smoke)")
    args = parser.parse_args()
    common.apply_common_defaults(args)
    heads = args.heads or (2 if args.smoke else 16)
    dim = args.head_dim or (32 if args.smoke else 128)
    lengths = [int(x) for x in (args.lengths or ("128,256" if args.smoke else "4096,16384,65536")).split(",")]
    worlds = [int(x) for x in (args.worlds or ("2,4" if args.smoke else "8,64")).split(",")]
    started = common.start_run(args)
    if started is None:
        sys.exit(1)
    device, dtype, timer = started
    copy_bytes, copy_bytes_per_s = common.measure_copy(
        timer, device, args.copy_gib, f"{len(lengths)} lengths x {len(worlds)} group sizes, B{args.batch} H{heads} D{dim}"
    )
    progress = common.Progress(len(lengths) * (1 + len(worlds)))
    decay = lightning_op.slopes(heads).to(device)
    local = distributed.OP_ATTENTION
    rows = []
    for n in lengths:
        torch.manual_seed(args.seed)
        q, k, v = (torch.randn(args.batch, heads, n, dim, device=device, dtype=dtype) * 0.5 for _ in range(3))
        grad = torch.randn_like(q)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def plain_fwd():
            return lightning_op.lightning_attn(q, k, v, decay, scale=args.scale)

        def plain_fwdbwd():
            lightning_op.lightning_attn(*leaves, decay, scale=args.scale).backward(grad)

        plain = {"fwd_ms": timer(plain_fwd), "fwdbwd_ms": timer(plain_fwdbwd, grad_to_none=leaves),
                 "fwd_host_ms": common.host_ms(plain_fwd, device)}
        passes = {
            "state_pass_ms": timer(lambda: local.state(q, k, v, decay)),
            "state_grad_pass_ms": timer(lambda: local.state_gradient(q, grad, decay, args.scale, heads)),
        }
        one = distributed._attention(q, k, v, decay, args.scale, None, SimulatedExchange(0, 1), local)[0]
        rel_err_w1 = ((one.double() - plain_fwd().double()).norm() / plain_fwd().double().norm()).item()
        progress.line(f"N_r {n}: plain op", f"fwd {plain['fwd_ms']:.3f} ms, fwd+bwd {plain['fwdbwd_ms']:.3f} ms")
        for world in worlds:
            exchange = SimulatedExchange(world - 1, world)

            def cp_fwd():
                return distributed._attention(q, k, v, decay, args.scale, None, exchange, local)

            def cp_fwdbwd():
                distributed._attention(*leaves, decay, args.scale, None, exchange, local)[0].backward(grad)

            cp = {"cp_fwd_ms": timer(cp_fwd), "cp_fwdbwd_ms": timer(cp_fwdbwd, grad_to_none=leaves),
                  "cp_fwd_host_ms": common.host_ms(cp_fwd, device)}
            row = {"B": args.batch, "H": heads, "D": dim, "N_r": n, "W": world, "dtype": args.dtype, **plain, **cp,
                   "fwd_ratio": cp["cp_fwd_ms"] / plain["fwd_ms"], "fwdbwd_ratio": cp["cp_fwdbwd_ms"] / plain["fwdbwd_ms"],
                   **passes, "rel_err_w1_vs_op": rel_err_w1, **collective_bytes(args.batch, heads, dim, dim, world)}
            rows.append(row)
            progress.line(f"N_r {n} W {world}", f"fwd x{row['fwd_ratio']:.3f}, fwd+bwd x{row['fwdbwd_ratio']:.3f}")
            common.free(device)

    meta = common.common_metadata(args, device, dtype, copy_bytes, copy_bytes_per_s, {}, {})
    meta.update(links_bytes_per_s=LINKS, timer=timer.method, rank="last of W", exchange="simulated (no transfer)")
    for path in common.write_results(rows, meta, args.out):
        print(f"wrote {path}")
    print(f"\n{'N_r':>6} {'W':>3} | {'op fwd':>8} {'cp fwd':>8} {'ratio':>6} {'op host':>8} {'cp host':>8} | "
          f"{'op f+b':>8} {'cp f+b':>8} {'ratio':>6} | "
          f"{'state':>7} {'dstate':>7} | {'fwd MiB':>8} {'NVL us':>7} {'IB us':>7} | {'bwd MiB':>8} {'NVL us':>7} {'IB us':>7}")
    for r in rows:
        print(f"{r['N_r']:>6} {r['W']:>3} | {r['fwd_ms']:8.3f} {r['cp_fwd_ms']:8.3f} {r['fwd_ratio']:6.3f} "
              f"{r['fwd_host_ms']:8.3f} {r['cp_fwd_host_ms']:8.3f} | "
              f"{r['fwdbwd_ms']:8.3f} {r['cp_fwdbwd_ms']:8.3f} {r['fwdbwd_ratio']:6.3f} | "
              f"{r['state_pass_ms']:7.3f} {r['state_grad_pass_ms']:7.3f} | "
              f"{r['fwd_collective_bytes'] / 2**20:8.2f} {r['fwd_collective_us_nvlink']:7.1f} "
              f"{r['fwd_collective_us_infiniband']:7.1f} | {r['bwd_collective_bytes'] / 2**20:8.2f} "
              f"{r['bwd_collective_us_nvlink']:7.1f} {r['bwd_collective_us_infiniband']:7.1f}")
    print("ms: medians (" + timer.method + "); host: the forward's host time alone (the device synchronised between "
          "calls, not inside one: where it passes the fwd time, the host sets the pace); "
          "state, dstate: the two state-only passes alone; MiB and us: what one "
          "rank receives per layer and its time at " + ", ".join(f"{k} {v / 1e9:g} GB/s" for k, v in LINKS.items()))


if __name__ == "__main__":
    main()
