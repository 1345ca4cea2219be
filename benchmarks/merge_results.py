"""Merge bench.py outputs of several runs (e.g. the two halves of the main sweep, run on two GPUs
side by side) into one results.csv / results.json and one set of plots.

    python3 benchmarks/merge_results.py --out benchmarks/results/NAME run1/results.json run2/results.json

Rows keep their own values; the metadata is the first run's, with every run's command listed.
A (shape, impl) pair present in several runs keeps the last run's row.
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import IMPLS, write_plots  # noqa: E402
from common import write_results  # noqa: E402


def _numbers(row: dict) -> dict:
    """JSON stores missing measurements as null; the plots expect NaN."""
    return {key: (math.nan if value is None and key.endswith(("_ms", "_per_s", "_gib", "_fraction")) else value)
            for key, value in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("runs", nargs="+", help="results.json files written by bench.py")
    args = parser.parse_args()
    merged, meta = {}, None
    for path in args.runs:
        with open(path) as f:
            run = json.load(f)
        if meta is None:
            meta = dict(run["metadata"], commands=[])
        meta["commands"].append(run["metadata"].get("command"))
        for row in run["results"]:
            merged[(row["shape"], row["impl"])] = _numbers(row)
    rows = sorted(merged.values(), key=lambda r: (r["D"], -r["B"], r["N"], IMPLS.index(r["impl"])
                                                 if r["impl"] in IMPLS else len(IMPLS)))
    paths = write_results(rows, meta, args.out)
    paths += write_plots(rows, meta, args.out, [i for i in IMPLS if any(r["impl"] == i for r in rows)])
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    main()
