"""Does AOTInductor load a package at all on this machine? A plain CUDA model, no lightning_op.

    python3 benchmarks/aoti_probe.py build && python3 benchmarks/aoti_probe.py load

Two processes, as a deployment would run them; ``faulthandler`` prints where a crash happens.
(On the lent H200, 2026-11-28: the build succeeds, the load dies with a segmentation fault.)
"""
import faulthandler
import sys

import torch

faulthandler.enable()
mode = sys.argv[1]
if mode == "build":
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()).cuda().eval()
    x = torch.randn(4, 64, device="cuda")
    ep = torch.export.export(model, (x,))
    path = torch._inductor.aoti_compile_and_package(ep, package_path="/tmp/plain.pt2")
    with torch.no_grad():
        torch.save((x, model(x)), "/tmp/plain_io.pt")
    print("built", path, flush=True)
else:
    print("loading", flush=True)
    runner = torch._inductor.aoti_load_package("/tmp/plain.pt2")
    print("loaded", flush=True)
    x, y = torch.load("/tmp/plain_io.pt")
    print("ran: max diff", (runner(x) - y).abs().max().item(), flush=True)
