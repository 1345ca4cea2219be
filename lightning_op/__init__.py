"""lightning_op: causal linear attention with per-head decay (Lightning Attention-2) for PyTorch.

Importing this package registers ``torch.ops.lightning.attn`` and ``torch.ops.lightning.attn_bwd``.
"""

from . import nn, ops  # noqa: F401  (importing ops registers the ops)
from . import distributed  # noqa: F401  (registers the DTensor sharding rules once DTensor is imported)
from .functional import attn_step, disable_autotune, enable_autotune, lightning_attn
from .reference import slopes
from .rewrite import report as rewrite_report, rewrite

__all__ = ["lightning_attn", "attn_step", "slopes", "rewrite", "rewrite_report", "enable_autotune", "disable_autotune"]
__version__ = "0.1.0"
