"""What the rewrite did: one record per attention rewritten or left alone, logged and kept.

Records are logged on the ``lightning_op.rewrite`` logger (INFO: rewrites and the reasons a
candidate was left alone; WARNING: internal errors, after which the graph is left as it was) and
kept in memory for :func:`report` until :func:`clear_report`.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger("lightning_op.rewrite")

_lock = threading.Lock()
_records: list["RewriteRecord"] = []
_MAX_RECORDS = 10000


@dataclass(frozen=True)
class RewriteRecord:
    """One candidate attention.

    ``stage``: ``"export"``, ``"dynamo"`` (the ``"lightning"`` backend) or ``"inductor"``
    (the Inductor graph pass). ``rewritten``: whether it now runs on ``lightning::attn``.
    ``form``: ``"parallel"``, ``"cumsum"`` or ``"chunked"``. ``decay``: the recovered slope per
    head (``lam = exp(-decay)``), None for no decay. ``scale``: the recovered output scale.
    ``layout``: the output's layout, ``"bhnd"``, ``"bnhd"`` or ``"gnd"`` ([B*H, N, D]).
    ``location``: the module path and source line of the output. ``reason``: why a candidate
    was left alone (empty for rewrites). ``head_weights``: the model's weight per head where it
    differs between heads (a temperature or output scale per head; ``scale`` is then 1 and the
    weights multiply q). ``states``: the states the op now carries (``"initial state <node>"``,
    ``"final state <node>"``). ``notes``: states the model returns that keep their own
    computation, and why. ``kv_heads``: where k and v were repeated for grouped query heads, the
    heads the op reads them with instead (the repeat is gone); ``shared_states``: each group of
    query heads then shares one state (the decay passed per kv head). ``live_decay``: where the
    decay is computed from trainable parameters, the graph node passed to the op as it (``decay``
    holds its values when the graph was rewritten); it trains.
    """

    stage: str
    rewritten: bool
    location: str
    form: Optional[str] = None
    decay: Optional[tuple[float, ...]] = None
    scale: Optional[float] = None
    layout: Optional[str] = None
    reason: str = ""
    head_weights: Optional[tuple[float, ...]] = None
    states: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    kv_heads: Optional[int] = None
    shared_states: bool = False
    live_decay: Optional[str] = None

    def __str__(self) -> str:
        if not self.rewritten:
            return f"[{self.stage}] left alone at {self.location}: {self.reason}"
        decay = _listed(self.decay) if self.decay is not None else "none"
        scale = f"scale per head {_listed(self.head_weights)}" if self.head_weights else f"scale {self.scale:.6g}"
        text = (f"[{self.stage}] rewrote {self.form} linear attention at {self.location} "
                f"(layout {self.layout}, {scale}, decay {decay}")
        if self.live_decay is not None:
            text += f" live from {self.live_decay}"
        if self.kv_heads is not None:
            text += f", {self.kv_heads} kv heads" + (" sharing states" if self.shared_states else "")
        text += "".join(f", {state}" for state in self.states) + ")"
        return text + "".join(f"; {note}" for note in self.notes)


def _listed(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def record(entry: RewriteRecord) -> None:
    with _lock:
        if len(_records) >= _MAX_RECORDS:
            del _records[: _MAX_RECORDS // 2]
        _records.append(entry)
    logger.info("%s", entry)


def report() -> list[RewriteRecord]:
    """The records so far, oldest first."""
    with _lock:
        return list(_records)


def clear_report() -> None:
    with _lock:
        _records.clear()


def counters() -> collections.Counter:
    """``Counter`` of ``"rewritten"`` / ``"left_alone"`` over the records so far."""
    with _lock:
        return collections.Counter("rewritten" if r.rewritten else "left_alone" for r in _records)


def location_of(node) -> str:
    """``module.path (file:line)`` of a graph node, from the metadata tracing left on it."""
    parts = []
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = str(list(stack.values())[-1][0])
        if path:
            parts.append(path)
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [line.strip() for line in str(trace).strip().splitlines() if line.strip().startswith("File ")]
        if lines:
            file_part = lines[-1].split(",")
            if len(file_part) >= 2:
                parts.append(f"({file_part[0][5:].strip()[1:-1].rsplit('/', 1)[-1]}:{file_part[1].strip()[5:]})")
    return " ".join(parts) if parts else node.name
