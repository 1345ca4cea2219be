"""Automatic graph rewriting: causal linear attention written in plain PyTorch, found in a model's
graph by its values and run on ``torch.ops.lightning.attn``.

Entry points:

- ``torch.compile(model, backend="lightning")``: Inductor plus the rewrite (``mode=`` and
  ``options=`` go to Inductor). Dynamo finds the name through this package's
  ``torch_dynamo_backends`` entry point when it is installed; :func:`register_backend` registers it
  by hand otherwise (a source tree on ``PYTHONPATH``). :func:`compile` does the same and also
  traces ``Tensor.item()`` into the graph, so that masks built from slopes read one by one are
  rewritten too.
  :func:`make_backend` pairs the rewrite with another compiler (``make_backend("aot_eager")``).
- :func:`rewrite`: ``ExportedProgram -> ExportedProgram``, for ``torch.export`` deployments.
- :class:`InductorPass`: the rewrite as an Inductor ``joint_custom_pre_pass``, for users with
  their own Inductor configuration (inference graphs only).

Every rewrite and every candidate left alone is logged on the ``lightning_op.rewrite`` logger and
kept for :func:`report` (:class:`RewriteRecord`), :func:`counters` and :func:`clear_report`.
See ``recognise.py`` for what is recognised and how.
"""

import sys

from .passes import compile, lightning_backend, make_backend, rewrite, rewrite_graph
from .report import RewriteRecord, clear_report, counters, report

__all__ = [
    "rewrite", "compile", "register_backend", "make_backend", "lightning_backend", "InductorPass", "rewrite_graph",
    "report", "counters", "clear_report", "RewriteRecord",
]



def register_backend() -> None:
    """Make ``backend="lightning"`` known to ``torch.compile`` (idempotent).

    Not done at import unless dynamo is loaded already: importing dynamo costs about a second, and
    an installed package is found through its entry point without it.
    """
    from torch._dynamo.backends import registry

    if "lightning" not in registry._COMPILER_FNS:
        registry.register_backend(lightning_backend, name="lightning")


if "torch._dynamo" in sys.modules:
    register_backend()


def __getattr__(name: str):
    if name == "InductorPass":  # built on first use: it imports Inductor
        from .passes import _inductor_pass_class

        return _inductor_pass_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
