"""Deployment without lightning_op: ``lightning::attn_inference`` and :func:`for_package`.

``lightning::attn`` is a ``custom_op``: Inductor cannot see inside it, so an AOTInductor package of
a model that uses it calls back into this Python package when it runs. ``lightning::attn_inference``
has the same schema, but is a ``torch.library.triton_op``: when Inductor compiles it, it traces its
body — on CUDA the Triton kernels of :mod:`lightning_op.kernels` (launched through
``torch.library.wrap_triton``, so the package carries them compiled), elsewhere the loop-free
chunked form :func:`lightning_op.reference.attention_forward_scan` (ATen ops Inductor compiles).
A package built from :func:`for_package`'s program then loads and runs with torch alone::

    ep = torch.export.export(model, args, dynamic_shapes=...)
    path = torch._inductor.aoti_compile_and_package(lightning_op.deploy.for_package(ep))
    # anywhere, without lightning_op: torch._inductor.aoti_load_package(path)(*args)

Inference only (no autograd). Importing this module registers the op (and imports triton).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor

from . import backends, ops, reference
from ._export import require_program, with_graph
from ._layout import empty_bhnd, output_bnhd
from .kernels import linear_attention

__all__ = ["attn_inference", "for_package", "SEGMENT_LEN"]

#: Rows per segment on the GPU. Under export N is symbolic, so the launch cannot pick a length per
#: call as :func:`lightning_op.kernels.choose_config` does; a fixed one instead. 2048 (32 chunks of
#: 64) gives a 16K-token prefill 8 segments of parallel work when B*H is small, while the segment
#: states stay small: one float32 Dk x Dv state per 2048 rows, Dv/1024 <= 1/4 of a bf16 q's bytes.
SEGMENT_LEN = 2048


# lightning::attn's own schema: for_package swaps one op for the other in a graph, so the two
# must take the same arguments, and deriving one from the other keeps them from drifting apart
_ATTN_SCHEMA = str(torch.ops.lightning.attn.default._schema).removeprefix("lightning::attn")


@torch.library.triton_op("lightning::attn_inference", mutates_args=(), schema=_ATTN_SCHEMA)
def attn_inference(q: Tensor, k: Tensor, v: Tensor, decay: Optional[Tensor] = None, scale: float = 1.0,
                   initial_state: Optional[Tensor] = None,
                   cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``lightning::attn``'s forward (same schema, arguments and results), traceable into a package:
    grouped heads and packed sequences (``cu_seqlens``) included.

    This function is also the op's fake, so it must run on fake tensors with symbolic N and S: no
    branch on them and no reads of values where tracing (real calls check the decays and
    ``cu_seqlens`` as ``lightning::attn`` does). CPU tensors never reach ``wrap_triton`` (it
    cannot trace interpreted kernels).

    Reach it through :func:`for_package` after export. Exporting a direct call with a dynamic
    length fails: the CPU form's padding to whole chunks adds shape guards (N > 64, N not a
    multiple of 64) that export reports; the AOTInductor package does not check them, and the
    tests run CPU packages at N = 1, 63, 64, 65 and 300.
    """
    ops.validate(q, k, v, decay, scale, initial_state, cu_seqlens)
    decay, initial_state = ops.prepare_decay(decay), ops.as_float32(initial_state)
    if q.device.type == "cuda":
        return kernel_forward(q, k, v, decay, scale, initial_state, cu_seqlens)
    out, final = reference.attention_forward_scan(q, k, v, decay, scale, initial_state, cu_seqlens=cu_seqlens)
    if output_bnhd(q):  # stored as lightning::attn stores it (the graph's later views were traced on that)
        out = empty_bhnd(out.shape, out.dtype, out.device, True).copy_(out)
    return out, final.to(torch.float32)


def kernel_forward(q: Tensor, k: Tensor, v: Tensor, decay: Optional[Tensor], scale: float,
                   initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The CUDA body of :func:`attn_inference` on prepared inputs: the kernels launched through
    ``wrap_triton`` with N and S symbolic. A packed batch's work tables are sized from N and S
    alone (``ceil(N / SEGMENT_LEN) + S`` segments, see ``kernels.launch._packed_plan``) and built on
    the device, so nothing is read on the host. Grouped heads run per query head, as
    ``backends.forward`` does: a decay ``[Hkv]`` is repeated over each group, and where a group
    shares its state the group's first head's is returned (contiguous, as ``lightning::attn``'s fake).
    The output is stored in q's layout, as ``lightning::attn`` stores it."""
    h = q.shape[1]
    out, final = linear_attention(
        q, k, v, backends.compute_decay(decay, h), out_scale=scale, initial_state=initial_state,
        segment_len=SEGMENT_LEN, traceable=True, cu_seqlens=cu_seqlens, out_bnhd=output_bnhd(q),
    )
    state_heads = reference.state_heads(h, k.shape[1], decay)
    if state_heads < h:
        final = final[:, :: h // state_heads].contiguous()
    return out, final


# every op of this library that a package could call; only attn has a standalone twin
_SWAPS = {torch.ops.lightning.attn.default: torch.ops.lightning.attn_inference.default}


def _lightning_op_in(node: torch.fx.Node) -> Optional[torch._ops.OpOverload]:
    """The lightning op a node calls, directly or through a higher-order op such as
    ``auto_functionalized`` (how export records in-place ops like ``attn_step``)."""
    for candidate in (node.target, *node.args):
        if isinstance(candidate, torch._ops.OpOverload) and candidate.namespace == "lightning":
            return candidate
    return None


def for_package(ep: "torch.export.ExportedProgram") -> "torch.export.ExportedProgram":
    """Return a copy of ``ep`` whose ``lightning::attn`` calls run ``lightning::attn_inference``.

    Compile the result with ``torch._inductor.aoti_compile_and_package``: the package then needs
    torch only, not lightning_op, to load and run. Raises ``ValueError`` naming the node if the
    graph calls another lightning op (``attn_bwd`` of a training graph, the in-place ``attn_step``):
    left in place, it would make the package depend on lightning_op again, which is what this
    transform exists to avoid. Export the decode path through ``lightning_attn(...,
    initial_state=state, output_final_state=True)`` instead of ``attn_step``. ``ep`` is unchanged.
    """
    require_program(ep, "for_package")
    for node in ep.graph.nodes:
        op = _lightning_op_in(node)
        if op is not None and op not in _SWAPS:
            raise ValueError(
                f"for_package: node {node.name!r} calls {op}, which has no standalone (triton_op) form: "
                f"only lightning.attn can be packaged without lightning_op. For decoding, export "
                f"lightning_attn(..., initial_state=state, output_final_state=True) instead of attn_step; "
                f"backward ops appear only in training graphs, which AOTInductor packages do not serve"
            )
    gm = copy.deepcopy(ep.graph_module)
    names = [node.name for node in ep.graph.nodes]
    if [node.name for node in gm.graph.nodes] != names:
        raise RuntimeError("for_package: copying the graph renamed its nodes; please report this")
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _SWAPS:
            node.target = _SWAPS[node.target]
    gm.recompile()
    return with_graph(ep, gm, copy.copy(ep.graph_signature))
