"""Replacing a recognised region by one ``lightning::attn`` call.

Only core ATen ops are emitted around the call (``permute``, ``unsqueeze``, ``select``,
``_to_copy``, ``full``, ``cat``), so the result is valid at every stage: a dynamo graph traced to
ATen, an Inductor graph, an exported program before or after ``run_decompositions``. The decay
is written into the graph as literals: nothing is added to a state dict, and a saved program
carries it.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from . import graph as g
from .checks import Match

aten = torch.ops.aten
_TO_CANONICAL = {"bhnd": None, "bnhd": [0, 2, 1, 3]}
_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node")


def _fake_mode(node: fx.Node):
    val = g.tensor_val(node)
    return getattr(val, "fake_mode", None)


class _Emitter:
    def __init__(self, graph: fx.Graph, anchor: fx.Node):
        self.graph, self.anchor, self.mode = graph, anchor, _fake_mode(anchor)
        self.nodes: list[fx.Node] = []

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        for key in _COPIED_META:
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        if self.mode is not None:
            fake_args, fake_kwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta.get("val"))
            with self.mode:
                node.meta["val"] = target(*fake_args, **fake_kwargs)
        self.nodes.append(node)
        return node


def _as_canonical(emit: _Emitter, node: fx.Node, layout: str, dtype: torch.dtype) -> fx.Node:
    if layout == "gnd":
        node = emit(aten.unsqueeze.default, node, 0)
    elif _TO_CANONICAL[layout] is not None:
        node = emit(aten.permute.default, node, _TO_CANONICAL[layout])
    if g.tensor_val(node).dtype != dtype:
        node = emit(aten._to_copy.default, node, dtype=dtype)
    return node


def _decay_node(emit: _Emitter, decay, device) -> Any:
    if decay is None:
        return None
    if len(set(decay)) == 1:
        return emit(aten.full.default, [len(decay)], decay[0], dtype=torch.float32, device=device)
    parts = [emit(aten.full.default, [1], value, dtype=torch.float32, device=device) for value in decay]
    return emit(aten.cat.default, parts)


def replace(gm: fx.GraphModule, match: Match) -> fx.Node:
    """Insert the op call before ``match.output``, route its users to it, drop the dead region."""
    graph = gm.graph
    output = match.output
    out_val = g.tensor_val(output)
    with graph.inserting_before(output):
        emit = _Emitter(graph, output)
        q, k, v = (_as_canonical(emit, node, layout, match.compute_dtype)
                   for node, layout in zip(match.inputs, match.layouts))
        decay = _decay_node(emit, match.decay, out_val.device)
        call = emit(torch.ops.lightning.attn.default, q, k, v, decay, match.scale, None)
        out = emit(operator.getitem, call, 0)
        if match.out_layout == "gnd":
            out = emit(aten.select.int, out, 0, 0)
        elif _TO_CANONICAL[match.out_layout] is not None:
            out = emit(aten.permute.default, out, _TO_CANONICAL[match.out_layout])
        if out_val.dtype != match.compute_dtype:
            out = emit(aten._to_copy.default, out, dtype=out_val.dtype)
        new_val = g.tensor_val(out)
        if out_val.is_contiguous() and new_val is not None and not new_val.is_contiguous():
            # users may `view` the output, which needs the strides the original had
            out = emit(aten.clone.default, out, memory_format=torch.contiguous_format)
    output.replace_all_uses_with(out)
    for node in reversed(match.region):
        if not node.users and not node.is_impure():
            graph.erase_node(node)
    return out
