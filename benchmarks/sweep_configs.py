"""Time the forward kernels under several launch configurations (input to choose_config).

    python3 benchmarks/sweep_configs.py            # on the GPU; prints one line per config

Each line: shape, config, median ms, achieved bandwidth (q, k, v read + o written) as a fraction
of a device copy measured in the same run. Not part of the test suite: an experiment log.
"""

import dataclasses
import sys

import torch
from triton.testing import do_bench

import lightning_op
from lightning_op.kernels import choose_config, linear_attention


def main() -> None:
    device = torch.device("cuda")
    src = torch.empty(2**31, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_bps = 2 * src.numel() / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
    del src, dst
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} copy {copy_bps / 1e12:.2f} TB/s")
    shapes = [(8, 8192, 16, 128), (1, 65536, 16, 128), (8, 8192, 16, 64)]
    for b, n, h, d in shapes:
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16) for _ in range(3))
        decay = lightning_op.slopes(h).to(device)
        base = choose_config(b * h, n, d, d, device)
        variants = [base]
        for change in (
            dict(num_stages=2), dict(num_stages=1), dict(num_warps=4), dict(block_v=32), dict(block_v=128),
            dict(chunk=128), dict(chunk=32), dict(segment_len=max(base.chunk, base.segment_len // 2)),
            dict(segment_len=max(base.chunk, base.segment_len // 4)), dict(block_v=32, num_warps=4),
        ):
            variant = dataclasses.replace(base, **change)
            if variant not in variants:
                variants.append(variant)
        nbytes = 4 * q.numel() * q.element_size()
        for cfg in variants:
            try:
                ms = do_bench(lambda: linear_attention(q, k, v, decay, config=cfg), return_mode="median")
                print(f"B{b} N{n} H{h} D{d} {cfg}: {ms:.3f} ms, {nbytes / (ms * 1e-3) / copy_bps:.0%} of copy",
                      flush=True)
            except Exception as exc:  # an infeasible tile (shared memory, registers) is a data point too
                print(f"B{b} N{n} H{h} D{d} {cfg}: failed: {str(exc).splitlines()[0][:120]}", flush=True)
        del q, k, v
    sys.exit(0)


if __name__ == "__main__":
    main()
