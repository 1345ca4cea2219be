"""Load and run an AOTInductor package with torch alone: lightning_op cannot even be imported here.

    python examples/run_package.py DIR

DIR holds `model_aoti.pt2` and `cases.pt` (a list of (name, inputs, expected outputs)), as written
by `examples/export_deploy.py`. Prints `check <name>: max_rel_err=<e> tol=<t>; max |diff| vs eager
<d>` per case (the largest difference from the expected outputs, relative to each output's largest
value, then absolute) and exits non-zero if one is above its tolerance.
"""

import sys

sys.modules["lightning_op"] = None  # any `import lightning_op` now fails: the package must not need it

import os  # noqa: E402

import torch  # noqa: E402


# a float32 package and eager differ only in rounding (about 1e-6); loose, as this loads any such
# package, and the tests that run it hold the printed errors to their own bounds
TOLERANCE = 1e-3


def errors(got, want) -> tuple[float, float]:
    """The largest difference over the outputs, relative to each output's largest value, and absolute."""
    relative, absolute = [], []
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), strict=True):
        assert a.shape == b.shape, f"shapes {tuple(a.shape)} and {tuple(b.shape)}"  # no broadcasting
        difference = (a.double() - b.double()).abs().max().item()
        relative.append(difference / max(b.double().abs().max().item(), 1e-30))  # an all-zero output too
        absolute.append(difference)
    return max(relative), max(absolute)


def main():
    folder = sys.argv[1]
    runner = torch._inductor.aoti_load_package(os.path.join(folder, "model_aoti.pt2"))
    failures = []
    with torch.no_grad():
        for name, inputs, expected in torch.load(os.path.join(folder, "cases.pt")):
            relative, absolute = errors(runner(*inputs), expected)
            name = "fresh_process_" + name.replace(" ", "_")
            print(f"    check {name}: max_rel_err={relative:.2e} tol={TOLERANCE:.0e}; "
                  f"max |diff| vs eager {absolute:.1e}")
            if not relative <= TOLERANCE:  # NaN fails too
                failures.append(name)
    print(f"torch {torch.__version__}, lightning_op imported: {sys.modules['lightning_op'] is not None}")
    if failures:
        sys.exit(f"run_package: checks failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
