"""Census of the kernels' forms: does each switch still win somewhere?

For every shape and every form switch of the ``forward`` and ``key_value`` families
(``lightning_op/kernels/config.py``), times the op (forward, and forward+backward) with the
built-in configuration and with that one switch flipped, in one process. A form value that is
never more than ``--margin`` faster than the other value of its switch, at any shape, is a
candidate for retirement; the table printed last says which.

    python3 benchmarks/census.py                 # GPU: representative shapes, bf16
    python3 benchmarks/census.py --smoke         # CPU (interpreted kernels), tiny shapes
    python3 benchmarks/census.py --switches forward.update_accumulate --repeats 5   # a candidate, re-timed

With ``--repeats R`` the built-in and the flipped configuration are timed R times each, in
alternation, and each reports its median: one run of each puts differences under ~3% in the
noise, so a retirement is decided on repeated timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: (family, switch): the form switches a census flips
SWITCHES = [("forward", "accumulate"), ("forward", "state_accumulate"), ("forward", "update_accumulate"),
            ("forward", "transposed"), ("key_value", "accumulate")]
#: (B, N, H, D): the main shape, one long sequence cut in segments, and the narrow and wide heads
SHAPES = [(8, 8192, 16, 128), (1, 65536, 16, 128), (2, 32768, 16, 128), (8, 8192, 16, 64), (8, 8192, 16, 256)]
SMOKE_SHAPES = [(1, 200, 2, 32)]


def _default(family: str, shape, dtype, device):
    """``family``'s launch configuration at ``shape`` (forced parameters included)."""
    from lightning_op.kernels import choose_config, state_itemsize_of

    b, n, h, d = shape
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return choose_config(b * h, n, d, d, device, whole_value=family == "key_value", itemsize=itemsize,
                         state_itemsize=state_itemsize_of(dtype))


def _applies(family: str, switch: str, config) -> bool:
    """Whether ``switch`` changes the kernels a launch with ``config`` compiles. The output pass:
    its TRANSPOSED form has no ACCUMULATE or UPDATE_ACCUMULATE option, and UPDATE_ACCUMULATE is
    implied by ACCUMULATE (``ACCUMULATE or UPDATE_ACCUMULATE``). A flip that does not apply times
    the same code twice: any difference is noise."""
    if family == "forward" and switch in ("accumulate", "update_accumulate") and config.transposed:
        return False
    if family == "forward" and switch == "update_accumulate" and config.accumulate:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreted kernels)")
    parser.add_argument("--margin", type=float, default=0.02, help="a win smaller than this is noise (default 2%%)")
    parser.add_argument("--rep-ms", type=float, default=60.0)
    parser.add_argument("--switches", default=None,
                        help="comma-separated family.switch names to flip (default: all of SWITCHES)")
    parser.add_argument("--shapes", default=None, help="comma-separated BxNxHxD shapes (default: SHAPES)")
    parser.add_argument("--repeats", type=int, default=1, help="timings of each configuration, alternated")
    args = parser.parse_args()
    switches = SWITCHES
    if args.switches:
        switches = [tuple(name.split(".", 1)) for name in args.switches.split(",")]
        unknown = [f"{f}.{s}" for f, s in switches if (f, s) not in SWITCHES]
        if unknown:
            raise SystemExit(f"census.py: unknown switches {unknown}; known: "
                             f"{[f'{f}.{s}' for f, s in SWITCHES]}")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["LIGHTNING_OP_BACKEND"] = "triton"
    import lightning_op
    from lightning_op.kernels import config_override

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import Timer

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    timer = Timer(device, warmup_ms=5.0 if args.smoke else 25.0, rep_ms=5.0 if args.smoke else args.rep_ms)
    rows = []
    for shape in shapes:
        b, n, h, d = shape
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, n, h, d, device=device, dtype=dtype, generator=gen).transpose(1, 2) * 0.2
                   for _ in range(3))
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        decay = lightning_op.slopes(h).to(device)
        grad = torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen)

        def forward():
            lightning_op.lightning_attn(q, k, v, decay)

        def forward_backward():
            lightning_op.lightning_attn(*leaves, decay).backward(grad)

        def timed(changes):
            with config_override(**changes):
                return timer(forward), timer(forward_backward, grad_to_none=leaves)

        def median(values):
            values = sorted(values)
            return values[len(values) // 2]

        def compared(changes):
            """(built-in, flipped) timings, each the median of ``args.repeats`` alternated runs."""
            runs = [(timed({}), timed(changes)) for _ in range(args.repeats)]
            return tuple(tuple(median([run[which][part] for run in runs]) for part in range(2))
                         for which in range(2))

        for family, switch in switches:
            built_in = _default(family, shape, dtype, device)
            default = getattr(built_in, switch)
            flipped = {family: {switch: int(not default)}}
            with config_override(**flipped):
                changed = _default(family, shape, dtype, device)
            if not (_applies(family, switch, built_in) or _applies(family, switch, changed)):
                continue  # the same kernels either way at this shape
            try:
                base, other = compared(flipped)
            except Exception as error:  # a form that does not compile or fit here
                print(f"{shape} {family}.{switch}={int(not default)}: {type(error).__name__}: {str(error)[:80]}")
                continue
            rows.append((shape, family, switch, bool(default), base, other))
            print(f"B{b} N{n} H{h} D{d} {family}.{switch}: default {int(default)} {base[0]:.3f} / {base[1]:.3f} ms, "
                  f"flipped {other[0]:.3f} / {other[1]:.3f} ms", flush=True)
    _summary(rows, args.margin)


def _summary(rows, margin: float) -> None:
    """Per switch value: its best gain over the other value (forward+backward time, and forward
    alone for forward-family switches), across shapes; values that never gain more than the
    margin are retirement candidates."""
    best: dict = {}
    for shape, family, switch, default, base, other in rows:
        for value, mine, theirs in ((default, base, other), (not default, other, base)):
            gains = [theirs[1] / mine[1] - 1] + ([theirs[0] / mine[0] - 1] if family == "forward" else [])
            key = (family, switch, int(value))
            gain = max(gains)
            if key not in best or gain > best[key][0]:
                best[key] = (gain, shape)
    print("\n| switch | value | best gain over the other value | at | verdict |")
    print("|---|---|---|---|---|")
    for (family, switch, value), (gain, shape) in sorted(best.items()):
        b, n, h, d = shape
        verdict = "wins somewhere" if gain > margin else f"never wins by more than {margin:.0%}: retire?"
        print(f"| {family}.{switch} | {value} | {gain:+.1%} | B{b} N{n} D{d} | {verdict} |")


if __name__ == "__main__":
    main()
