"""Draw the README's results figure: time per 64K tokens against the sequence length, ours beside fla.

    python3 benchmarks/plot_results.py                 # writes docs/results-h100.svg
    python3 benchmarks/plot_results.py --out fig.png   # any format matplotlib knows

The numbers are copied from benchmarks/RESULTS.md, entry "2026-12-06 — ours beside fla on an H100,
N = 1K-128K and D = 64, one machine": one NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0,
fla-core 0.6.0; bf16, H = 16, D = 128, decay `slopes(16)`, B·N = 64K tokens (128K at N = 128K),
medians of `triton.testing.do_bench`. Update TABLE and the title together when a newer side-by-side
run replaces that entry in the README. Needs matplotlib (`pip install matplotlib`); not imported by
the package or the tests.
"""

from __future__ import annotations

import argparse
import os

TITLE = "H100 80GB HBM3, bf16, H = 16, D = 128 (benchmarks/RESULTS.md, 2026-12-06)"

# (B, N, ours fwd ms, ours fwd+bwd ms, fla fwd ms, fla fwd+bwd ms), exactly as in RESULTS.md
TABLE = [
    (64, 1024, 0.394, 1.519, 0.952, 4.358),
    (32, 2048, 0.382, 1.506, 0.975, 4.420),
    (16, 4096, 0.381, 1.509, 1.036, 4.559),
    (8, 8192, 0.380, 1.537, 0.950, 4.424),
    (4, 16384, 0.489, 1.748, 1.050, 4.614),
    (2, 32768, 0.545, 1.864, 1.306, 5.049),
    (1, 65536, 0.569, 1.889, 1.754, 6.344),
    (1, 131072, 1.096, 3.721, 3.489, 12.601),
]


def per_64k_tokens(b: int, n: int, ms: float) -> float:
    """Milliseconds per 65,536 tokens (the rows hold B·N = 64K tokens, 128K at N = 128K)."""
    return ms * 65536 / (b * n)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "results-h100.svg"))
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "lightning_op"  # the same SVG every time for the same numbers
    lengths = [n for _, n, *_ in TABLE]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, (label, ours_col, fla_col) in zip(axes, (("forward", 2, 4), ("forward + backward", 3, 5))):
        for name, col, style in (("lightning_op", ours_col, "o-"), ("fla chunk_simple_gla", fla_col, "s--")):
            times = [per_64k_tokens(row[0], row[1], row[col]) for row in TABLE]
            ax.plot(lengths, times, style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("sequence length N (B·N = 64K tokens)")
        ax.set_ylabel("ms per 64K tokens (lower is better)")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(TITLE, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, metadata={"Date": None} if args.out.endswith(".svg") else None)
    print(f"wrote {os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
