"""Replacing a recognised region by one ``lightning::attn`` call.

Only core ATen ops are emitted around the call (``permute``, ``unsqueeze``, ``select``,
``_to_copy``, ``full``, ``cat``, ``view``, ``mul``, ``clone``), so the result is valid at every
stage: a dynamo graph traced to ATen, an Inductor graph, an exported program before or after
``run_decompositions``. The decay and the weights per head are written into the graph as
literals: nothing is added to a state dict, and a saved program carries them; a decay computed from
trainable parameters is the model's own tensor, passed live, so it keeps its gradient.

Weights that differ by head multiply q (and v, where a carried state is weighted apart from the
new tokens); a state the model carries in is the op's ``initial_state``, and a final state it
returns is the op's, times its weight per head, in the model's layout and dtype.
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


def _per_head(emit: _Emitter, values, device, dims: int) -> fx.Node:
    """A float32 constant of ``values`` (one per head) shaped [H] followed by ``dims`` ones."""
    parts = [emit(aten.full.default, [1], value, dtype=torch.float32, device=device) for value in values]
    node = parts[0] if len(parts) == 1 else emit(aten.cat.default, parts)
    return emit(aten.view.default, node, [len(values)] + [1] * dims)


def _decay_node(emit: _Emitter, decay, device) -> Any:
    if decay is None:
        return None
    if len(set(decay)) == 1:
        return emit(aten.full.default, [len(decay)], decay[0], dtype=torch.float32, device=device)
    parts = [emit(aten.full.default, [1], value, dtype=torch.float32, device=device) for value in decay]
    return emit(aten.cat.default, parts)


def _live_decay(emit: _Emitter, match: Match) -> fx.Node:
    """The model's own decay tensor as the op's ``[H]`` float32 decay, computed in the graph, so its
    gradient reaches the parameters: the slope itself, or ``-log(lam)``."""
    node = match.decay_source
    node = emit(aten.view.default, node, [len(match.fit.weights)]) if g.tensor_val(node).dim() != 1 else node
    if g.tensor_val(node).dtype != torch.float32:
        node = emit(aten._to_copy.default, node, dtype=torch.float32)
    if match.decay_form == "lam":
        node = emit(aten.neg.default, emit(aten.log.default, node))
    return node


def _cu_seqlens(emit: _Emitter, match: Match, q: fx.Node) -> fx.Node:
    """The op's ``cu_seqlens`` for a packed batch, computed in the graph from the model's boundaries
    X: ``[0, clamp(X + shift, 0, N), N]`` in int64 on q's device (``packing.py`` says why these are
    the sequences of the model's ids, whatever X holds)."""
    packing = match.packing
    q_val = g.tensor_val(q)
    length = q_val.shape[2]
    n = emit(aten.sym_size.int, q, 2) if isinstance(length, torch.SymInt) else int(length)
    bounds = packing.boundaries
    if g.tensor_val(bounds).dtype != torch.int64 or g.tensor_val(bounds).device != q_val.device:
        bounds = emit(aten._to_copy.default, bounds, dtype=torch.int64, device=q_val.device)
    if packing.shift:
        bounds = emit(aten.add.Tensor, bounds, packing.shift)
    start = emit(aten.full.default, [1], 0, dtype=torch.int64, device=q_val.device)
    end = emit(aten.full.default, [1], n, dtype=torch.int64, device=q_val.device)
    cu = emit(aten.cat.default, [start, bounds, end])
    return emit(aten.minimum.default, emit(aten.clamp_min.default, cu, 0), end)


def _op_decay(match: Match):
    """The decay as the op takes it: per kv head where a group shares its state; per query head where
    k and v are grouped but each query head keeps its own state (zeros where the model has no decay:
    without one the op would share the state, whose heads a carried or returned state has apart)."""
    if match.kv_heads is None:
        return match.decay
    heads = len(match.fit.weights)
    if match.shared_states:
        return None if match.decay is None else match.decay[:: heads // match.kv_heads]
    return (0.0,) * heads if match.decay is None else match.decay


def _scaled(emit: _Emitter, node: fx.Node, factor, device) -> fx.Node:
    """``node`` ([B, H, ...]) times ``factor`` per head, in float32, back in its own dtype."""
    if factor is None:
        return node
    dtype = g.tensor_val(node).dtype
    node = emit(aten.mul.Tensor, node, _per_head(emit, factor, device, 2))
    return node if dtype == torch.float32 else emit(aten._to_copy.default, node, dtype=dtype)


def _state_as_canonical(emit: _Emitter, node: fx.Node, layout: str) -> fx.Node:
    if layout.startswith("g"):
        node = emit(aten.unsqueeze.default, node, 0)
    if layout.endswith("vk"):
        node = emit(aten.permute.default, node, [0, 1, 3, 2])
    if g.tensor_val(node).dtype != torch.float32:
        node = emit(aten._to_copy.default, node, dtype=torch.float32)
    return node


def _state_from_canonical(emit: _Emitter, node: fx.Node, final, like: fx.Node, device) -> fx.Node:
    """The op's final state as the model's state ``like``: weighted, laid out and cast as it is."""
    node = _scaled(emit, node, final.factor, device)
    if final.layout.endswith("vk"):
        node = emit(aten.permute.default, node, [0, 1, 3, 2])
    if final.layout.startswith("g"):
        node = emit(aten.select.int, node, 0, 0)
    want = g.tensor_val(like)
    if want.dtype != torch.float32:
        node = emit(aten._to_copy.default, node, dtype=want.dtype)
    new_val = g.tensor_val(node)
    if want.is_contiguous() and new_val is not None and not new_val.is_contiguous():
        node = emit(aten.clone.default, node, memory_format=torch.contiguous_format)
    return node


def replace(gm: fx.GraphModule, match: Match) -> dict[str, fx.Node]:
    """Insert the op call before ``match.output`` (and before every user of a final state it
    replaces), route their users to it, drop the dead regions. Returns the replaced nodes' names
    with the nodes now standing for them."""
    graph = gm.graph
    output = match.output
    out_val = g.tensor_val(output)
    device = out_val.device
    position = {n: i for i, n in enumerate(graph.nodes)}
    anchor = min([output] + [u for final in match.final_states for u in final.node.users], key=position.__getitem__)
    renamed = {}
    with graph.inserting_before(anchor):
        emit = _Emitter(graph, output)
        q, k, v = (_as_canonical(emit, node, layout, match.compute_dtype)
                   for node, layout in zip(match.inputs, match.layouts))
        q, v = _scaled(emit, q, match.q_factor, device), _scaled(emit, v, match.v_factor, device)
        decay = (_live_decay(emit, match) if match.decay_source is not None
                 else _decay_node(emit, _op_decay(match), device))
        state = None if match.state_in is None else _state_as_canonical(emit, match.state_in, match.state_layout)
        cu_seqlens = None if match.packing is None else _cu_seqlens(emit, match, q)
        call = emit(torch.ops.lightning.attn.default, q, k, v, decay, match.scale, state, cu_seqlens)
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
        renamed[output.name] = out
        if match.final_states:
            final_state = emit(operator.getitem, call, 1)
            for final in match.final_states:
                renamed[final.node.name] = _state_from_canonical(emit, final_state, final, final.node, device)
    output.replace_all_uses_with(out)
    for final in match.final_states:
        final.node.replace_all_uses_with(renamed[final.node.name])
    dead = set(match.region).union(*(final.region for final in match.final_states))
    for node in sorted(dead, key=position.__getitem__, reverse=True):
        if not node.users and not node.is_impure():
            graph.erase_node(node)
    return renamed


def differentiable_copies(gm: fx.GraphModule) -> None:
    """Functionalized writes (``out[:, t] = row``) are ``aten.copy(destination, source)``, which
    autograd cannot differentiate: where a rewrite leaves some behind (the pieces of a loop whose
    whole was refused), training would fail. ``where(True, source, destination)`` in the
    destination's dtype is the same value (the destination's own values, uninitialised ones too,
    never enter) and is differentiable."""
    graph = gm.graph
    copies = [n for n in graph.nodes if n.target is aten.copy.default]
    for node in copies:
        destination, source = node.args[:2]
        with graph.inserting_before(node):
            emit = _Emitter(graph, node)
            everywhere = emit(aten.ones_like.default, destination, dtype=torch.bool)
            value = emit(aten.where.self, everywhere, source, destination)
            dtype = g.tensor_val(node).dtype if g.tensor_val(node) is not None else None
            if dtype is not None and g.tensor_val(value) is not None and g.tensor_val(value).dtype != dtype:
                value = emit(aten._to_copy.default, value, dtype=dtype)
        node.replace_all_uses_with(value)
        graph.erase_node(node)
    if copies:
        graph.lint()
        gm.recompile()
