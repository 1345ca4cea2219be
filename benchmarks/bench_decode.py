"""Time one decode step (T = 1 token against a carried float32 state) for B = 1 ... 256.

Implementations (``--impls``):
  ours              lightning_op.attn_step, eager: one Triton launch, state updated in place
  ours_graph        the same step captured in a torch.cuda.CUDAGraph; each replay is one step
  fla               fla-core ``fused_recurrent_simple_gla`` (g_gamma = -decay, initial_state,
                    output_final_state=True), native [B, T, H, D]; returns a new state each step
  fla_graph         the same captured; replays recompute one step from the captured state (a decode
                    loop would also copy the new state back, or alternate two graphs)
  torch_step        plain PyTorch: state.mul_(lam), state.baddbmm_(k^T, v), o = scale * q @ state
  torch_step_graph  the same captured

Two times per case:
  step    median per call over blocks of back-to-back calls timed with CUDA events: the latency a
          decode loop sees, launch overhead included (the state stays in L2 where it fits)
  kernel  triton.testing.do_bench median with L2 flushed before each call: GPU time from a cold
          cache, which the bandwidth figures use (a launch overhead shorter than the flush hides)
Bytes per step: the float32 state read and written plus q, k, v read and o written.

  python3 benchmarks/bench_decode.py                          # B = 1 ... 256, H 16, D 128, bf16
  python3 benchmarks/bench_decode.py --batches 1,256 --impls ours_graph,fla_graph
  python benchmarks/bench_decode.py --smoke --out /tmp/smoke  # tiny fp32 shapes on CPU

Writes results.csv, results.json and decode_latency.png under --out, and prints a table last.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

import lightning_op
from bench import (GIB, Timer, _one_line, _package_version, apply_common_defaults, copy_bandwidth, environment,
                   pick_device, write_results)

IMPLS = ("ours", "ours_graph", "fla", "fla_graph", "torch_step", "torch_step_graph")
GRAPH_SUFFIX = "_graph"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENS = 1  # one decode step
BTHD_OUTPUT = ("fla",)


# ----------------------------------------------------------------------------- implementations


def torch_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, lam: Tensor, scale: float) -> Tensor:
    """One token in plain PyTorch, in the float32 state: S <- lam * S + k^T v, o = scale * q S.

    q, k: [B, H, 1, Dk], v: [B, H, 1, Dv], state: contiguous [B, H, Dk, Dv], lam: [1, H, 1, 1].
    The outer product goes through baddbmm_ so that no state-sized temporary is allocated.
    """
    b, h, _, dk = q.shape
    dv = v.shape[-1]
    state.mul_(lam)
    state.view(b * h, dk, dv).baddbmm_(k.reshape(b * h, dk, 1).float(), v.reshape(b * h, 1, dv).float())
    out = q.float() @ state
    if scale != 1.0:
        out.mul_(scale)
    return out.to(q.dtype)


def _load_ours():
    return lightning_op.attn_step


def _load_fla():
    from fla.ops.simple_gla import fused_recurrent_simple_gla

    return fused_recurrent_simple_gla


def _load_torch_step():
    return torch_step


LOADERS = {"ours": (_load_ours, "lightning_op"), "fla": (_load_fla, "fla-core"), "torch_step": (_load_torch_step, None)}


def load_impls(names: list[str], device: torch.device):
    """(base name -> loaded function, unavailable impl -> reason, package versions)."""
    loaded, failed, unavailable, versions = {}, {}, {}, {}
    for name in names:
        base = name.removesuffix(GRAPH_SUFFIX)
        if name.endswith(GRAPH_SUFFIX) and device.type != "cuda":
            unavailable[name] = "CUDA graphs need a CUDA device"
            continue
        if base not in loaded and base not in failed:
            load, package = LOADERS[base]
            try:
                loaded[base] = load()
                if package:
                    versions[package] = _package_version(package)
            except Exception as exc:  # a peer that is not installed, or fails to import here
                failed[base] = _one_line(exc)
        if base in failed:
            unavailable[name] = failed[base]
    return loaded, unavailable, versions


@dataclass
class Inputs:
    bhtd: tuple[Tensor, Tensor, Tensor]  # contiguous [B, H, T, D]: ours, torch_step
    bthd: tuple[Tensor, Tensor, Tensor]  # the same values, contiguous [B, T, H, D]: fla
    decay: Tensor  # float32 [H]
    scale: float
    initial_state: Tensor  # float32 [B, H, Dk, Dv]

    @property
    def step_bytes(self) -> int:
        """State read and written, q, k, v read, o written: the least traffic of one step."""
        return 2 * self.initial_state.nbytes + 4 * self.bhtd[0].nbytes


def make_inputs(batch: int, heads: int, head_dim: int, dtype, device, scale: float, seed: int) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    size = (batch, TOKENS, heads, head_dim)
    bthd = tuple(torch.randn(size, generator=gen, device=device, dtype=dtype) for _ in range(3))
    bhtd = tuple(x.transpose(1, 2).contiguous() for x in bthd)
    state = torch.randn(batch, heads, head_dim, head_dim, generator=gen, device=device, dtype=torch.float32)
    return Inputs(bhtd, bthd, lightning_op.slopes(heads).to(device), scale, state)


def stepper(base: str, fn: Callable, x: Inputs) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """state -> (output, state after the step): one decode step. The output is [B, H, T, Dv], or
    [B, T, H, Dv] for implementations in ``BTHD_OUTPUT`` (not transposed here, to time fla as called)."""
    if base == "ours":
        q, k, v = x.bhtd
        return lambda state: (fn(q, k, v, state, x.decay, scale=x.scale), state)
    if base == "fla":
        q, k, v = x.bthd
        g_gamma = -x.decay  # fla takes the log of the per-step decay lam = exp(-decay)
        return lambda state: fn(q, k, v, g_gamma=g_gamma, scale=x.scale, initial_state=state,
                                output_final_state=True)
    if base == "torch_step":
        q, k, v = x.bhtd
        lam = torch.exp(-x.decay).view(1, -1, 1, 1)
        return lambda state: (fn(q, k, v, state, lam, x.scale), state)
    raise ValueError(f"unknown implementation {base!r}")


@dataclass
class Case:
    step: Callable[[], None]  # one decode step; advances the case's state
    last: Callable[[], tuple[Tensor, Tensor]]  # (output, state) of the latest step


def eager_case(step_fn: Callable, initial_state: Tensor) -> Case:
    box = {"state": initial_state.clone(), "last": None}

    def step() -> None:
        box["last"] = step_fn(box["state"])
        box["state"] = box["last"][1]  # fla hands back a new tensor; the others the same one

    return Case(step, lambda: box["last"])


def graph_case(step_fn: Callable, initial_state: Tensor) -> Case:
    state = initial_state.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, autotune and warm the allocator outside the capture
        for _ in range(3):
            step_fn(state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step_fn(state)
    state.copy_(initial_state)  # the warm-up steps moved it on
    return Case(graph.replay, lambda: outputs)


def max_relative_error(out: Tensor, ref: Tensor) -> float:
    ref = ref.float()
    return ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- timing


def step_ms(fn: Callable[[], None], device: torch.device, rep_ms: float, block_ms: float = 0.5) -> float:
    """Median milliseconds per call over blocks of back-to-back calls: the steady-state step time,
    whichever of the host (launches) or the device is slower."""
    cuda = device.type == "cuda"

    def time_block(calls: int) -> Callable[[], float]:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            return lambda: start.elapsed_time(end) / calls
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed_ms = (time.perf_counter() - begin) * 1e3
        return lambda: elapsed_ms / calls

    for _ in range(3):
        fn()
    estimate = time_block(10)
    if cuda:
        torch.cuda.synchronize()
    estimate_ms = max(estimate(), 1e-4)
    calls = max(1, min(1000, math.ceil(block_ms / estimate_ms)))
    blocks = max(5, int(rep_ms / (calls * estimate_ms)))
    results = [time_block(calls) for _ in range(blocks)]
    if cuda:
        torch.cuda.synchronize()
    return statistics.median(result() for result in results)


# ----------------------------------------------------------------------------- the run


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.begin = total, 0, time.perf_counter()

    def line(self, impl: str, batch: int, result: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.begin
        print(f"[{self.done:>3}/{self.total}] {impl:<16} B={batch:<4} {result}  ({elapsed:.0f} s)", flush=True)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_batch(batch: int, names: list[str], impls: dict[str, Callable], args, timer: Timer, device, dtype,
              copy_bytes_per_s: float, progress: Progress) -> list[dict]:
    x = make_inputs(batch, args.heads, args.head_dim, dtype, device, args.scale, args.seed)
    reference_state = x.initial_state.clone()
    reference_out = stepper("torch_step", torch_step, x)(reference_state)[0]
    rows = []
    for name in names:
        base = name.removesuffix(GRAPH_SUFFIX)
        row = {
            "B": batch, "H": args.heads, "D": args.head_dim, "T": TOKENS,
            "dtype": str(dtype).removeprefix("torch."), "impl": name,
            "step_us": math.nan, "kernel_us": math.nan, "step_bytes": x.step_bytes,
            "bytes_per_s": math.nan, "copy_fraction": math.nan,
            "err_out_vs_torch_step": math.nan, "err_state_vs_torch_step": math.nan, "error": "",
        }
        rows.append(row)
        case = None
        try:
            step_fn = stepper(base, impls[base], x)
            case = (graph_case if name.endswith(GRAPH_SUFFIX) else eager_case)(step_fn, x.initial_state)
            case.step()
            out, state = case.last()
            if base in BTHD_OUTPUT:
                out = out.transpose(1, 2)
            row["err_out_vs_torch_step"] = max_relative_error(out, reference_out)
            row["err_state_vs_torch_step"] = max_relative_error(state, reference_state)
            row["step_us"] = 1e3 * step_ms(case.step, device, args.rep_ms)
            row["kernel_us"] = 1e3 * timer(case.step)
            row["bytes_per_s"] = x.step_bytes / (row["kernel_us"] * 1e-6)
            row["copy_fraction"] = row["bytes_per_s"] / copy_bytes_per_s
            progress.line(name, batch, (
                f"step {row['step_us']:9.1f} us  kernel {row['kernel_us']:9.1f} us  "
                f"{row['bytes_per_s'] / 1e9:7.0f} GB/s {100 * row['copy_fraction']:4.0f}% of copy  "
                f"err out {row['err_out_vs_torch_step']:.0e} state {row['err_state_vs_torch_step']:.0e}"))
        except Exception as exc:  # a failed capture, out of memory, a peer's error: note it and go on
            row["error"] = _one_line(exc)
            progress.line(name, batch, row["error"])
        finally:
            case = None
            _free(device)
    return rows


# ----------------------------------------------------------------------------- outputs


def metadata(args, device, dtype, timer: Timer, copy_bytes_per_s, copy_bytes, unavailable, versions) -> dict:
    return {
        **environment(device),
        "packages": versions,
        "unavailable": unavailable,
        "dtype": str(dtype).removeprefix("torch."),
        "heads": args.heads,
        "head_dim": args.head_dim,
        "tokens": TOKENS,
        "scale": args.scale,
        "decay": "lightning_op.slopes(H)",
        "step_timing": ("CUDA events around blocks of back-to-back calls, median per call" if device.type == "cuda"
                        else "time.perf_counter around blocks of back-to-back calls, median per call"),
        "kernel_timing": timer.method,
        "warmup_ms": args.warmup_ms,
        "rep_ms": args.rep_ms,
        "copy_bytes": copy_bytes,
        "copy_bytes_per_s": copy_bytes_per_s,
        "notes": [
            "step_us: steady-state time per step of back-to-back calls, launch overhead included",
            "kernel_us: do_bench median with L2 flushed before each call (GPU time from a cold cache)",
            "step_bytes = float32 state read + written, q, k, v read, o written; "
            "bytes_per_s = step_bytes / kernel time; copy_fraction = that / copy bandwidth (read + write)",
            "err_*_vs_torch_step: max |x - ref| / max |ref| after one step from the same state",
            "fla_graph replays one step from the captured state (no copy back of the new state)",
        ],
    }


def write_plot(rows: list[dict], meta: dict, out_dir: str, impl_order: list[str]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"plots skipped: {_one_line(exc)}", flush=True)
        return []
    fig, (latency, bandwidth) = plt.subplots(1, 2, figsize=(12, 4.8))
    batches = sorted({r["B"] for r in rows})
    for impl in impl_order:
        mine = sorted((r["B"], r["step_us"], r["copy_fraction"]) for r in rows if r["impl"] == impl)
        steps = [(b, us) for b, us, _ in mine if math.isfinite(us)]
        fractions = [(b, 100 * f) for b, _, f in mine if math.isfinite(f)]
        style = {"marker": "o", "linestyle": "--" if impl.endswith(GRAPH_SUFFIX) else "-", "label": impl}
        if steps:
            latency.plot(*zip(*steps), **style)
        if fractions:
            bandwidth.plot(*zip(*fractions), **style)
    for ax in (latency, bandwidth):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch B")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    latency.set_yscale("log")
    latency.set_ylabel("step latency (us), back-to-back calls")
    bandwidth.set_ylabel("% of copy bandwidth (kernel time)")
    fig.suptitle(f"decode step: {meta['device']}, {meta['dtype']}, H={meta['heads']}, D={meta['head_dim']}, "
                 f"T={meta['tokens']}, copy {meta['copy_bytes_per_s'] / 1e12:.2f} TB/s", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "decode_latency.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _best(rows: list[dict], batch: int, impls: tuple[str, ...], key: str, pick=min) -> float:
    values = [r[key] for r in rows if r["B"] == batch and r["impl"] in impls and math.isfinite(r[key])]
    return pick(values) if values else math.nan


def print_table(rows: list[dict], meta: dict, impl_order: list[str]) -> None:
    """The compact summary, printed last so it lands in a short output tail."""
    by_case = {(r["B"], r["impl"]): r for r in rows}
    batches = sorted({r["B"] for r in rows})
    width = max(12, *(len(name) for name in impl_order)) + 1

    def grid(title: str, cell: Callable[[dict, Optional[dict]], str]) -> None:
        print(title)
        print(f"{'B':>5}" + "".join(f"{name:>{width}}" for name in impl_order))
        for batch in batches:
            reference = by_case.get((batch, "ours_graph"))
            cells = []
            for name in impl_order:
                row = by_case.get((batch, name))
                cells.append("-" if row is None else ("err" if row["error"] else cell(row, reference)))
            print(f"{batch:>5}" + "".join(f"{c:>{width}}" for c in cells))

    def latency(row: dict, reference: Optional[dict]) -> str:
        if reference is None or not math.isfinite(reference["step_us"]):
            return f"{row['step_us']:.1f}"
        return f"{row['step_us']:.1f} {row['step_us'] / reference['step_us']:.2f}x"

    def throughput(row: dict, reference: Optional[dict]) -> str:
        return f"{row['kernel_us']:.1f} {row['bytes_per_s'] / 1e9:.0f} {100 * row['copy_fraction']:.0f}%"

    print()
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['dtype']} "
          f"H{meta['heads']} D{meta['head_dim']} T{meta['tokens']} | copy {meta['copy_bytes_per_s'] / 1e12:.2f} TB/s")
    print("packages: " + ", ".join(f"{name} {version}" for name, version in meta["packages"].items()))
    for name, reason in meta["unavailable"].items():
        print(f"unavailable: {name}: {reason}")
    grid("step us (back-to-back, launch included) and x ours_graph (>1: slower)", latency)
    grid("kernel us (cold L2), GB/s, % of copy", throughput)
    errors = []
    for name in impl_order:
        mine = [r for r in rows if r["impl"] == name and math.isfinite(r["err_out_vs_torch_step"])]
        if mine:
            errors.append(f"{name} {max(r['err_out_vs_torch_step'] for r in mine):.0e}/"
                          f"{max(r['err_state_vs_torch_step'] for r in mine):.0e}")
    print("max rel err vs torch_step over B (output/state): " + ", ".join(errors))
    shown = {}
    for r in rows:
        if r["error"]:
            shown.setdefault((r["impl"], r["error"][:100]), r["B"])
    for (impl, error), batch in list(shown.items())[:6]:
        print(f"error {impl} (first at B={batch}): {error}")
    if batches:
        speedup = (_best(rows, batches[0], ("fla", "fla_graph"), "step_us")
                   / _best(rows, batches[0], ("ours", "ours_graph"), "step_us"))
        fraction = _best(rows, batches[-1], ("ours", "ours_graph"), "copy_fraction", pick=max)
        speedup_text = f"{speedup:.2f}x" if math.isfinite(speedup) else "n/a"
        fraction_text = f"{100 * fraction:.0f}%" if math.isfinite(fraction) else "n/a"
        print(f"targets: B={batches[0]} best fla / best ours step = {speedup_text} (want >= 2x); "
              f"B={batches[-1]} best ours at {fraction_text} of copy (want >= 70%)")


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default=None, help="comma-separated B (default 1,2,4,...,256; 1,2 with --smoke)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {', '.join(IMPLS)}")
    parser.add_argument("--heads", type=int, default=None, help="default 16 (2 with --smoke)")
    parser.add_argument("--head-dim", type=int, default=None, help="Dk = Dv; default 128 (32 with --smoke)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="of q, k, v (the state is float32); default bf16 (fp32 with --smoke)")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny fp32 shapes on CPU with perf_counter timing: checks the runner works")
    parser.add_argument("--out", default=os.path.join("benchmarks", "out", "decode"), help="output folder")
    parser.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up, default 25 (5 with --smoke)")
    parser.add_argument("--rep-ms", type=float, default=None,
                        help="time spent measuring each of step and kernel, default 100 (20 with --smoke)")
    parser.add_argument("--copy-gib", type=float, default=None,
                        help="copy-bandwidth buffer (default 2; 1/16 with --smoke)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        args.batch_list = [int(b) for b in (args.batches or ("1,2" if args.smoke else "1,2,4,8,16,32,64,128,256"))
                           .split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not args.batch_list or min(args.batch_list) < 1:
        parser.error("--batches needs at least one B >= 1")
    args.impl_names = [i.strip() for i in args.impls.split(",") if i.strip()]
    for name in args.impl_names:
        if name not in IMPLS:
            parser.error(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}")
    args.heads = args.heads or (2 if args.smoke else 16)
    args.head_dim = args.head_dim or (32 if args.smoke else 128)
    apply_common_defaults(args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args)
    if device is None:
        return 2
    dtype = DTYPES[args.dtype]

    impls, unavailable, versions = load_impls(args.impl_names, device)
    for name, reason in unavailable.items():
        print(f"unavailable: {name}: {reason}", flush=True)
    names = [n for n in args.impl_names if n not in unavailable]
    timer = Timer(device, args.warmup_ms, args.rep_ms)
    copy_bytes = int(args.copy_gib * GIB)
    copy_bytes_per_s = copy_bandwidth(timer, device, copy_bytes)
    _free(device)
    print(f"copy bandwidth ({copy_bytes / GIB:g} GiB, read + write): {copy_bytes_per_s / 1e12:.3f} TB/s; "
          f"{len(args.batch_list)} batch sizes x {len(names)} implementations; kernel timing: {timer.method}",
          flush=True)

    progress = Progress(len(args.batch_list) * len(names))
    rows = []
    with torch.no_grad():
        for batch in args.batch_list:
            try:
                rows += run_batch(batch, names, impls, args, timer, device, dtype, copy_bytes_per_s, progress)
            except Exception as exc:  # the inputs or the reference step themselves failed
                print(f"  B={batch}: {_one_line(exc)}", flush=True)
                _free(device)

    meta = metadata(args, device, dtype, timer, copy_bytes_per_s, copy_bytes, unavailable, versions)
    paths = write_results(rows, meta, args.out)
    paths += write_plot(rows, meta, args.out, names)
    print("wrote " + ", ".join(paths), flush=True)
    print_table(rows, meta, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
