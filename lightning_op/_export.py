"""What the rewrite and deployment share: taking an ``ExportedProgram`` and giving back one built
around an edited copy of its graph (both leave the program they were given unchanged)."""

from __future__ import annotations

import copy


def require_program(ep, caller: str) -> None:
    """Raise ``TypeError`` unless ``ep`` is an ``ExportedProgram`` (``caller`` names the function)."""
    from torch.export import ExportedProgram

    if not isinstance(ep, ExportedProgram):
        raise TypeError(f"{caller}: ep must be a torch.export.ExportedProgram, got {type(ep).__name__}")


def with_graph(ep, gm, signature):
    """A program like ``ep`` (its state, constants, ranges and verifiers) running ``gm``, an edited
    copy of its graph module, with ``signature`` for the graph's inputs and outputs."""
    if hasattr(ep, "_update"):
        return ep._update(gm, signature)
    from torch.export import ExportedProgram

    return ExportedProgram(
        root=gm, graph=gm.graph, graph_signature=signature, state_dict=ep.state_dict,
        range_constraints=copy.deepcopy(ep.range_constraints), module_call_graph=copy.deepcopy(ep.module_call_graph),
        example_inputs=ep.example_inputs, constants=ep.constants, verifiers=ep.verifiers,
    )
