"""What the benchmark scripts beside it share (bench.py and bench_decode.py: all of it): their
common options, the device, loading the peers, timing, the run's environment, and the results
they write.

The scripts import it as a module beside them (``python3 benchmarks/bench.py`` puts this folder
first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import inspect
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch
from torch import Tensor

import lightning_op

GIB = 2**30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- options and device


def add_common_arguments(parser: argparse.ArgumentParser, out: str, dtype_help: str, rep_help: str) -> None:
    """The options both runners take; their defaults depend on ``--smoke`` (``apply_common_defaults``)."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny fp32 shapes on CPU with perf_counter timing: checks the runner works")
    parser.add_argument("--out", default=out, help="output folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=dtype_help)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up, default 25 (5 with --smoke)")
    parser.add_argument("--rep-ms", type=float, default=None, help=rep_help)
    parser.add_argument("--copy-gib", type=float, default=None,
                        help="copy-bandwidth buffer (default 2; 1/16 with --smoke)")
    parser.add_argument("--seed", type=int, default=0)


def impl_names(parser: argparse.ArgumentParser, text: str, known: tuple[str, ...]) -> list[str]:
    """The comma-separated implementation names of ``--impls``; an unknown one is a usage error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in known:
            parser.error(f"unknown implementation {name!r}; choose from {', '.join(known)}")
    return names


def apply_common_defaults(args) -> None:
    """Defaults of the options both runners share, lighter in ``--smoke`` mode."""
    args.dtype = args.dtype or ("fp32" if args.smoke else "bf16")
    args.warmup_ms = args.warmup_ms if args.warmup_ms is not None else (5.0 if args.smoke else 25.0)
    args.rep_ms = args.rep_ms if args.rep_ms is not None else (20.0 if args.smoke else 100.0)
    args.copy_gib = args.copy_gib if args.copy_gib is not None else (1 / 16 if args.smoke else 2.0)


def start_run(args) -> Optional[tuple[torch.device, torch.dtype, Timer]]:
    """The run's device (the CPU for ``--smoke``, else the GPU), the inputs' dtype and the timer;
    None (after saying why) where there is no GPU."""
    device = run_device(args.smoke)
    if device is None:
        return None
    return device, DTYPES[args.dtype], Timer(device, args.warmup_ms, args.rep_ms)


def run_device(smoke: bool) -> Optional[torch.device]:
    """The CPU for ``--smoke``, else the GPU; None (after saying why) where there is no GPU."""
    if smoke:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    print("no CUDA device: use --smoke for the CPU check", file=sys.stderr)
    return None


def free(device: torch.device) -> None:
    """Hand the memory of finished cases back to the device."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- peers


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:240]


def package_version(package: str) -> str:
    if package == "lightning_op":
        return lightning_op.__version__
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def load_each(loaders: dict[str, tuple[Callable[[], Callable], Optional[str]]]):
    """name -> (loader, package or None) to (name -> loaded function, name -> why it is
    unavailable, package -> version of the loaded ones)."""
    loaded, unavailable, versions = {}, {}, {}
    for name, (load, package) in loaders.items():
        try:
            loaded[name] = load()
        except Exception as exc:  # a peer that is not installed, or fails to import here
            unavailable[name] = one_line(exc)
            continue
        if package:
            versions[package] = package_version(package)
    return loaded, unavailable, versions


# ----------------------------------------------------------------------------- timing


class Timer:
    """Median milliseconds of ``fn()``: triton's do_bench on CUDA (CUDA events, L2 flushed
    between runs), CUDA events where that do_bench lacks ``return_mode``, perf_counter on CPU."""

    def __init__(self, device: torch.device, warmup_ms: float, rep_ms: float):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms
        self.do_bench = None
        if device.type == "cuda":
            try:
                from triton.testing import do_bench

                if "return_mode" in inspect.signature(do_bench).parameters:
                    self.do_bench = do_bench
            except ImportError:
                pass
        self.method = {
            "cpu": "time.perf_counter median",
            "cuda": "triton.testing.do_bench median" if self.do_bench else "CUDA events median",
        }[device.type]

    def __call__(self, fn: Callable, grad_to_none: Optional[list[Tensor]] = None) -> float:
        if self.do_bench is not None:
            return float(self.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                                       grad_to_none=grad_to_none, return_mode="median"))
        if self.device.type == "cuda":
            return self._cuda_events(fn, grad_to_none)
        return self._perf_counter(fn, grad_to_none)

    def _repeats(self, estimate_ms: float, budget_ms: float, least: int) -> int:
        return max(least, int(budget_ms / max(estimate_ms, 1e-3)))

    def _cuda_events(self, fn, grad_to_none) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = start.elapsed_time(end) / 3
        for _ in range(self._repeats(estimate_ms, self.warmup_ms, 1)):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self._repeats(estimate_ms, self.rep_ms, 3))]
        for start, end in events:
            clear_grads(grad_to_none)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median([start.elapsed_time(end) for start, end in events])

    def _perf_counter(self, fn, grad_to_none) -> float:
        begin = time.perf_counter()
        fn()
        estimate_ms = (time.perf_counter() - begin) * 1e3
        times = []
        for _ in range(self._repeats(estimate_ms, self.rep_ms, 3)):
            clear_grads(grad_to_none)
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)


def host_ms(fn: Callable, device: torch.device, calls: int = 20) -> float:
    """Median milliseconds the host spends in ``fn()``: the device is synchronised between calls,
    never inside the timed one, so this is validation, dispatch, autograd and launches. Where it
    exceeds the device time, the host sets the pace (as ``host_time.py`` measures for the op)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(calls):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
        sync()
    return statistics.median(times)


def clear_grads(tensors: Optional[list[Tensor]]) -> None:
    for x in tensors or ():
        x.grad = None


def measure_copy(timer: Timer, device: torch.device, copy_gib: float, plan: str) -> tuple[int, float]:
    """(bytes copied, device-to-device copy bandwidth in bytes/s counting bytes read plus bytes
    written), the yardstick of the runners' bandwidth figures; printed with ``plan`` (what the run
    will measure) as the run's first line."""
    nbytes = int(copy_gib * GIB)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    free(device)
    bytes_per_s = 2 * nbytes / (ms * 1e-3)
    print(f"copy bandwidth ({nbytes / GIB:g} GiB, read + write): {bytes_per_s / 1e12:.3f} TB/s; {plan}", flush=True)
    return nbytes, bytes_per_s


class Progress:
    """One line per finished measurement: its number, what it measured, the result, the time so far."""

    def __init__(self, total: int):
        self.total, self.done, self.begin = total, 0, time.perf_counter()

    def line(self, what: str, result: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.begin
        print(f"[{self.done:>3}/{self.total}] {what} {result}  ({elapsed:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- outputs


def environment(device: torch.device) -> dict:
    """When, where and with what a run was made."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
    }


def common_metadata(args, device, dtype, copy_bytes: int, copy_bytes_per_s: float, unavailable: dict,
                    versions: dict) -> dict:
    """The metadata both runners record: the environment, the peers, the inputs' settings and the
    copy bandwidth; each runner adds its own keys."""
    return {
        **environment(device),
        "packages": versions,
        "unavailable": unavailable,
        "dtype": str(dtype).removeprefix("torch."),
        "scale": args.scale,
        "decay": "lightning_op.slopes(H)",
        "warmup_ms": args.warmup_ms,
        "rep_ms": args.rep_ms,
        "copy_bytes": copy_bytes,
        "copy_bytes_per_s": copy_bytes_per_s,
    }


def _git_commit() -> Optional[str]:
    """The checkout's commit, or None when the code is not a checkout of its own (a copy of the
    tree, perhaps inside another checkout whose HEAD says nothing about this code)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        if os.path.realpath(top) != os.path.realpath(os.path.dirname(here)):
            return None
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except Exception:  # no git, or not a checkout (the device machine gets a copy of the tree)
        return None


def _json_safe(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_results(rows: list[dict], meta: dict, out_dir: str) -> list[str]:
    """results.csv and results.json (metadata and rows; NaN written as null) under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "results.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["impl"])
        writer.writeheader()
        writer.writerows(rows)
    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w") as f:
        json.dump({"metadata": {k: _json_safe(v) for k, v in meta.items()},
                   "results": [{k: _json_safe(v) for k, v in row.items()} for row in rows]}, f, indent=1)
    return [csv_path, json_path]


def pyplot():
    """matplotlib's pyplot on the file-only backend, or None (after saying so) where it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"plots skipped: {one_line(exc)}", flush=True)
        return None
    return plt


def print_unavailable(unavailable: dict[str, str]) -> None:
    for name, reason in unavailable.items():
        print(f"unavailable: {name}: {reason}", flush=True)


def print_peers(meta: dict) -> None:
    """The table's lines on the peers: their package versions, and those that could not run."""
    print("packages: " + ", ".join(f"{name} {version}" for name, version in meta["packages"].items()))
    print_unavailable(meta["unavailable"])
