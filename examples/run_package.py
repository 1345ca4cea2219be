"""Load and run an AOTInductor package with torch alone: lightning_op cannot even be imported here.

    python examples/run_package.py DIR

DIR holds `model_aoti.pt2` and `cases.pt` (a list of (name, inputs, expected outputs)), as written
by `examples/export_deploy.py`. Prints the largest difference from the expected outputs per case.
"""

import sys

sys.modules["lightning_op"] = None  # any `import lightning_op` now fails: the package must not need it

import os  # noqa: E402

import torch  # noqa: E402


def max_difference(got, want) -> float:
    got_flat, _ = torch.utils._pytree.tree_flatten(got)
    want_flat, _ = torch.utils._pytree.tree_flatten(want)
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(got_flat, want_flat))


def main():
    folder = sys.argv[1]
    runner = torch._inductor.aoti_load_package(os.path.join(folder, "model_aoti.pt2"))
    with torch.no_grad():
        for name, inputs, expected in torch.load(os.path.join(folder, "cases.pt")):
            print(f"    {name}: max |diff| vs eager {max_difference(runner(*inputs), expected):.1e}")
    print(f"torch {torch.__version__}, lightning_op imported: {sys.modules['lightning_op'] is not None}")


if __name__ == "__main__":
    main()
