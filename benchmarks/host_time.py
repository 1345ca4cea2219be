"""Host time of one eager call: the eager path of ``lightning_attn`` against the registered op.

    python3 benchmarks/host_time.py                       # CUDA: B8 N8K H16, D = 64 and 128, bf16
    python3 benchmarks/host_time.py --stub                # CPU: the kernels replaced by no-ops

Host time is the wall time of the Python call with nothing synchronised inside it (the GPU is
synchronised between calls, outside the timed region): what the host spends on validation,
dispatch, autograd and launches. When it exceeds the GPU time of the call, the host sets the pace
(benchmarks/RESULTS.md, 2026-12-02: D = 64 forward+backward on the H200 machine). ``--stub`` runs
CPU tensors through the Triton launchers with every kernel replaced by a no-op, so what is left is
this project's and PyTorch's own host work, comparable across machines without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stub", action="store_true", help="CPU tensors, kernels replaced by no-ops")
    parser.add_argument("--shape", default=None, help="BxNxH (default 8x8192x16 on CUDA, 1x64x2 with --stub)")
    parser.add_argument("--dims", default="64,128", help="head dims, comma-separated")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per case (default 20 on CUDA, 2000 stubbed)")
    parser.add_argument("--profile", action="store_true",
                        help="also the Python functions where one eager forward+backward spends its host time "
                             "(cProfile, largest own time first), and the bare kernel launchers' host time")
    args = parser.parse_args(argv)
    if args.stub:  # before the kernels module is imported: the launchers then take CPU tensors
        os.environ["LIGHTNING_OP_BACKEND"] = "triton"
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    import common  # after the environment above: it imports torch and lightning_op
    import lightning_op
    from lightning_op import ops

    if args.stub:
        import lightning_op.kernels  # noqa: F401  (its modules, whose launchers look the kernels up)

        class NoOp:
            def __getitem__(self, grid):
                return lambda *a, **k: None

        kernel_names = ("_chunk_output_kernel", "_key_value_grad_kernel",
                        "_segment_state_kernel", "_segment_scan_kernel")
        modules = [m for n, m in list(sys.modules.items()) if n.startswith("lightning_op.kernels") and m is not None]
        for module in modules:  # wherever a launcher finds a kernel by name
            for name in kernel_names:
                if hasattr(module, name):
                    setattr(module, name, NoOp())
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("host_time.py: no CUDA device (use --stub on CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
    b, n, h = (int(x) for x in (args.shape or ("1x64x2" if args.stub else "8x8192x16")).split("x"))
    calls = args.calls or (2000 if args.stub else 20)
    decay = lightning_op.slopes(h).to(device)
    print(f"{'stubbed kernels, CPU' if args.stub else torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"B{b} N{n} H{h} bf16, median of {calls} calls", flush=True)

    def host_us(step) -> float:
        return common.host_ms(step, device, calls) * 1e3

    for d in (int(x) for x in args.dims.split(",")):
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        paths = (("eager path", lambda *a: lightning_op.lightning_attn(*a)), ("through the op", lambda *a: ops.attn(*a)[0]))
        line = f"D{d}:"
        for label, call in paths:
            def forward():
                with torch.no_grad():
                    call(q, k, v, decay)

            def forward_backward():
                for x in (q, k, v):
                    x.grad = None
                call(q, k, v, decay).backward(grad)

            line += f"  {label} fwd {host_us(forward):.0f} us, fwd+bwd {host_us(forward_backward):.0f} us;"
        print(line, flush=True)
        if args.profile:
            profile_host(q, k, v, decay, grad, host_us, calls)
    return 0


def profile_host(q, k, v, decay, grad, host_us, calls: int) -> None:
    """Where an eager forward+backward's host time goes: the bare launchers of ``lightning_op.kernels``
    (no validation, dispatch or autograd) and cProfile's largest own times over ``calls`` calls."""
    import cProfile
    import pstats

    import lightning_op
    from lightning_op import kernels

    with_grad = [x.detach() for x in (q, k, v)]

    def bare_forward():
        kernels.linear_attention(*with_grad, decay)

    print(f"  bare forward launcher (kernels.linear_attention): {host_us(bare_forward):.0f} us", flush=True)

    def step():
        for x in (q, k, v):
            x.grad = None
        lightning_op.lightning_attn(q, k, v, decay).backward(grad)

    step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:18]
    print(f"  cProfile of {calls} eager forward+backward calls, own time per call (us), calls per call:")
    for (file, line, name), (_, ncalls, own, cumulative, _) in rows:
        where = f"{os.path.basename(file)}:{line}({name})"
        print(f"    {own / calls * 1e6:8.1f} own {cumulative / calls * 1e6:8.1f} cum  x{ncalls / calls:<5.1f} {where[:90]}")


if __name__ == "__main__":
    sys.exit(main())
