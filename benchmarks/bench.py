"""Time lightning_op against its peers, forward and forward+backward, in one process.

Implementations (``--impls``):
  ours             lightning_op.lightning_attn on contiguous [B, H, N, D] inputs
  ours_bnhd        the same op on [B, N, H, D] tensors passed as ``x.transpose(1, 2)``
  fla              fla-core ``chunk_simple_gla`` (g_gamma = -decay), native [B, N, H, D]
  lightning_attn2  lightning-attn ``lightning_attn2`` ([B, H, N, D], s = decay as [H, 1, 1])
  sdpa_flash       causal softmax attention, PyTorch SDPA restricted to the flash backend
  naive            the quadratic form ((q @ k^T) * M) @ v with M[h, i, j] = exp(-decay[h] (i - j)),
                   i >= j; skipped where the B*H*N*N scores would pass --naive-max-gib

Peers whose import fails are recorded as unavailable; a case that raises (out of memory, an
unsupported head dim) is recorded with its error and the run goes on.

  python3 benchmarks/bench.py                          # presets main, d64, d256, long on CUDA
  python3 benchmarks/bench.py --quick                  # main shape at N = 8K, ours and fla
  python benchmarks/bench.py --smoke --out /tmp/smoke  # tiny fp32 shapes on CPU (checks the runner)
  python3 benchmarks/bench.py --autotune ...           # ours autotuned (tuned in each class's first call)

Writes results.csv, results.json and PNG plots under --out, and prints a table last.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import lightning_op
from common import (GIB, Progress, Timer, add_common_arguments, apply_common_defaults, clear_grads, common_metadata,
                    free, impl_names, load_each, measure_copy, one_line, print_peers, print_unavailable, pyplot,
                    start_run, write_results)

IMPLS = ("ours", "ours_bnhd", "fla", "lightning_attn2", "sdpa_flash", "naive")


# ----------------------------------------------------------------------------- shapes


@dataclass
class Shape:
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    presets: list[str] = field(default_factory=list)
    # Shapes of one N sweep (same H and D) share the tokens/s and memory plots.
    sweep: bool = False

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def label(self) -> str:
        return f"B{self.batch} N{_short(self.seq_len)} H{self.heads} D{self.head_dim}"


def _short(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def preset_shapes(name: str) -> list[Shape]:
    if name == "main":
        # 64K tokens per step at every N; N = 128K cannot be split, so it runs 128K tokens (B = 1).
        return [Shape(max(1, 65536 // n), n, 16, 128, sweep=True) for n in (2**i * 1024 for i in range(8))]
    if name == "main-short":  # main split in two, for two GPUs
        return [s for s in preset_shapes("main") if s.seq_len <= 8192]
    if name == "main-long":
        return [s for s in preset_shapes("main") if s.seq_len > 8192]
    if name == "d64":
        return [Shape(8, 8192, 16, 64)]
    if name == "d256":
        # 64K tokens as in main; q, k, v, o take 512 MiB each in bf16.
        return [Shape(8, 8192, 16, 256)]
    if name == "long":
        return [Shape(1, n, 16, 128, sweep=True) for n in (65536, 131072)]
    if name == "quick":
        return [Shape(8, 8192, 16, 128, sweep=True)]
    if name == "smoke":
        return [Shape(1, n, 2, 32, sweep=True) for n in (128, 256)]
    raise ValueError(f"unknown preset {name!r}; choose from main, main-short, main-long, d64, d256, long, quick, smoke")


def select_shapes(presets: list[str]) -> list[Shape]:
    """Shapes of the presets in order; a shape in several presets runs once, tagged with all."""
    by_key: dict[tuple, Shape] = {}
    for preset in presets:
        for shape in preset_shapes(preset):
            key = (shape.batch, shape.seq_len, shape.heads, shape.head_dim)
            kept = by_key.setdefault(key, shape)
            kept.presets.append(preset)
            kept.sweep = kept.sweep or shape.sweep
    return list(by_key.values())


# ----------------------------------------------------------------------------- implementations


@dataclass
class Inputs:
    """One set of values in both layouts, as separate leaves so each layout gets its own grads."""

    bhnd: tuple[Tensor, Tensor, Tensor]  # contiguous [B, H, N, D]
    bnhd: tuple[Tensor, Tensor, Tensor]  # contiguous [B, N, H, D]
    decay: Tensor  # float32 [H]
    scale: float


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, scale: float, seed: int) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    size = (shape.batch, shape.seq_len, shape.heads, shape.head_dim)
    bnhd = tuple(torch.randn(size, generator=gen, device=device, dtype=dtype) for _ in range(3))
    bhnd = tuple(x.transpose(1, 2).contiguous().requires_grad_() for x in bnhd)
    for x in bnhd:
        x.requires_grad_()
    decay = lightning_op.slopes(shape.heads).to(device)
    return Inputs(bhnd, bnhd, decay, scale)


def _load_ours():
    return lightning_op.lightning_attn


def _load_fla():
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla


def _load_lightning_attn2():
    from lightning_attn.ops import lightning_attn2

    return lightning_attn2


def _load_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return sdpa_flash


def _load_naive():
    return _naive


def _naive(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    out = ((q @ k.transpose(-2, -1)) * mask) @ v
    return out if scale == 1.0 else out * scale


def naive_mask(decay: Tensor, seq_len: int, dtype: torch.dtype) -> Tensor:
    """M[h, i, j] = exp(-decay[h] * (i - j)) for i >= j, else 0: the decay a key j carries to query i."""
    pos = torch.arange(seq_len, device=decay.device, dtype=torch.float32)
    distance = pos[:, None] - pos[None, :]
    mask = torch.exp(-decay[:, None, None] * distance.clamp(min=0))
    return mask.masked_fill_(distance < 0, 0.0).to(dtype)


@dataclass
class Impl:
    load: Callable[[], Callable]
    # Computes lightning attention (so its output is compared with ours); sdpa_flash is softmax.
    same_function: bool
    # Python package whose version goes into the metadata.
    package: Optional[str] = None


IMPL_SPECS = {
    "ours": Impl(_load_ours, True, "lightning_op"),
    "ours_bnhd": Impl(_load_ours, True, "lightning_op"),
    "fla": Impl(_load_fla, True, "fla-core"),
    "lightning_attn2": Impl(_load_lightning_attn2, True, "lightning-attn"),
    "sdpa_flash": Impl(_load_sdpa, False),
    "naive": Impl(_load_naive, True),
}


class SkipCase(Exception):
    """The implementation does not apply to this shape (not a failure)."""


def build_case(name: str, fn: Callable, x: Inputs, args) -> tuple[Callable[[], Tensor], list[Tensor]]:
    """A zero-argument forward returning the output as a [B, H, N, Dv] tensor (a view where the
    implementation's layout is [B, N, H, D]), and the leaves whose grads backward fills.

    Raises ``SkipCase`` where the implementation does not apply to this shape.
    """
    q, k, v = x.bhnd
    qn, kn, vn = x.bnhd
    if name == "ours":
        return (lambda: fn(q, k, v, x.decay, scale=x.scale)), list(x.bhnd)
    if name == "ours_bnhd":
        qt, kt, vt = qn.transpose(1, 2), kn.transpose(1, 2), vn.transpose(1, 2)
        return (lambda: fn(qt, kt, vt, x.decay, scale=x.scale)), list(x.bnhd)
    if name == "fla":
        g_gamma = -x.decay  # fla takes the log of the per-step decay lam = exp(-decay)
        return (lambda: fn(qn, kn, vn, g_gamma=g_gamma, scale=x.scale)[0].transpose(1, 2)), list(x.bnhd)
    if name == "lightning_attn2":
        if x.scale != 1.0:
            raise SkipCase("lightning_attn2 has no scale argument")
        s = x.decay.view(-1, 1, 1).contiguous()
        return (lambda: fn(q, k, v, s)), list(x.bhnd)
    if name == "sdpa_flash":
        return (lambda: fn(q, k, v)), list(x.bhnd)
    if name == "naive":
        b, h, n, _ = q.shape
        needed = b * h * n * n * q.element_size()  # the scores q @ k^T
        if needed > args.naive_max_gib * GIB:
            raise SkipCase(f"scores need {needed / GIB:.0f} GiB > --naive-max-gib {args.naive_max_gib:g}")
        mask = naive_mask(x.decay, n, q.dtype)
        return (lambda: fn(q, k, v, mask, x.scale)), list(x.bhnd)
    raise ValueError(f"unknown implementation {name!r}")


def load_impls(names: list[str]) -> tuple[dict[str, Callable], dict[str, str], dict[str, str]]:
    """(loaded functions, unavailable name -> reason, package versions)."""
    return load_each({name: (IMPL_SPECS[name].load, IMPL_SPECS[name].package) for name in names})


# ----------------------------------------------------------------------------- memory


def peak_extra_gib(fn: Callable, device: torch.device) -> float:
    """Peak memory allocated while ``fn()`` runs, above what was allocated before (GiB).
    Includes what ``fn`` leaves allocated (outputs, grads). NaN off CUDA."""
    if device.type != "cuda":
        return math.nan
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    del result
    return (torch.cuda.max_memory_allocated() - before) / GIB


# ----------------------------------------------------------------------------- the run


def relative_error(out: Tensor, ref: Tensor) -> float:
    ref = ref.float()
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def progress_line(progress: Progress, impl: str, mode: str, shape: Shape, result: str) -> None:
    progress.line(f"{impl:<15} {mode:<7} {shape.label:<20}", result)


def run_shape(shape: Shape, impls: dict[str, Callable], args, timer: Timer, device, dtype,
              copy_bytes_per_s: float, progress: Progress) -> list[dict]:
    x = make_inputs(shape, dtype, device, args.scale, args.seed)
    with torch.no_grad():
        try:
            reference = lightning_op.lightning_attn(*x.bhnd, x.decay, scale=x.scale)
        except Exception as exc:
            reference = None
            print(f"  ours failed on {shape.label}, no error comparison: {one_line(exc)}", flush=True)
    element_bytes = x.bhnd[0].element_size()
    # Forward traffic at its minimum: read q, k, v once and write o once.
    fwd_bytes = 4 * shape.tokens * shape.heads * shape.head_dim * element_bytes
    rows = []
    for name, fn in impls.items():
        row = {
            "shape": shape.label, "presets": "+".join(shape.presets), "sweep": shape.sweep,
            "B": shape.batch, "N": shape.seq_len, "H": shape.heads, "D": shape.head_dim,
            "tokens": shape.tokens, "dtype": str(dtype).removeprefix("torch."), "impl": name,
            "fwd_ms": math.nan, "fwdbwd_ms": math.nan, "fwd_tokens_per_s": math.nan,
            "fwdbwd_tokens_per_s": math.nan, "fwd_mem_gib": math.nan, "fwdbwd_mem_gib": math.nan,
            "fwd_bytes": fwd_bytes, "fwd_bytes_per_s": math.nan, "fwd_copy_fraction": math.nan,
            "rel_err_vs_ours": math.nan, "fwd_error": "", "fwdbwd_error": "",
        }
        rows.append(row)
        try:
            forward, leaves = build_case(name, fn, x, args)
        except Exception as exc:  # SkipCase, or the setup itself failed (the naive mask may not fit)
            row["fwd_error"] = row["fwdbwd_error"] = (
                f"skipped: {exc}" if isinstance(exc, SkipCase) else one_line(exc))
            progress_line(progress, name, "fwd", shape, row["fwd_error"])
            progress_line(progress, name, "fwd+bwd", shape, row["fwd_error"])
            free(device)
            continue
        out = None
        try:
            with torch.no_grad():
                out = forward()
                if reference is not None and IMPL_SPECS[name].same_function and name != "ours":
                    row["rel_err_vs_ours"] = relative_error(out, reference)
                ms = timer(forward)
                row["fwd_mem_gib"] = peak_extra_gib(forward, device)
            row["fwd_ms"] = ms
            row["fwd_tokens_per_s"] = shape.tokens / (ms * 1e-3)
            row["fwd_bytes_per_s"] = fwd_bytes / (ms * 1e-3)
            row["fwd_copy_fraction"] = row["fwd_bytes_per_s"] / copy_bytes_per_s
            err = "" if math.isnan(row["rel_err_vs_ours"]) else f"  rel_err_vs_ours={row['rel_err_vs_ours']:.1e}"
            progress_line(progress, name, "fwd", shape, f"{ms:9.3f} ms{err}")
        except Exception as exc:
            row["fwd_error"] = one_line(exc)
            progress_line(progress, name, "fwd", shape, row["fwd_error"])
        try:
            if out is None:
                with torch.no_grad():
                    out = forward()
            grad = torch.randn_like(out)  # same strides as the output, as autograd would hand it
            out = None

            def step():
                forward().backward(grad)

            ms = timer(step, grad_to_none=leaves)
            clear_grads(leaves)
            row["fwdbwd_mem_gib"] = peak_extra_gib(step, device)
            row["fwdbwd_ms"] = ms
            row["fwdbwd_tokens_per_s"] = shape.tokens / (ms * 1e-3)
            mem = row["fwdbwd_mem_gib"]
            mem_note = f"  mem={mem:.2f} GiB" if math.isfinite(mem) else ""
            progress_line(progress, name, "fwd+bwd", shape, f"{ms:9.3f} ms{mem_note}")
        except Exception as exc:
            row["fwdbwd_error"] = one_line(exc)
            progress_line(progress, name, "fwd+bwd", shape, row["fwdbwd_error"])
        finally:
            out = grad = forward = step = None
            clear_grads(leaves)
            free(device)
    del x, reference
    free(device)
    return rows


# ----------------------------------------------------------------------------- outputs


def metadata(args, device, dtype, timer, copy_bytes_per_s, copy_bytes, unavailable, versions) -> dict:
    return {
        **common_metadata(args, device, dtype, copy_bytes, copy_bytes_per_s, unavailable, versions),
        "timing": timer.method,
        "autotune": getattr(args, "autotune_cache", None),  # the cache file when ours ran autotuned
        "notes": [
            "ms are medians; tokens_per_s = B*N / time",
            "mem_gib: peak allocated above inputs and grad tensor, includes outputs and grads",
            "fwd_bytes = bytes of q, k, v read + o written; fwd_copy_fraction = achieved / copy bandwidth",
            "rel_err_vs_ours = ||out - ours|| / ||ours|| over the forward output",
        ],
    }


def write_plots(rows: list[dict], meta: dict, out_dir: str, impl_order: list[str]) -> list[str]:
    plt = pyplot()
    sweep = [r for r in rows if r["sweep"]]
    if plt is None or not sweep:
        return []
    tokens_by_n = {r["N"]: r["tokens"] for r in sweep}
    usual_tokens = statistics.mode(tokens_by_n.values())
    exceptions = ", ".join(f"{t} at N={_short(n)}" for n, t in sorted(tokens_by_n.items()) if t != usual_tokens)
    subtitle = (f"{meta['device']}, {meta['dtype']}, H={sweep[0]['H']}, D={sweep[0]['D']}, "
                f"B*N = {usual_tokens} tokens" + (f" ({exceptions})" if exceptions else ""))
    plots = (
        ("fwd_tokens_per_s", "tokens / s, forward", "tokens_per_s_fwd.png"),
        ("fwdbwd_tokens_per_s", "tokens / s, forward + backward", "tokens_per_s_fwdbwd.png"),
        ("fwdbwd_mem_gib", "extra peak memory, forward + backward (GiB)", "memory_fwdbwd.png"),
    )
    paths = []
    for key, ylabel, filename in plots:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        drawn = False
        for impl in impl_order:
            points = sorted((r["N"], r[key]) for r in sweep if r["impl"] == impl and math.isfinite(r[key]))
            if points:
                ax.plot(*zip(*points), marker="o", label=impl)
                drawn = True
        if drawn:
            ns = sorted(tokens_by_n)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [_short(n) for n in ns])
            ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.set_title(subtitle, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data (memory is measured on CUDA only)", ha="center", transform=ax.transAxes)
        fig.tight_layout()
        path = os.path.join(out_dir, filename)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _cell_ms(row: dict, key: str, error_key: str) -> str:
    if math.isfinite(row[key]):
        return f"{row[key]:.3f}"
    error = row[error_key]
    if not error:
        return "-"
    if error.startswith("skipped"):
        return "skip"
    return "OOM" if "out of memory" in error.lower() else "err"


def _ratio(row: dict, ours: Optional[dict], key: str) -> str:
    if ours is None or not (math.isfinite(row[key]) and math.isfinite(ours[key])):
        return "-"
    return f"{row[key] / ours[key]:.2f}"


def print_table(rows: list[dict], meta: dict) -> None:
    """The compact summary, printed last so it lands in a short output tail."""
    print()
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['dtype']} | "
          f"{meta['timing']} | copy {meta['copy_bytes_per_s'] / 1e12:.2f} TB/s")
    print_peers(meta)
    print("x ours = time / ours' time (>1: slower than ours); mem = extra peak GiB fwd+bwd; "
          "bw = fwd (q,k,v,o bytes)/time as % of copy; err = rel. error of output vs ours")
    header = (f"{'shape':<20} {'impl':<15} {'fwd ms':>9} {'x ours':>6} {'f+b ms':>9} {'x ours':>6} "
              f"{'mem':>6} {'bw%':>5} {'err':>7}")
    print(header)
    print("-" * len(header))
    ours_by_shape = {r["shape"]: r for r in rows if r["impl"] == "ours"}
    shown_errors = {}
    for r in rows:
        ours = ours_by_shape.get(r["shape"])
        mem = f"{r['fwdbwd_mem_gib']:.2f}" if math.isfinite(r["fwdbwd_mem_gib"]) else "-"
        bw = f"{100 * r['fwd_copy_fraction']:.0f}" if math.isfinite(r["fwd_copy_fraction"]) else "-"
        err = f"{r['rel_err_vs_ours']:.0e}" if math.isfinite(r["rel_err_vs_ours"]) and r["impl"] != "ours" else ""
        print(f"{r['shape']:<20} {r['impl']:<15} {_cell_ms(r, 'fwd_ms', 'fwd_error'):>9} "
              f"{_ratio(r, ours, 'fwd_ms'):>6} {_cell_ms(r, 'fwdbwd_ms', 'fwdbwd_error'):>9} "
              f"{_ratio(r, ours, 'fwdbwd_ms'):>6} {mem:>6} {bw:>5} {err:>7}")
        for key in ("fwd_error", "fwdbwd_error"):
            if r[key] and not r[key].startswith("skipped"):
                shown_errors.setdefault((r["impl"], r[key][:100]), r["shape"])
    for (impl, error), shape in list(shown_errors.items())[:8]:
        print(f"error {impl} (first at {shape}): {error}")
    for line in flatness_lines(rows):
        print(line)


def flatness_lines(rows: list[dict]) -> list[str]:
    """Per implementation and (H, D), over the N sweep's shapes: the spread of time per token, as
    ``±x%`` about the middle of its range (the performance issue's "flat within ±10%" reads this
    way) and the slowest over the fastest."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("sweep"):
            groups.setdefault((r["impl"], r["H"], r["D"]), []).append(r)
    lines = []
    for (impl, heads, head_dim), group in groups.items():
        parts = []
        for key, label in (("fwd_tokens_per_s", "fwd"), ("fwdbwd_tokens_per_s", "fwd+bwd")):
            # ms per 64K tokens, from the shapes that ran
            per_token = [65536 / r[key] * 1e3 for r in group if math.isfinite(r[key]) and r[key] > 0]
            if len(per_token) >= 2:
                low, high = min(per_token), max(per_token)
                parts.append(f"{label} {low:.3f}-{high:.3f} ms (±{100 * (high - low) / (high + low):.0f}%, "
                             f"{high / low:.2f}x)")
        if parts:
            n_values = sorted(r["N"] for r in group)
            lines.append(f"time per 64K tokens, {impl} H{heads} D{head_dim}, N {_short(n_values[0])}-"
                         f"{_short(n_values[-1])}: " + "; ".join(parts))
    return lines


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None,
                        help="comma-separated presets: main (or main-short + main-long), d64, d256, long, quick, smoke "
                             "(default main,d64,d256,long)")
    parser.add_argument("--impls", default=None, help=f"comma-separated, from {', '.join(IMPLS)} (default all)")
    parser.add_argument("--autotune", action="store_true",
                        help="run ours autotuned (lightning_op.enable_autotune, cache in --out/autotune.json): "
                             "each shape class is tuned in its first call, before its timings")
    parser.add_argument("--quick", action="store_true", help="main shape at N=8K only, ours and fla")
    add_common_arguments(parser, out=os.path.join("benchmarks", "out"), dtype_help="default bf16 (fp32 with --smoke)",
                         rep_help="time spent measuring each case, default 100 (20 with --smoke)")
    parser.add_argument("--naive-max-gib", type=float, default=8.0,
                        help="skip the quadratic form where its B*H*N*N scores would exceed this")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no further shape once this many seconds have passed (the results so far "
                             "are written after every shape, so a run cut off by a time limit keeps them)")
    args = parser.parse_args(argv)
    if args.smoke and args.quick:
        parser.error("--smoke and --quick exclude each other")
    default_preset = "smoke" if args.smoke else "quick" if args.quick else "main,d64,d256,long"
    args.presets = [p.strip() for p in (args.preset or default_preset).split(",") if p.strip()]
    default_impls = "ours,fla" if args.quick else ",".join(IMPLS)
    args.impl_names = impl_names(parser, args.impls or default_impls, IMPLS)
    apply_common_defaults(args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run = start_run(args)
    if run is None:
        return 2
    device, dtype, timer = run
    try:
        shapes = select_shapes(args.presets)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2

    args.autotune_cache = lightning_op.enable_autotune(os.path.join(args.out, "autotune.json")) if args.autotune else None
    impls, unavailable, versions = load_impls(args.impl_names)
    print_unavailable(unavailable)
    copy_bytes, copy_bytes_per_s = measure_copy(
        timer, device, args.copy_gib, f"{len(shapes)} shapes x {len(impls)} implementations; timing: {timer.method}")

    progress = Progress(2 * len(shapes) * len(impls))
    meta = metadata(args, device, dtype, timer, copy_bytes_per_s, copy_bytes, unavailable, versions)
    rows, paths = [], []
    started = time.perf_counter()
    for index, shape in enumerate(shapes):
        try:
            rows += run_shape(shape, impls, args, timer, device, dtype, copy_bytes_per_s, progress)
        except Exception as exc:  # inputs themselves did not fit: note it and go on
            print(f"  {shape.label}: {one_line(exc)}", flush=True)
            free(device)
        paths = write_results(rows, meta, args.out)
        left = shapes[index + 1:]
        if left and args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            print(f"time budget of {args.budget_s:g} s spent: not run {', '.join(s.label for s in left)}", flush=True)
            break

    paths += write_plots(rows, meta, args.out, [n for n in args.impl_names if n in impls])
    print("wrote " + ", ".join(paths), flush=True)
    print_table(rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
