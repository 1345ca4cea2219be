"""Time one decode step (T = 1 token against a carried float32 state) for B = 1 ... 256.

Implementations (``--impls``):
  ours                lightning_op.attn_step, eager: one Triton launch, state updated in place
  ours_graph          the same step captured in a torch.cuda.CUDAGraph; each replay is one step
  ours_graph16        16 consecutive steps captured in one graph, each step carrying on from the
                      state the one before left (here: the same tensor, updated in place)
  fla                 fla-core ``fused_recurrent_simple_gla`` (g_gamma = -decay, initial_state,
                      output_final_state=True), native [B, T, H, D]; returns a new state each step
  fla_graph           the same captured; replays recompute one step from the captured state (a decode
                      loop would also copy the new state back, or alternate two graphs)
  fla_graph16         16 steps in one graph, step i+1 fed the new state tensor step i returned; each
                      replay recomputes the 16 steps from the captured initial state
  torch_step          plain PyTorch: state.mul_(lam), state.baddbmm_(k^T, v), o = scale * q @ state
  torch_step_graph    the same captured
  torch_step_graph16  16 chained steps in one graph (in place, as ours_graph16)
  ours_pooled         lightning_op.attn_step on a pool of 2B states, row b continuing slot
                      state_indices[b] (a random permutation of B of the 2B slots, int32): the
                      serving form; the same state values as ours, so the same outputs
  ours_pooled_graph, ours_pooled_graph16  captured as ours_graph, ours_graph16
  ours_gqa            grouped heads with shared states: k, v with --kv-heads heads (the first head
                      of each group of ours' inputs), decay and state per kv head, one state read
                      and written per group; checked against torch_step on k, v, decay and state
                      repeated over the groups. Fewer bytes per step than the others (its own
                      step_bytes)
  ours_gqa_graph, ours_gqa_graph16  captured as ours_graph, ours_graph16

A one-step replay mostly measures the graph launch (a few us), not the step; in a real decode loop
the whole model's step is one graph, so the *_graph16 impls show the GPU time a step costs inside a
graph. All 16 steps reuse the same q, k, v token; their figures are per step (a replay's time / 16).

Two times per case, both per step:
  step    median per call over blocks of back-to-back calls timed with CUDA events: the latency a
          decode loop sees, launch overhead included (the state stays in L2 where it fits)
  kernel  triton.testing.do_bench median with L2 flushed before each call: GPU time from a cold
          cache, which the bandwidth figures use (a launch overhead shorter than the flush hides);
          for *_graph16 the flush precedes each replay only, so steps 2 to 16 find the state in L2
          where it fits (small B) and their bandwidth can pass what DRAM gives
Bytes per step: the float32 state read and written plus q, k, v read and o written.

  python3 benchmarks/bench_decode.py                          # B = 1 ... 256, H 16, D 128, bf16
  python3 benchmarks/bench_decode.py --batches 1,256 --impls ours_graph,fla_graph
  python3 benchmarks/bench_decode.py --impls ours,ours_pooled,ours_graph,ours_pooled_graph,ours_graph16,ours_pooled_graph16
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
from common import (Progress, Timer, add_common_arguments, apply_common_defaults, common_metadata, free, impl_names,
                    load_each, measure_copy, one_line, print_peers, print_unavailable, pyplot, start_run,
                    write_results)

IMPLS = ("ours", "ours_graph", "ours_graph16", "fla", "fla_graph", "fla_graph16",
         "torch_step", "torch_step_graph", "torch_step_graph16",
         "ours_pooled", "ours_pooled_graph", "ours_pooled_graph16", "ours_gqa", "ours_gqa_graph", "ours_gqa_graph16")
# impl-name suffix -> steps captured in one CUDA graph (one replay runs them all)
GRAPH_SUFFIXES = {"_graph16": 16, "_graph": 1}
TOKENS = 1  # one decode step
BTHD_OUTPUT = ("fla",)


# ----------------------------------------------------------------------------- implementations


def split_impl(name: str) -> tuple[str, str, int]:
    """Implementation name -> (base implementation, kind "eager" or "graph", steps per call):
    "fla_graph16" -> ("fla", "graph", 16), "ours_graph" -> ("ours", "graph", 1), "ours" -> ("ours", "eager", 1)."""
    for suffix, steps in GRAPH_SUFFIXES.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), "graph", steps
    return name, "eager", 1


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


LOADERS = {"ours": (_load_ours, "lightning_op"), "ours_pooled": (_load_ours, "lightning_op"),
           "ours_gqa": (_load_ours, "lightning_op"), "fla": (_load_fla, "fla-core"),
           "torch_step": (_load_torch_step, None)}


def load_impls(names: list[str], device: torch.device):
    """(base name -> loaded function, unavailable impl -> reason, package versions). Graph impls
    are unavailable off CUDA; an impl is unavailable where its base fails to load."""
    no_graphs = device.type != "cuda"
    bases = dict.fromkeys(base for base, kind, _ in map(split_impl, names) if not (kind == "graph" and no_graphs))
    loaded, failed, versions = load_each({base: LOADERS[base] for base in bases})
    unavailable = {}
    for name in names:
        base, kind, _ = split_impl(name)
        if kind == "graph" and no_graphs:
            unavailable[name] = "CUDA graphs need a CUDA device"
        elif base in failed:
            unavailable[name] = failed[base]
    return loaded, unavailable, versions


@dataclass
class Inputs:
    bhtd: tuple[Tensor, Tensor, Tensor]  # contiguous [B, H, T, D]: ours, torch_step
    bthd: tuple[Tensor, Tensor, Tensor]  # the same values, contiguous [B, T, H, D]: fla
    decay: Tensor  # float32 [H]
    scale: float
    initial_state: Tensor  # float32 [B, H, Dk, Dv]
    pool: Tensor  # float32 [2B, H, Dk, Dv]: initial_state's rows at slots, the other slots random
    slots: Tensor  # int32 [B]: the pool's slot of each row
    kv: tuple[Tensor, Tensor]  # contiguous [B, Hkv, T, D]: the first head of each group of k, v
    decay_kv: Tensor  # float32 [Hkv]
    state_kv: Tensor  # float32 [B, Hkv, Dk, Dv]

    def step_bytes(self, base: str) -> int:
        """States read and written, q, k, v read, o written: the least traffic of one step."""
        q = self.bhtd[0]
        if base == "ours_gqa":
            return 2 * self.state_kv.nbytes + 2 * q.nbytes + 2 * self.kv[0].nbytes
        return 2 * self.initial_state.nbytes + 4 * q.nbytes

    def start_state(self, base: str) -> Tensor:
        """The tensor a case's steps update (cloned by the case)."""
        return {"ours_pooled": self.pool, "ours_gqa": self.state_kv}.get(base, self.initial_state)


def make_inputs(batch: int, heads: int, kv_heads: int, head_dim: int, dtype, device, scale: float,
                seed: int) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    size = (batch, TOKENS, heads, head_dim)
    bthd = tuple(torch.randn(size, generator=gen, device=device, dtype=dtype) for _ in range(3))
    bhtd = tuple(x.transpose(1, 2).contiguous() for x in bthd)
    state = torch.randn(batch, heads, head_dim, head_dim, generator=gen, device=device, dtype=torch.float32)
    slots = torch.randperm(2 * batch, generator=gen, device=device)[:batch].to(torch.int32)
    pool = torch.randn(2 * batch, heads, head_dim, head_dim, generator=gen, device=device, dtype=torch.float32)
    pool[slots.long()] = state
    group = heads // kv_heads
    kv = tuple(x[:, ::group].contiguous() for x in bhtd[1:])
    return Inputs(bhtd, bthd, lightning_op.slopes(heads).to(device), scale, state, pool, slots, kv,
                  lightning_op.slopes(kv_heads).to(device), state[:, ::group].contiguous())


def stepper(base: str, fn: Callable, x: Inputs) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """state -> (output, state after the step): one decode step. The output is [B, H, T, Dv], or
    [B, T, H, Dv] for implementations in ``BTHD_OUTPUT`` (not transposed here, to time fla as called)."""
    if base == "ours":
        q, k, v = x.bhtd
        return lambda state: (fn(q, k, v, state, x.decay, scale=x.scale), state)
    if base == "ours_pooled":
        q, k, v = x.bhtd
        return lambda pool: (fn(q, k, v, pool, x.decay, scale=x.scale, state_indices=x.slots), pool)
    if base == "ours_gqa":
        q, k, v = x.bhtd[0], *x.kv
        return lambda state: (fn(q, k, v, state, x.decay_kv, scale=x.scale), state)
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


def run_steps(step_fn: Callable, state: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """``steps`` consecutive decode steps from ``state``, each started from the state the one
    before returned (the same tensor for in-place steps, a new one for fla): (last output, final state)."""
    out = None
    for _ in range(steps):
        out, state = step_fn(state)
    return out, state


@dataclass
class Case:
    step: Callable[[], None]  # one call: ``steps`` decode steps; advances the case's state
    last: Callable[[], tuple[Tensor, Tensor]]  # (output, state) of the latest step
    steps: int = 1  # decode steps per call of ``step``: timings are divided by it
    keep: tuple = ()  # tensors a captured graph reads but does not own (its initial state)


def eager_case(step_fn: Callable, initial_state: Tensor) -> Case:
    box = {"state": initial_state.clone(), "last": None}

    def step() -> None:
        box["last"] = step_fn(box["state"])
        box["state"] = box["last"][1]  # fla hands back a new tensor; the others the same one

    return Case(step, lambda: box["last"])


def graph_case(step_fn: Callable, initial_state: Tensor, steps: int = 1) -> Case:
    """``steps`` chained steps captured in one CUDA graph: each replay runs them all, starting from
    the captured state tensor (which in-place steps carry on across replays; fla only reads it)."""
    state = initial_state.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, autotune and warm the allocator outside the capture
        for _ in range(3):
            run_steps(step_fn, state, steps)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run_steps(step_fn, state, steps)  # fla: the intermediate states live in the graph's pool
    state.copy_(initial_state)  # the warm-up steps moved it on
    # fla's outputs do not include the state it reads: keep that alive while the graph is replayed
    return Case(graph.replay, lambda: outputs, steps, keep=(state,))


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


def run_batch(batch: int, names: list[str], impls: dict[str, Callable], args, timer: Timer, device, dtype,
              copy_bytes_per_s: float, progress: Progress) -> list[dict]:
    x = make_inputs(batch, args.heads, args.kv_heads, args.head_dim, dtype, device, args.scale, args.seed)
    references: dict[tuple[int, bool], tuple[Tensor, Tensor]] = {}

    def reference(steps: int, grouped: bool = False) -> tuple[Tensor, Tensor]:
        """(last output, final state) of torch_step run ``steps`` steps from the initial state,
        computed on first use and kept for the batch; ``grouped``: ours_gqa's problem, k, v,
        decay and state repeated over the groups, the state returned per kv head."""
        if (steps, grouped) not in references:
            if grouped:
                group = args.heads // args.kv_heads
                q, (k, v) = x.bhtd[0], (y.repeat_interleave(group, 1) for y in x.kv)
                lam = torch.exp(-x.decay_kv).repeat_interleave(group).view(1, -1, 1, 1)
                out, state = run_steps(lambda s: (torch_step(q, k, v, s, lam, x.scale), s),
                                       x.state_kv.repeat_interleave(group, 1), steps)
                references[steps, grouped] = out, state[:, ::group]
            else:
                references[steps, grouped] = run_steps(stepper("torch_step", torch_step, x), x.initial_state.clone(),
                                                       steps)
        return references[steps, grouped]

    reference(1)  # a batch whose reference step fails is skipped whole
    rows = []
    for name in names:
        base, kind, steps = split_impl(name)
        row = {
            "B": batch, "H": args.heads, "D": args.head_dim, "T": TOKENS, "steps_per_call": steps,
            "dtype": str(dtype).removeprefix("torch."), "impl": name,
            "step_us": math.nan, "kernel_us": math.nan, "step_bytes": x.step_bytes(base),
            "bytes_per_s": math.nan, "copy_fraction": math.nan,
            "err_out_vs_torch_step": math.nan, "err_state_vs_torch_step": math.nan, "error": "",
        }
        rows.append(row)
        case = None
        try:
            step_fn = stepper(base, impls[base], x)
            if kind == "graph":
                case = graph_case(step_fn, x.start_state(base), steps)
            else:
                case = eager_case(step_fn, x.start_state(base))
            case.step()  # the first call: case.steps steps from the initial state
            out, state = case.last()
            if base in BTHD_OUTPUT:
                out = out.transpose(1, 2)
            if base == "ours_pooled":
                state = state.index_select(0, x.slots.long())  # the rows' slots of the pool
            reference_out, reference_state = reference(case.steps, base == "ours_gqa")
            row["err_out_vs_torch_step"] = max_relative_error(out, reference_out)
            row["err_state_vs_torch_step"] = max_relative_error(state, reference_state)
            row["step_us"] = 1e3 * step_ms(case.step, device, args.rep_ms) / case.steps
            row["kernel_us"] = 1e3 * timer(case.step) / case.steps
            row["bytes_per_s"] = row["step_bytes"] / (row["kernel_us"] * 1e-6)
            row["copy_fraction"] = row["bytes_per_s"] / copy_bytes_per_s
            progress.line(f"{name:<18} B={batch:<4}", (
                f"step {row['step_us']:9.1f} us  kernel {row['kernel_us']:9.1f} us  "
                f"{row['bytes_per_s'] / 1e9:7.0f} GB/s {100 * row['copy_fraction']:4.0f}% of copy  "
                f"err out {row['err_out_vs_torch_step']:.0e} state {row['err_state_vs_torch_step']:.0e}"))
        except Exception as exc:  # a failed capture, out of memory, a peer's error: note it and go on
            row["error"] = one_line(exc)
            progress.line(f"{name:<18} B={batch:<4}", row["error"])
        finally:
            case = None
            free(device)
    return rows


# ----------------------------------------------------------------------------- outputs


def metadata(args, device, dtype, timer: Timer, copy_bytes_per_s, copy_bytes, unavailable, versions) -> dict:
    return {
        **common_metadata(args, device, dtype, copy_bytes, copy_bytes_per_s, unavailable, versions),
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "tokens": TOKENS,
        "step_timing": ("CUDA events around blocks of back-to-back calls, median per call" if device.type == "cuda"
                        else "time.perf_counter around blocks of back-to-back calls, median per call"),
        "kernel_timing": timer.method,
        "notes": [
            "steps_per_call: decode steps per timed call (1 eager and *_graph, 16 for *_graph16: one replay "
            "of a graph of 16 chained steps on the same q, k, v); step_us and kernel_us are per step "
            "(time per call / steps_per_call)",
            "step_us: steady-state time per step of back-to-back calls, launch overhead included "
            "(for *_graph16 one graph launch is shared by 16 steps)",
            "kernel_us: do_bench median with L2 flushed before each call (GPU time from a cold cache); "
            "for *_graph16 the flush precedes each replay only, so steps 2-16 find the state in L2 where it fits",
            "step_bytes = float32 state read + written, q, k, v read, o written, per step; "
            "bytes_per_s = step_bytes / kernel time per step; copy_fraction = that / copy bandwidth (read + write)",
            "err_*_vs_torch_step: max |x - ref| / max |ref| of the last output and the final state after the "
            "first call (steps_per_call steps) from the same initial state, ref = torch_step run as many steps",
            "ours_pooled: a pool of 2B states, rows continuing a random permutation of B slots (int32 indices); "
            "ours_gqa: kv_heads heads of k, v, decay and state (shared by each group of query heads), its "
            "step_bytes its own",
            "fla_graph replays one step from the captured state (no copy back of the new state); fla_graph16 "
            "feeds each step's new state to the next inside the graph and replays the 16 steps from the captured "
            "state; ours and torch_step graphs update one state in place, carried on across replays",
        ],
    }


def write_plot(rows: list[dict], meta: dict, out_dir: str, impl_order: list[str]) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    fig, (latency, bandwidth) = plt.subplots(1, 2, figsize=(12, 4.8))
    batches = sorted({r["B"] for r in rows})
    for impl in impl_order:
        mine = sorted((r["B"], r["step_us"], r["copy_fraction"]) for r in rows if r["impl"] == impl)
        steps = [(b, us) for b, us, _ in mine if math.isfinite(us)]
        fractions = [(b, 100 * f) for b, _, f in mine if math.isfinite(f)]
        _, kind, graph_steps = split_impl(impl)
        linestyle = "-" if kind == "eager" else "--" if graph_steps == 1 else ":"
        style = {"marker": "o", "linestyle": linestyle, "label": impl}
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
    latency.set_ylabel("us per step, back-to-back calls (dotted: 16 steps per graph)")
    bandwidth.set_ylabel("% of copy bandwidth (kernel time per step)")
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

    def grid(title: str, cell: Callable[[dict, Optional[dict]], str]) -> None:
        lines = []
        for batch in batches:
            cells = []
            for name in impl_order:
                row = by_case.get((batch, name))
                # 16-step graphs against ours_graph16, the rest against ours_graph
                reference = by_case.get((batch, "ours_graph16" if split_impl(name)[2] == 16 else "ours_graph"))
                cells.append("-" if row is None else ("err" if row["error"] else cell(row, reference)))
            lines.append((batch, cells))
        widths = [2 + max([len(name)] + [len(cells[i]) for _, cells in lines]) for i, name in enumerate(impl_order)]
        print(title)
        print(f"{'B':>5}" + "".join(f"{name:>{width}}" for name, width in zip(impl_order, widths)))
        for batch, cells in lines:
            print(f"{batch:>5}" + "".join(f"{c:>{width}}" for c, width in zip(cells, widths)))

    def latency(row: dict, reference: Optional[dict]) -> str:
        if reference is None or not math.isfinite(reference["step_us"]):
            return f"{row['step_us']:.1f}"
        return f"{row['step_us']:.1f} {row['step_us'] / reference['step_us']:.2f}x"

    def throughput(row: dict, reference: Optional[dict]) -> str:
        return f"{row['kernel_us']:.1f} {row['bytes_per_s'] / 1e9:.0f} {100 * row['copy_fraction']:.0f}%"

    print()
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['dtype']} "
          f"H{meta['heads']} D{meta['head_dim']} T{meta['tokens']} | copy {meta['copy_bytes_per_s'] / 1e12:.2f} TB/s")
    print_peers(meta)
    grid("step us per step (back-to-back, launch included) and x ours_graph, *_graph16 x ours_graph16 "
         "(>1: slower)", latency)
    grid("kernel us per step (cold L2 before each call), GB/s, % of copy", throughput)
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
        def speedup_text(fla: tuple[str, ...], ours: tuple[str, ...]) -> str:
            speedup = _best(rows, batches[0], fla, "step_us") / _best(rows, batches[0], ours, "step_us")
            return f"{speedup:.2f}x" if math.isfinite(speedup) else "n/a"

        ours_impls = tuple(name for name in IMPLS if split_impl(name)[0] == "ours")
        fraction = _best(rows, batches[-1], ours_impls, "copy_fraction", pick=max)
        fraction_text = "n/a"
        if math.isfinite(fraction):
            best = next(r["impl"] for r in rows
                        if r["B"] == batches[-1] and r["impl"] in ours_impls and r["copy_fraction"] == fraction)
            fraction_text = f"{100 * fraction:.0f}% ({best})"
        print(f"targets: B={batches[0]} fla / ours step: one step per replay "
              f"{speedup_text(('fla', 'fla_graph'), ('ours', 'ours_graph'))} (best of eager, graph), "
              f"16 steps per graph {speedup_text(('fla_graph16',), ('ours_graph16',))} (want >= 2x); "
              f"B={batches[-1]} best ours at {fraction_text} of copy (want >= 70%); "
              f"pooled / dense {pooled_text(rows, batches)} (want <= 1.05); B={batches[0]} pooled one-step "
              f"graph {_best(rows, batches[0], ('ours_pooled_graph',), 'step_us'):.1f} us (want <= 5)")


def pooled_text(rows: list[dict], batches: list[int]) -> str:
    """The worst pooled / dense ratio over B: kernel times of the 16-step graphs where they ran,
    else of the eager steps."""
    for pooled, dense in (("ours_pooled_graph16", "ours_graph16"), ("ours_pooled", "ours")):
        ratios = [_best(rows, b, (pooled,), "kernel_us") / _best(rows, b, (dense,), "kernel_us") for b in batches]
        ratios = [(r, b) for r, b in zip(ratios, batches) if math.isfinite(r)]
        if ratios:
            worst, batch = max(ratios)
            return f"{worst:.2f}x at B={batch} ({pooled} kernel)"
    return "n/a"


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default=None, help="comma-separated B (default 1,2,4,...,256; 1,2 with --smoke)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {', '.join(IMPLS)}")
    parser.add_argument("--heads", type=int, default=None, help="default 16 (2 with --smoke)")
    parser.add_argument("--head-dim", type=int, default=None, help="Dk = Dv; default 128 (32 with --smoke)")
    parser.add_argument("--kv-heads", type=int, default=None, help="kv heads of ours_gqa; default heads // 4 (1 "
                        "with --smoke)")
    add_common_arguments(parser, out=os.path.join("benchmarks", "out", "decode"),
                         dtype_help="of q, k, v (the state is float32); default bf16 (fp32 with --smoke)",
                         rep_help="time spent measuring each of step and kernel, default 100 (20 with --smoke)")
    args = parser.parse_args(argv)
    try:
        args.batch_list = [int(b) for b in (args.batches or ("1,2" if args.smoke else "1,2,4,8,16,32,64,128,256"))
                           .split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not args.batch_list or min(args.batch_list) < 1:
        parser.error("--batches needs at least one B >= 1")
    args.impl_names = impl_names(parser, args.impls, IMPLS)
    args.heads = args.heads or (2 if args.smoke else 16)
    args.head_dim = args.head_dim or (32 if args.smoke else 128)
    args.kv_heads = args.kv_heads or max(1, args.heads // (2 if args.smoke else 4))
    if args.heads % args.kv_heads:
        parser.error(f"--kv-heads must divide --heads ({args.heads}), got {args.kv_heads}")
    apply_common_defaults(args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run = start_run(args)
    if run is None:
        return 2
    device, dtype, timer = run

    impls, unavailable, versions = load_impls(args.impl_names, device)
    print_unavailable(unavailable)
    names = [n for n in args.impl_names if n not in unavailable]
    copy_bytes, copy_bytes_per_s = measure_copy(
        timer, device, args.copy_gib,
        f"{len(args.batch_list)} batch sizes x {len(names)} implementations; kernel timing: {timer.method}")

    progress = Progress(len(args.batch_list) * len(names))
    rows = []
    with torch.no_grad():
        for batch in args.batch_list:
            try:
                rows += run_batch(batch, names, impls, args, timer, device, dtype, copy_bytes_per_s, progress)
            except Exception as exc:  # the inputs or the reference step themselves failed
                print(f"  B={batch}: {one_line(exc)}", flush=True)
                free(device)

    meta = metadata(args, device, dtype, timer, copy_bytes_per_s, copy_bytes, unavailable, versions)
    paths = write_results(rows, meta, args.out)
    paths += write_plot(rows, meta, args.out, names)
    print("wrote " + ", ".join(paths), flush=True)
    print_table(rows, meta, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
