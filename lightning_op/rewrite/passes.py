"""The entry points: the graph pass itself, the export pass, the dynamo backend and the Inductor
graph pass. Every one leaves its graph exactly as it was on any internal error (and logs why)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import pathlib
from typing import Callable, Optional, Union

import torch
from torch import fx

from .._export import require_program, with_graph
from . import graph as g
from .recognise import find_matches
from .replace import differentiable_copies, replace
from .report import RewriteRecord, location_of, logger, record


def rewrite_graph(gm: fx.GraphModule, placeholder_class: Callable[[fx.Node], str], const_values: dict,
                  stage: str) -> tuple[list[RewriteRecord], dict[str, str]]:
    """Rewrite ``gm`` in place. Returns the records and a map from replaced output names to new ones.

    ``placeholder_class(node)`` says what a placeholder is (``graph.CONST``/``PARAM``/``INPUT``);
    ``const_values`` holds the value of every constant placeholder. Raises on internal errors:
    callers keep an untouched copy to fall back to.
    """
    written = g.written_in_place(gm.graph)
    classes = g.classify(gm.graph, placeholder_class, written)
    rewritten, renamed = [], {}

    def on_match(match):
        states = [f"initial state {match.state_in.name}"] if match.state_in is not None else []
        states += [f"final state {final.node.name}" for final in match.final_states]
        rewritten.append((match, location_of(match.output), tuple(states)))
        renamed.update({old: new.name for old, new in replace(gm, match).items()})

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # Inductor runs its passes under a fake mode; the probes need real tensors
        rejections = find_matches(gm, classes, const_values, on_match, written)
    records = [RewriteRecord(stage, True, location, match.form, match.decay, match.scale, match.out_layout,
                             head_weights=match.head_weights, states=states, notes=tuple(match.notes),
                             kv_heads=match.kv_heads, shared_states=match.shared_states,
                             live_decay=None if match.decay_source is None else match.decay_source.name)
               for match, location, states in rewritten]
    records.extend(RewriteRecord(stage, False, location_of(r.output), reason=r.reason) for r in rejections)
    if renamed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return records, renamed


def _publish(records: list[RewriteRecord]) -> None:
    for entry in records:
        record(entry)


# ----------------------------------------------------------------------------- export


def rewrite(ep: "torch.export.ExportedProgram") -> "torch.export.ExportedProgram":
    """Return ``ep`` with its causal linear attention running on ``torch.ops.lightning.attn``.

    Buffers, constants and parameters that do not require grad count as constants (their values
    are read from ``ep``); masks built from them or from the sequence length are checked by
    value. A program that writes in place (a mask filled row by row, ``scores.masked_fill_``) is
    analysed as ``ep.run_decompositions({})``, where such writes are functional, and that form is
    returned if something was rewritten. The result runs, saves and loads like any exported program
    (``torch.export.load`` needs ``import lightning_op`` first). Returns ``ep`` itself when
    nothing was rewritten or on an internal error (logged on ``lightning_op.rewrite``); see
    :func:`lightning_op.rewrite.report`.
    """
    require_program(ep, "rewrite")
    source, stage = ep, "export"
    if g.written_in_place(ep.graph):
        try:
            source, stage = ep.run_decompositions({}), "export, functionalized"
        except Exception as error:  # analyse the program as it is: its writes are then refused
            logger.info("rewrite: could not functionalize the program (%r); in-place writes stay", error)
    result, records = _rewrite_program(source, stage)
    _publish(records)
    return ep if result is None else result


def _rewrite_program(ep, stage: str):
    """(the rewritten program or None, the records) for one attempt; None also on an internal error."""
    from torch.export.graph_signature import InputKind, TensorArgument

    try:
        gm = copy.deepcopy(ep.graph_module)  # may rename placeholders (`input` -> `input_1`)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        specs = dict(zip(placeholders, ep.graph_signature.input_specs))
        const_values = {}

        def placeholder_class(node):
            spec = specs.get(node)
            if spec is not None and not isinstance(spec.arg, TensorArgument):
                return g.INPUT
            if spec is None or spec.kind == InputKind.USER_INPUT:
                return g.INPUT
            if spec.kind == InputKind.PARAMETER:
                value = ep.state_dict[spec.target]
                if value.requires_grad:  # its current value, for a decay computed from it (passed live)
                    const_values[node] = value.detach()
                    return g.PARAM
            elif spec.kind == InputKind.BUFFER:
                value = ep.state_dict[spec.target] if spec.persistent else ep.constants[spec.target]
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                value = ep.constants[spec.target]
            else:
                return g.INPUT
            const_values[node] = value.detach()
            return g.CONST

        records, renamed = rewrite_graph(gm, placeholder_class, const_values, stage)
        if renamed and stage.endswith("functionalized"):
            differentiable_copies(gm)
    except Exception as error:  # never break the caller's program
        logger.warning("rewrite: left the program unchanged after an internal error: %r", error, exc_info=True)
        return None, []
    if not renamed:
        return None, records
    for placeholder, spec in specs.items():
        if isinstance(spec.arg, TensorArgument):
            renamed.setdefault(spec.arg.name, placeholder.name)
    signature = copy.copy(ep.graph_signature)
    signature.input_specs = [_renamed_spec(spec, renamed) for spec in ep.graph_signature.input_specs]
    signature.output_specs = [_renamed_spec(spec, renamed) for spec in ep.graph_signature.output_specs]
    return with_graph(ep, gm, signature), records


def _renamed_spec(spec, renamed):
    from torch.export.graph_signature import TensorArgument

    if isinstance(spec.arg, TensorArgument) and renamed.get(spec.arg.name, spec.arg.name) != spec.arg.name:
        spec = copy.copy(spec)
        spec.arg = TensorArgument(name=renamed[spec.arg.name])
    return spec


# ----------------------------------------------------------------------------- dynamo backend

# torch-level calls that any attention region needs; graphs without them are not traced to ATen
_CONTRACTIONS = {"matmul", "bmm", "mm", "einsum", "cumsum", "__matmul__", "baddbmm", "tensordot"}
# ... or a product of two tensors reduced by a sum: a contraction written elementwise
# (``(q[:, t, :, :, None] * state).sum(-2)`` in a token loop)
_PRODUCTS, _REDUCTIONS = {"mul", "__mul__"}, {"sum", "mean"}


def _torch_name(node: fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", "")
    return node.target if node.op == "call_method" else ""


def _has_contraction(gm: fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        name = _torch_name(node)
        if name in _CONTRACTIONS:
            return True
        if name in _REDUCTIONS and node.args and isinstance(node.args[0], fx.Node):
            product = node.args[0]
            if _torch_name(product) in _PRODUCTS and all(isinstance(a, fx.Node) for a in product.args[:2]):
                return True
    return False


def _is_module_state(source) -> bool:
    """Whether a dynamo source reaches its tensor through an nn.Module (attribute, buffer,
    parameter) or a global, rather than through the frame's arguments."""
    while source is not None:
        kind = type(source).__name__
        if "NNModule" in kind or "Global" in kind:
            return True
        source = getattr(source, "base", None)
    return False


def _dynamo_placeholder_class(grapharg) -> str:
    """Module state (buffers, frozen parameters, tensor attributes) and globals are constant;
    trainable parameters are ``param``; the frame's own inputs are ``input``."""
    if grapharg is None:
        return g.INPUT
    example = getattr(grapharg, "example", None)
    if not isinstance(example, torch.Tensor):
        return g.INPUT
    if isinstance(example, torch.nn.Parameter) and example.requires_grad:
        return g.PARAM
    return g.CONST if _is_module_state(getattr(grapharg, "source", None)) else g.INPUT


def rewrite_dynamo_graph(gm: fx.GraphModule, records: Optional[list] = None) -> Optional[fx.GraphModule]:
    """Trace a dynamo graph to (pre-dispatch) ATen and rewrite it; None when nothing was rewritten.
    A graph that writes in place is traced again, functionalized, and that trace is analysed. The
    records are published, or appended to ``records`` for the caller to publish once the graph has
    compiled."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value") for n in placeholders]
    modes = [f.fake_mode for f in fakes if isinstance(f, torch.Tensor) and hasattr(f, "fake_mode")]
    if not modes or any(f is None for f in fakes):
        return None
    aten_gm, stage = _trace(gm, fakes, modes[0], functional=False), "dynamo"
    if g.written_in_place(aten_gm.graph):
        try:
            aten_gm, stage = _trace(gm, fakes, modes[0], functional=True), "dynamo, functionalized"
        except Exception as error:  # analyse the graph as it is: its writes are then refused
            logger.info("lightning backend: could not functionalize the graph (%r); in-place writes stay", error)
    aten_placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    if len(aten_placeholders) != len(placeholders):
        return None
    const_values, kinds = {}, {}
    for original, traced in zip(placeholders, aten_placeholders):
        grapharg = original.meta.get("grapharg")
        kinds[traced] = _dynamo_placeholder_class(grapharg)
        if kinds[traced] in (g.CONST, g.PARAM):  # a parameter's current value: a decay from it is passed live
            const_values[traced] = grapharg.example.detach()
    found, renamed = rewrite_graph(aten_gm, kinds.__getitem__, const_values, stage)
    if renamed and stage.endswith("functionalized"):
        differentiable_copies(aten_gm)
    if records is None:
        _publish(found)
    else:
        records.extend(found)
    return aten_gm if renamed else None


def _trace(gm: fx.GraphModule, fakes: list, fake_mode, functional: bool) -> fx.GraphModule:
    """``gm`` traced to ATen: pre-dispatch, or functionalized (writes become new tensors; writes to
    the graph's inputs are copied back at its end)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    run = torch.fx.Interpreter(gm).run
    if functional:
        run = torch.func.functionalize(run, remove="mutations_and_views")
    with torch.fx.traceback.preserve_node_meta(), fake_mode:
        return make_fx(run, pre_dispatch=not functional, _allow_non_fake_inputs=True)(*fakes)


def _inner_compiler(inner: Union[str, Callable]) -> Callable:
    if callable(inner):
        return inner
    if inner == "inductor":
        def inductor(gm, example_inputs, mode=None, options=None):
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            patches = dict(list_mode_options(mode)) if mode else {}
            patches.update(options or {})
            return compile_fx(gm, example_inputs, config_patches=patches)

        return inductor
    from torch._dynamo import lookup_backend

    backend = lookup_backend(inner)
    return lambda gm, example_inputs, **kwargs: backend(gm, example_inputs, **kwargs)


def _restarts_dynamo(error: Exception) -> bool:
    """Whether ``error`` asks dynamo to trace the frame again (``TensorifyScalarRestartAnalysis`` when a
    float it left symbolic must be specialised): passed on, not taken for a failed compile."""
    from torch._dynamo.exc import RestartAnalysis

    return isinstance(error, RestartAnalysis)


def make_backend(inner: Union[str, Callable] = "inductor") -> Callable:
    """A ``torch.compile`` backend: the rewrite, then ``inner`` (``"inductor"``, the default, takes
    ``mode=`` and ``options=`` as ``torch.compile`` passes them; any registered backend name, e.g.
    ``"aot_eager"``, or a backend callable)."""
    compile_inner = _inner_compiler(inner)

    def lightning_backend(gm: fx.GraphModule, example_inputs, **kwargs):
        rewritten, records = None, []
        if _has_contraction(gm):
            try:
                rewritten = rewrite_dynamo_graph(gm, records)
            except Exception as error:  # never break the user's compile
                logger.warning("lightning backend: compiling the graph unchanged after an internal error: %r",
                               error, exc_info=True)
        if rewritten is not None:
            try:
                compiled = compile_inner(rewritten, example_inputs, **kwargs)
            except Exception as error:
                if _restarts_dynamo(error):  # dynamo's own signal (specialise a float, trace again): no news
                    raise
                logger.warning("lightning backend: the rewritten graph failed to compile (%r); compiling the "
                               "original", error, exc_info=True)
                records = [dataclasses.replace(r, rewritten=False, reason=f"the rewritten graph failed to compile "
                                               f"({error!r}), so the original runs") if r.rewritten else r
                           for r in records]
            else:
                _publish(records)
                return compiled
        _publish(records)
        return compile_inner(gm, example_inputs, **kwargs)

    return lightning_backend


lightning_backend = make_backend("inductor")


def _capturing_scalars():
    """Dynamo traces ``Tensor.item()`` into the graph (as ``fullgraph=True`` does) instead of breaking
    it there: slopes read one by one with ``.item()`` then build their mask inside the graph, where
    the rewrite can check it, rather than arriving as an input it cannot."""
    import torch._dynamo

    return torch._dynamo.config.patch(capture_scalar_outputs=True)


def compile(model: Optional[Callable] = None, *, fullgraph: bool = False, dynamic: Optional[bool] = None,
            mode: Optional[str] = None, options: Optional[dict] = None, disable: bool = False,
            inner: Union[str, Callable] = "inductor"):
    """``torch.compile(model, backend="lightning", ...)`` that also rewrites attention whose mask is
    built from slopes read with ``.item()``.

    Under plain ``torch.compile`` without ``fullgraph=True``, dynamo breaks the graph at ``.item()``
    unless ``torch._dynamo.config.capture_scalar_outputs`` is set, and the mask then reaches the
    rewrite as an input of unknown value. This entry point sets that option for the frames it
    compiles, and only while they are compiled and run (dynamo's ``backend_ctx_ctor``), leaving the
    global setting as it was. Its arguments are ``torch.compile``'s; ``inner`` is the compiler behind
    the rewrite (see :func:`make_backend`). Usable as a decorator (``@compile(dynamic=True)``).
    """
    if model is None:
        return functools.partial(compile, fullgraph=fullgraph, dynamic=dynamic, mode=mode, options=options,
                                 disable=disable, inner=inner)
    kwargs = {}
    if mode is not None and mode != "default":
        kwargs["mode"] = mode
    if options:
        kwargs["options"] = options
    import torch._dynamo

    backend = functools.partial(make_backend(inner), **kwargs)
    # torch.compile drops a backend's context (its wrapper has none), so go through dynamo directly
    backend.backend_ctx_ctor = _capturing_scalars
    return torch._dynamo.optimize(backend, nopython=fullgraph, dynamic=dynamic, disable=disable)(model)


# ----------------------------------------------------------------------------- Inductor pass


def _source_hash() -> bytes:
    """The rewrite's sources and support.py (what the op accepts decides what is rewritten): part of
    Inductor's FX-graph cache key, so a cached graph never outlives a change to either."""
    digest = hashlib.sha256()
    here = pathlib.Path(__file__).parent
    for path in sorted(here.glob("*.py")) + [here.parent / "support.py"]:
        digest.update(path.read_bytes())
    return digest.digest()


@functools.lru_cache(maxsize=None)
def _inductor_pass_class() -> type:
    """Built on first use: subclassing Inductor's ``CustomGraphPass`` imports Inductor (and dynamo),
    about a second that ``import lightning_op`` should not pay."""
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:  # pragma: no cover - torch without Inductor
        CustomGraphPass = object

    class InductorPass(CustomGraphPass):
        """The rewrite as an Inductor ``CustomGraphPass``, for users who keep their own Inductor setup::

            from lightning_op.rewrite import InductorPass
            torch._inductor.config.joint_custom_pre_pass = InductorPass()

        It rewrites inference graphs (no gradient needed). Inductor's graphs take parameters and
        buffers as inputs without their values, so only masks built in ``forward`` (from the sequence
        length and literals) or frozen into the graph (``torch._inductor.config.freezing = True``) can
        be checked; a training (joint) graph is left alone: use ``backend="lightning"``, which
        rewrites before autograd. ``uuid()`` changes with this package's source, so Inductor's FX
        graph cache does not replay graphs compiled by another version.
        """

        def __call__(self, graph: fx.Graph) -> None:
            gm = graph.owning_module
            if gm is None:
                return
            placeholders = [n for n in graph.nodes if n.op == "placeholder"]
            if any(n.name.startswith("tangents") for n in placeholders):
                logger.info("inductor pass: left a joint (training) graph alone; use backend='lightning' to rewrite "
                            "training graphs")
                return
            snapshot = copy.deepcopy(graph)
            try:
                records, _ = rewrite_graph(gm, lambda n: g.INPUT, {}, "inductor")
            except Exception as error:
                logger.warning("inductor pass: left the graph unchanged after an internal error: %r", error,
                               exc_info=True)
                _restore(graph, snapshot)
                gm.recompile()
                return
            _publish(records)

        def uuid(self) -> bytes:
            return _source_hash()

    InductorPass.__module__ = __name__
    return InductorPass


def __getattr__(name: str):
    if name == "InductorPass":
        return _inductor_pass_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _restore(graph: fx.Graph, snapshot: fx.Graph) -> None:
    """Put ``snapshot``'s nodes back into ``graph`` (Inductor holds on to the graph object)."""
    for node in reversed(list(graph.nodes)):
        node.args, node.kwargs = (), {}
    for node in reversed(list(graph.nodes)):
        graph.erase_node(node)
    result = graph.graph_copy(snapshot, {})
    graph.output(result)
