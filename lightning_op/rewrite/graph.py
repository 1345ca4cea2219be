"""Reading ATen-level FX graphs: which nodes are constants, which ops are (multi)linear, and
evaluating a piece of a graph on chosen values — the tools the recogniser probes with.

A node is ``const`` when its value depends only on literals, sizes, buffers and frozen
parameters (a decay mask built in ``forward``, a registered buffer sliced to N); ``param`` when
it depends on trainable parameters but not on the inputs (a learnable decay); ``input`` when it
depends on what the user feeds in; ``sym`` when it is a size (a SymInt), evaluated by
substituting values for the shape symbols.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Optional

import torch
from torch import fx

CONST, PARAM, INPUT, SYM = "const", "param", "input", "sym"

# Ops that only move or copy elements (views, layout changes, repeats): linear in their input.
VIEW_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "view_as", "reshape_as", "transpose", "permute",
    "t", "mT", "mH", "adjoint", "movedim", "swapaxes", "swapdims", "unsqueeze", "squeeze", "expand",
    "expand_as", "slice", "select", "narrow", "split", "split_with_sizes", "unbind", "chunk", "flatten",
    "unflatten", "alias", "clone", "contiguous", "detach", "detach_", "lift_fresh_copy", "repeat", "flip",
    "view_copy", "permute_copy", "transpose_copy", "unsqueeze_copy", "squeeze_copy", "expand_copy",
    "slice_copy", "select_copy", "t_copy", "alias_copy", "getitem",
})
# Dtype conversions: probed in float64, so they are exact there.
CAST_OPS = frozenset({"_to_copy", "to", "type_as", "convert_element_type", "_autocast_to_reduced_precision",
                      "_autocast_to_full_precision"})
# Ops that multiply tensors together: a product of two non-constant operands mixes them.
PRODUCT_OPS = frozenset({"matmul", "bmm", "mm", "einsum", "mul", "outer", "mv", "dot", "linear",
                         "baddbmm", "addbmm", "addmm"})  # input + alpha * a @ b: the probes check the sum
# Further ops that are linear in their non-constant tensor arguments, under the checks in `is_linear`.
LINEAR_OPS = frozenset({"add", "sub", "neg", "div", "cumsum", "sum", "mean", "cat", "stack",
                        "constant_pad_nd", "pad", "tril", "triu", "masked_fill", "where", "select_scatter",
                        "slice_scatter", "copy"})
# Ops whose value depends on their tensor argument's shape only.
SHAPE_ONLY_OPS = frozenset({"zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full",
                            "empty_like", "new_empty", "new_empty_strided",
                            "sym_size", "sym_numel", "sym_stride", "sym_storage_offset"})
# Uninitialised allocations (an output written row by row): constants whose contents are undefined.
# They are evaluated as zeros, never read as data: an element the model leaves unwritten is then
# zero in the probes, where attention is not, so a region returning one is refused.
UNINITIALISED_OPS = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided",
                               "empty_permuted"})

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def op_name(node: fx.Node) -> Optional[str]:
    """``"mul"`` for ``aten.mul.Tensor`` (and prims' ops), ``"getitem"``; None for anything else."""
    if node.op != "call_function":
        return None
    target = node.target
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload) and target.namespace in ("aten", "prims"):
        return target._schema.name.split("::")[-1]
    return None


def describe(node: fx.Node) -> str:
    """What a node does, for messages: its ATen op's name, else its target or kind."""
    name = op_name(node)
    if name is not None:
        return name
    return str(node.target) if node.op == "call_function" else node.op


def tensor_val(node: Any) -> Optional[torch.Tensor]:
    """The (fake) tensor recorded for a node, or None."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def is_sym_node(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


# In-place ops that leave values as they are: ``torch.tensor([...])`` in a forward exports as a
# lifted constant, ``lift_fresh_copy`` and then ``detach_``.
_VALUE_PRESERVING_INPLACE = frozenset({"detach_"})


def _is_nondeterministic(node: fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        mutates = target._schema.is_mutable and op_name(node) not in _VALUE_PRESERVING_INPLACE
        return torch.Tag.nondeterministic_seeded in target.tags or mutates
    return False


def written_in_place(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose values an in-place write makes differ from what their arguments compute:
    every op writing in place (``mask[i, :i+1] = ...``, ``x.mul_(2)``, an ``out=`` argument), and
    every node reading written storage (through any view of it) after the first write to it.

    A walk along the graph's edges, or an evaluation of them, sees the storage as it was before
    the writes, so the recogniser must treat these nodes as unknown data, never as constants.
    Reads before the first write are what the edges say (a functionalized graph's writes back
    into its inputs come last). Views are found from the ATen schemas (a result that aliases its
    first argument), writes likewise (an argument marked as written); ``detach_`` writes no value."""
    root: dict[fx.Node, fx.Node] = {}
    first_write: dict[fx.Node, int] = {}  # storage root -> position of its first write
    tainted: set[fx.Node] = set()

    def base(arg):
        return root.get(arg, arg) if isinstance(arg, fx.Node) else None

    for position, node in enumerate(graph.nodes):
        for arg in node.all_input_nodes:
            if base(arg) in first_write:
                tainted.add(node)
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:  # one result of a multi-result view (unbind, split)
            parent = node.args[0]
            if isinstance(parent, fx.Node) and parent in root:
                root[node] = root[parent]
            continue
        if not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        bound = list(node.args) + [node.kwargs.get(a.name) for a in schema.arguments[len(node.args):]]
        for argument, value in zip(schema.arguments, bound):
            info = argument.alias_info
            if info is not None and info.is_write and op_name(node) not in _VALUE_PRESERVING_INPLACE:
                for item in value if isinstance(value, (list, tuple)) else [value]:
                    if base(item) is not None:
                        first_write.setdefault(base(item), position)
                        tainted.add(node)
        returns = schema.returns
        if returns and returns[0].alias_info is not None and node.args and base(node.args[0]) is not None:
            root[node] = base(node.args[0])  # a view, or an in-place op's result: the same storage
    return tainted


def classify(graph: fx.Graph, placeholder_class: Callable[[fx.Node], str],
             written: Optional[set] = None) -> dict[fx.Node, str]:
    """The class of every node (see the module docstring), in one pass in graph order. A node that
    reads storage after an in-place write to it (``written``, :func:`written_in_place` of the
    graph when not given) is ``INPUT``: its value is unknown."""
    classes: dict[fx.Node, str] = {}
    written = written_in_place(graph) if written is None else written
    for node in graph.nodes:
        if node.op == "output":
            continue
        if node in written:
            classes[node] = INPUT
        elif is_sym_node(node):
            classes[node] = SYM
        elif node.op == "placeholder":
            classes[node] = placeholder_class(node)
        elif node.op == "get_attr":
            classes[node] = CONST
        elif node.op != "call_function" or _is_nondeterministic(node):
            classes[node] = INPUT
        elif op_name(node) in SHAPE_ONLY_OPS:
            classes[node] = CONST
        else:
            seen = {classes.get(a, INPUT) for a in node.all_input_nodes}
            classes[node] = INPUT if INPUT in seen else PARAM if PARAM in seen else CONST
    return classes


def _is_const(arg: Any, classes: dict) -> bool:
    if isinstance(arg, fx.Node):
        return classes.get(arg) in (CONST, SYM)
    if isinstance(arg, (list, tuple)):
        return all(_is_const(a, classes) for a in arg)
    return True  # a literal


def is_linear(node: fx.Node, classes: dict) -> bool:
    """Whether ``node`` is linear in each of its non-constant tensor arguments (so that a region of
    such ops is a polynomial in its inputs, and the recogniser's probes are conclusive)."""
    name = op_name(node)
    if name is None:
        return False
    if name == "getitem":
        source = node.args[0]
        return isinstance(source, fx.Node) and op_name(source) in VIEW_OPS
    if name == "view" and any(isinstance(a, torch.dtype) for a in node.args[1:]):
        return False  # a bit-cast, not a view
    if name == "mul" and _is_self_gated(node, classes):
        return False
    if name in VIEW_OPS or name in CAST_OPS or name in PRODUCT_OPS:
        return True
    if name not in LINEAR_OPS:
        return False
    if name == "div":
        return getattr(node.target, "_overloadname", "") in ("Tensor", "Scalar") and _is_const(node.args[1], classes)
    if name == "masked_fill":
        return _is_const(node.args[1], classes) and _is_const(node.args[2], classes)
    if name == "pad":  # aten.pad(input, pad, mode, value): a nonzero fill value is affine, not linear
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        return value in (None, 0, 0.0)
    if name == "where":
        return len(node.args) == 3 and _is_const(node.args[0], classes)
    return True


# Views that take a part of their input: two different ones (q and k split from one qkv projection)
# share no elements, so sharing the tensor beyond them says nothing about gating.
_PART_VIEWS = frozenset({"select", "slice", "narrow", "getitem", "split", "split_with_sizes", "unbind", "chunk"})


def _near_ancestors(node: fx.Node, classes: dict, depth: int = 6) -> dict[fx.Node, bool]:
    """Ancestors within ``depth`` steps, each with whether the path to it crosses a non-linear op;
    a path ends at a view taking a part of its input."""
    found = {node: False}
    frontier = [(node, op_name(node) not in VIEW_OPS | CAST_OPS | PRODUCT_OPS | LINEAR_OPS)]
    for _ in range(depth):
        nxt = []
        for n, crossed in frontier:
            if op_name(n) in _PART_VIEWS:
                continue
            for a in n.all_input_nodes:
                if classes.get(a) != INPUT or (a in found and found[a] >= crossed):
                    continue
                found[a] = crossed
                nxt.append((a, crossed or op_name(a) not in VIEW_OPS | CAST_OPS | PRODUCT_OPS | LINEAR_OPS))
        frontier = nxt
    return found


def _is_self_gated(node: fx.Node, classes: dict) -> bool:
    """``x * f(x)`` elementwise, f non-linear (a decomposed silu or gelu): a feature map, not a
    product of two attention inputs."""
    acts = [a for a in node.args[:2] if isinstance(a, fx.Node) and classes.get(a) == INPUT]
    vals = [tensor_val(a) for a in acts] + [tensor_val(node)]
    if len(acts) != 2 or any(v is None for v in vals) or vals[2].shape not in (vals[0].shape, vals[1].shape):
        return False  # an outer product (k (x) v) has a shape of its own
    first, second = (_near_ancestors(a, classes) for a in acts)
    return any(first[c] or second[c] for c in first.keys() & second.keys())


def is_product(node: fx.Node, classes: dict) -> bool:
    """A product of two or more activations (q k^T, scores v, k (x) v; not x W)."""
    if op_name(node) not in PRODUCT_OPS:
        return False
    return sum(1 for a in node.all_input_nodes if classes.get(a) == INPUT) >= 2


# ----------------------------------------------------------------------------- numbers a computation holds

# Numbers this large stand for "no bound" (a slice to the end, -1e9 as minus infinity): no
# attention runs over 16M tokens (an [N, N] mask of that length would hold 2**48 elements).
_UNBOUNDED = 1 << 24
# Arguments naming sizes: in a region they are the activations' own dims (batch, heads, head dim).
_SIZE_ARGUMENTS = frozenset({"size", "shape", "sizes"})


def _magnitudes(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [math.ceil(abs(value))] if math.isfinite(value) and abs(value) < _UNBOUNDED else []
    if isinstance(value, (list, tuple)):
        return [m for v in value for m in _magnitudes(v)]
    return []


def literal_numbers(node: fx.Node, sizes: bool = True) -> list[int]:
    """The magnitudes (rounded up) of the numbers written into ``node``'s arguments that could be
    positions or lengths: a window (``diff < 64``), a diagonal offset, a slice bound, a size
    (unless ``sizes`` is false); not dimension indices, dtypes or flags."""
    if node.op != "call_function" or node.target is operator.getitem:  # an index into a result tuple
        return []
    if isinstance(node.target, torch._ops.OpOverload):
        names = [argument.name for argument in node.target._schema.arguments]
        named = list(zip(names, node.args)) + list(node.kwargs.items())
    else:  # arithmetic on sizes (operator.sub, sym_max, ...)
        named = [("", a) for a in node.args] + list(node.kwargs.items())
    found = []
    for name, value in named:
        if "dim" in name or name in ("source", "destination") or (not sizes and name in _SIZE_ARGUMENTS):
            continue
        found.extend(_magnitudes(value))
    return found


def tensor_numbers(value: Any) -> list[int]:
    """The sizes of a constant tensor and the largest magnitude among its finite values (a buffer's
    length, a window kept in a buffer)."""
    if not isinstance(value, torch.Tensor) or value.is_complex():
        return []
    found = [int(s) for s in value.shape]
    if value.numel() == 0:
        return found
    if value.dtype == torch.bool:
        return found + [1]
    values = value[torch.isfinite(value)] if value.is_floating_point() else value
    if values.numel():
        found.extend(_magnitudes(float(values.abs().max())))
    return found


def constant_ancestry(roots, classes: dict) -> list[fx.Node]:
    """The constant and size nodes among ``roots`` and every constant or size they are computed
    from (a region's masks and everything that builds them)."""
    stack = [n for n in roots if classes.get(n) in (CONST, SYM)]
    seen: dict[fx.Node, None] = {}
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen[node] = None
        stack.extend(a for a in node.all_input_nodes if classes.get(a) in (CONST, SYM))
    return list(seen)


# ----------------------------------------------------------------------------- evaluation


def shape_env_of(graph: fx.Graph):
    for node in graph.nodes:
        val = node.meta.get("val")
        vals = [val] if not isinstance(val, (list, tuple)) else list(val)
        for v in vals:
            sizes = v.shape if isinstance(v, torch.Tensor) else [v] if isinstance(v, torch.SymInt) else []
            for s in sizes:
                if isinstance(s, torch.SymInt):
                    return s.node.shape_env
    return None


class Evaluator:
    """Evaluates constant nodes (in their own dtype) and regions (in float64) of one graph, for one
    binding of the shape symbols (``bindings``: sympy symbol -> int; unbound symbols take their hint).
    ``overrides`` gives constants their value instead of computing it: a tensor, or a function of
    the evaluator (a packing mask, all true at whatever length is bound)."""

    def __init__(self, gm: fx.GraphModule, classes: dict, const_values: dict, bindings: Optional[dict] = None,
                 device: Optional[torch.device] = None, overrides: Optional[dict] = None):
        self.gm, self.classes, self.const_values = gm, classes, const_values
        self.shape_env = shape_env_of(gm.graph)
        self.bindings = dict(bindings or {})
        self.device = device
        self.overrides = dict(overrides or {})
        self._memo: dict[fx.Node, Any] = {}

    # sizes
    def size(self, s) -> int:
        if isinstance(s, int):
            return s
        expr = s.node.expr
        if not hasattr(expr, "xreplace"):
            return expr
        value = expr.xreplace({sym: self._bound(sym) for sym in expr.free_symbols})
        if isinstance(value, (int, float)):
            return value
        return int(value) if value.is_integer else float(value)

    def _hint(self, sym) -> int:
        values = backed_values(self.shape_env)
        if sym not in values:
            raise ValueError(f"no value for the size symbol {sym}")
        return int(values[sym])

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(self.size(s) for s in tensor_val(node).shape)

    def largest(self, nodes) -> int:
        """Elements in the largest tensor among ``nodes``."""
        return max((math.prod(self.shape(n)) for n in nodes if tensor_val(n) is not None), default=0)

    def rebound(self, bindings: dict) -> "Evaluator":
        """An evaluator of the same graph with these symbols bound to other values."""
        return Evaluator(self.gm, self.classes, self.const_values, {**self.bindings, **bindings}, self.device,
                         self.overrides)

    def with_overrides(self, overrides: dict) -> "Evaluator":
        """An evaluator of the same graph and sizes with these constants given their values."""
        return Evaluator(self.gm, self.classes, self.const_values, self.bindings, self.device,
                         {**self.overrides, **overrides})

    # constants
    def const(self, node: fx.Node) -> Any:
        if node in self._memo:
            return self._memo[node]
        stack, seen = [node], set()
        while stack:  # iterative post-order over the constant ancestors
            n = stack[-1]
            pending = [a for a in n.all_input_nodes if a not in self._memo and a not in seen
                       and self.classes.get(a) in (CONST, SYM) and not self._shape_only_arg(n)]
            if pending:
                stack.extend(pending)
                seen.update(pending)
            else:
                stack.pop()
                if n not in self._memo:
                    self._memo[n] = self._eval_const(n)
        return self._memo[node]

    def _shape_only_arg(self, node: fx.Node) -> bool:
        return op_name(node) in SHAPE_ONLY_OPS

    def _eval_const(self, node: fx.Node) -> Any:
        if node in self.overrides:
            value = self.overrides[node]
            return value(self) if callable(value) else value
        cls = self.classes.get(node)
        if cls == SYM and node.op == "call_function" and node.all_input_nodes and all(
                self.classes.get(a) in (CONST, SYM) for a in node.all_input_nodes):
            # a number computed from constants (``slopes[h].item()``): its symbol may be unbacked,
            # with no hint to read, so compute it, and bind the symbol for the shapes that use it
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.const)
            value = node.target(*args, **kwargs)
            expr = getattr(getattr(node.meta.get("val"), "node", None), "expr", None)
            if getattr(expr, "is_Symbol", False) and isinstance(value, (int, float, bool)):
                self.bindings.setdefault(expr, value)
            return value
        if cls == SYM:
            val = node.meta["val"]
            if isinstance(val, torch.SymBool):
                return bool(val.node.expr.xreplace({s: self._bound(s) for s in val.node.expr.free_symbols}))
            return self.size(val)
        if node.op == "placeholder":
            return self.const_values[node]
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        if self._shape_only_arg(node):
            def dummy(a):  # its layout too: zeros_like(v) keeps v's strides, and a later view needs them
                if isinstance(a, fx.Node) and self.classes.get(a) not in (CONST, SYM):
                    val, shape = tensor_val(a), self.shape(a)
                    try:
                        stride = tuple(int(self.size(s)) for s in val.stride())
                    except Exception:  # a stride that cannot be evaluated: the default layout
                        return torch.empty(shape, dtype=val.dtype, device=val.device)
                    return torch.empty_strided(shape, stride, dtype=val.dtype, device=val.device)
                return self.const(a) if isinstance(a, fx.Node) else a
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), dummy)
        else:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.const)
        value = node.target(*args, **kwargs)
        if op_name(node) in UNINITIALISED_OPS:
            value.zero_()
        return value

    def _bound(self, sym):
        return self.bindings[sym] if sym in self.bindings else self._hint(sym)

    # regions
    def run(self, order: list[fx.Node], env: dict[fx.Node, Any]) -> dict[fx.Node, Any]:
        """Evaluate ``order`` (graph order) in float64 given the values in ``env`` (updated in place)."""
        def value(a):
            if a in env:
                return env[a]
            v = self.const(a)
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v = v.to(torch.float64)
            return v

        for node in order:
            if node in env:
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
            args, kwargs = _float64_dtypes(args), _float64_dtypes(kwargs)
            try:
                env[node] = node.target(*args, **kwargs)
            except RuntimeError:
                # a probe's tensor can be laid out otherwise than the model's (random leaves are
                # contiguous): a view the model could take is the same values as a reshape
                if op_name(node) not in ("view", "_unsafe_view") or not isinstance(args[0], torch.Tensor):
                    raise
                env[node] = args[0].reshape(args[1])
        return env


def symbol_range(shape_env, sym) -> tuple[int, Optional[int]]:
    """(lower end, upper end or None) of a size symbol's range; at least 2 (smaller sizes are
    specialised), and (2, None) for a symbol without a recorded range."""
    ranges = getattr(shape_env, "var_to_range", {}) if shape_env is not None else {}
    bounds = ranges.get(sym)
    if bounds is None:
        return 2, None
    return max(2, _finite_int(bounds.lower, 2)), _finite_int(bounds.upper, None)


def _finite_int(bound, default):
    try:
        return int(bound)
    except Exception:  # an infinite bound
        return default


def backed_values(shape_env) -> dict:
    """The shape environment's hint for every backed size symbol (renamed in torch 2.13)."""
    if shape_env is None:
        return {}
    values = getattr(shape_env, "backed_var_to_val", None)
    return values if values is not None else shape_env.var_to_val


def _float64_dtypes(obj):
    """Replace floating dtypes in op arguments by float64 (casts are exact in the probes)."""
    if isinstance(obj, torch.dtype):
        return torch.float64 if obj.is_floating_point else obj
    if isinstance(obj, tuple):
        return tuple(_float64_dtypes(o) for o in obj)
    if isinstance(obj, list):
        return [_float64_dtypes(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _float64_dtypes(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.dtype != torch.float64:
        return obj.to(torch.float64)
    return obj


def const_dtypes(region: list[fx.Node], classes: dict) -> set[torch.dtype]:
    """Floating dtypes of the constant tensors that feed a region (they bound the rounding the
    model's own masks carry)."""
    dtypes = set()
    for node in region:
        for a in node.all_input_nodes:
            if classes.get(a) == CONST:
                val = tensor_val(a)
                if val is not None and val.dtype in _FLOAT_DTYPES:
                    dtypes.add(val.dtype)
    return dtypes
