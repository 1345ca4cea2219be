"""What finding attention in a graph and checking it share: one reading of a region as attention
(:class:`Candidate`), the stages a reading fails at (:class:`Stage`), and how much probing costs.

Matching (``recognise.py``) proposes candidates; the checks (``checks.py``, ``lengths.py``) take
one candidate and a :class:`graph.Evaluator` and either pass it or raise :class:`Reject`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from . import graph as g

# Probing evaluates the region (O(N^2) for the parallel form) a few dozen times in float64:
# symbolic sizes above PROBE_SIZE are probed at PROBE_SIZE, and a static region whose largest
# tensor passes the probe limit on its device is left alone (with the advice to trace it with a
# dynamic length). On 2 CPU cores 2**25 elements took 25 s to verify; 2**22 takes about 3 s.
PROBE_SIZE = 96
_MAX_PROBE_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}  # float64 probes: 512 MB a tensor on GPU


def probe_limit(device: torch.device) -> int:
    """Elements the largest tensor of a region may have for the region to be probed whole."""
    return _MAX_PROBE_ELEMENTS.get(device.type, _MAX_PROBE_ELEMENTS["cpu"])


class Stage(enum.IntEnum):
    """What one reading of a region failed at, ranked. When several readings of a region fail
    (which input is q, k or v; which axis is the sequence), and when overlapping regions do (an
    output and a transpose of it), the highest-ranked failure is reported: it comes from the
    reading that got furthest towards attention. The ranks mostly follow the order the checks run
    in, but a reading the op cannot take (``SUPPORT``) is refused before it is probed, and a region
    written in place before it is read at all; either outranks what the probes find, since it
    says what would have to change."""

    SHAPES = 0  # a one-hot probe's output has the wrong shape or mixes value channels: q, k, v misread
    MATCH = 1  # no three inputs, other dependencies, too large to probe; no common scale on the diagonal
    DECAY = 2  # the weights along the sequence are not c * lam^(t - s) with lam <= 1
    CAUSAL = 3  # a position sees later ones, or the mask is no function of t - s
    VALUES = 4  # random q, k, v disagree, at the traced length or at another a symbolic one takes
    PACKED = 5  # attention over one sequence, but its mask per packed sequence is not the op's (packing.py)
    SUPPORT = 6  # attention, perhaps, but not what lightning::attn takes (dtypes, head dims, a learnable decay)
    IN_PLACE = 7  # part of the region is written in place, which the probes cannot follow
    INTERNAL = 8  # the recogniser failed: reported, never a reason to rewrite


class Reject(Exception):
    """The candidate is not causal linear attention with a decay that lightning::attn takes (the
    message says why); ``stage`` says how far its checks got."""

    def __init__(self, message: str, stage: Stage = Stage.MATCH):
        super().__init__(message)
        self.stage = stage


# ----------------------------------------------------------------------------- layouts


def size_key(s):
    """A size as something comparable across tensors: its expression when symbolic."""
    return s.node.expr if isinstance(s, torch.SymInt) else s


def _to_canonical(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2) if layout == "bnhd" else x.unsqueeze(0) if layout == "gnd" else x


def _from_canonical(x: torch.Tensor, layout: str) -> torch.Tensor:
    y = x.transpose(1, 2) if layout == "bnhd" else x[0] if layout == "gnd" else x
    return y.contiguous()


# A state's layouts: [B, H, Dk, Dv] as the op keeps it, [B, H, Dv, Dk] (written v^T k), and the
# same with batch and heads flattened ([G, Dk, Dv], [G, Dv, Dk]) beside a [G, N, D] output.
STATE_LAYOUTS = ("bhkv", "bhvk", "gkv", "gvk")


def state_to_canonical(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A state in ``layout`` as [B, H, Dk, Dv]."""
    if layout.startswith("g"):
        x = x.unsqueeze(0)
    return x.transpose(-1, -2) if layout.endswith("vk") else x


def state_from_canonical(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A [B, H, Dk, Dv] state in ``layout``."""
    if layout.endswith("vk"):
        x = x.transpose(-1, -2)
    return (x[0] if layout.startswith("g") else x).contiguous()


def state_layouts(shape, reading: "Reading", key_dim, value_dim) -> list[str]:
    """The layouts in which a tensor of ``shape`` is a state of this reading's batch and heads,
    with key dim ``key_dim`` and value dim ``value_dim`` (sizes as ``size_key``)."""
    keys = tuple(size_key(s) for s in shape)
    if reading.out_layout == "gnd":
        lead, prefix = (reading.heads,), "g"
    else:
        lead, prefix = (reading.batch, reading.heads), "bh"
    if len(keys) != len(lead) + 2 or keys[:len(lead)] != lead:
        return []
    found = []
    if keys[len(lead):] == (key_dim, value_dim):
        found.append(prefix + "kv")
    if keys[len(lead):] == (value_dim, key_dim):
        found.append(prefix + "vk")
    return found


@dataclass(frozen=True)
class Reading:
    """How the output's dims map to batch, heads, sequence and value dim (sizes as ``size_key``)."""

    out_layout: str  # "bhnd", "bnhd" or "gnd"
    batch: object
    heads: object
    length: object
    value_dim: object

    def describe(self) -> str:
        """The reading in the model's terms, for messages."""
        dims = {"bhnd": "[B, H, N, D]", "bnhd": "[B, N, H, D]", "gnd": "[B*H, N, D]"}[self.out_layout]
        return f"read as {dims}: H = {self.heads} heads, N = {self.length} positions"

    def plausible(self) -> bool:
        """Whether the axis read as the sequence is as long as the one read as heads (or symbolic):
        where two readings fail alike, the message of the plausible one says more."""
        return not isinstance(self.length, int) or not isinstance(self.heads, int) or self.length >= self.heads

    def layout_of(self, shape) -> list[str]:
        """The layouts in which a tensor of ``shape`` has this reading's batch, heads and sequence."""
        keys = tuple(size_key(s) for s in shape)
        if self.out_layout == "gnd":
            return ["gnd"] if len(keys) == 3 and keys[:2] == (self.heads, self.length) else []
        if len(keys) != 4:
            return []
        found = []
        if keys[:3] == (self.batch, self.heads, self.length):
            found.append("bhnd")
        if keys[:3] == (self.batch, self.length, self.heads):
            found.append("bnhd")
        return found


def readings(output: fx.Node) -> list[Reading]:
    """The ways the output could be laid out: [B, H, N, D] or [B, N, H, D], or [G, N, D]."""
    shape = [size_key(s) for s in g.tensor_val(output).shape]
    if len(shape) == 4:
        b, x, y, d = shape
        return [Reading("bhnd", b, x, y, d), Reading("bnhd", b, y, x, d)]
    if len(shape) == 3:
        return [Reading("gnd", 1, shape[0], shape[1], shape[2])]
    return []


# ----------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One reading of a region as attention: the nodes taken as q, k and v in their layouts, the
    output in the reading's layout, and the region computing the output from them alone."""

    output: fx.Node
    inputs: tuple[fx.Node, fx.Node, fx.Node]  # q, k, v
    layouts: tuple[str, str, str]  # "bhnd", "bnhd" or "gnd" for q, k, v
    reading: Reading
    region: list[fx.Node] = field(repr=False)  # graph order
    tolerance: float  # relative, of the probes: the rounding of the model's own constant masks
    state_in: Optional[fx.Node] = None  # a state the model carries in (the op's initial_state)
    state_layout: Optional[str] = None  # one of STATE_LAYOUTS
    # a tensor computed from trainable parameters alone, one number per head, that the mask is built
    # from: the decay passed to the op live (its value here is the parameters' current one)
    decay_source: Optional[fx.Node] = None
    packing: Optional[object] = None  # packing.Packing: a mask per packed sequence, all true while probed

    @property
    def device(self) -> torch.device:
        return g.tensor_val(self.inputs[0]).device

    def canonical_shapes(self, ev: g.Evaluator) -> list[tuple[int, ...]]:
        """q's, k's and v's shapes as [B, H, N, D] at ``ev``'s sizes."""
        shapes = []
        for node, layout in zip(self.inputs, self.layouts):
            s = ev.shape(node)
            shapes.append((1, *s) if layout == "gnd" else (s[0], s[2], s[1], s[3]) if layout == "bnhd" else s)
        return shapes

    def state_shape(self, ev: g.Evaluator) -> tuple[int, int, int, int]:
        """[B, H, Dk, Dv] at ``ev``'s sizes."""
        (b, h, _, dk), _, (_, _, _, dv) = self.canonical_shapes(ev)
        return b, h, dk, dv

    def env(self, ev: g.Evaluator, q, k, v, state: Optional[torch.Tensor] = None,
            decay_value: Optional[torch.Tensor] = None) -> dict:
        """Values for the region's inputs from [B, H, N, D] q, k, v and a [B, H, Dk, Dv] state
        (zeros when not given) in float64; the decay source at ``decay_value`` (its current value
        when not given)."""
        env = {node: _from_canonical(x, layout) for node, x, layout in zip(self.inputs, (q, k, v), self.layouts)}
        if self.decay_source is not None:
            if decay_value is None:
                decay_value = ev.const(self.decay_source)
            env[self.decay_source] = decay_value.to(torch.float64)
        if self.state_in is not None:
            if state is None:
                state = torch.zeros(self.state_shape(ev), dtype=torch.float64, device=q.device)
            env[self.state_in] = state_from_canonical(state, self.state_layout)
        return env

    def run(self, ev: g.Evaluator, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            state: Optional[torch.Tensor] = None, decay_value: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The region on [B, H, N, D] q, k and v (and the state carried in, zero unless given; the
        decay source at ``decay_value``) in float64: its output, as [B, H, N, Dv]."""
        out = ev.run(self.region, self.env(ev, q, k, v, state, decay_value))[self.output]
        return _to_canonical(out, self.reading.out_layout)
