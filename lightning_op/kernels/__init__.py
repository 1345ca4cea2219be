"""The Triton kernels (no torch.library here: that lives in ``ops.py``).

- :mod:`.config`: what to launch (the launch parameters of each kernel family, their heuristics,
  :func:`config_override`);
- :mod:`.launch`: how to launch (grids, strides, the segment-state passes);
- :mod:`.autotune`: per-shape timing of configurations (opt-in);
- :mod:`.chunked`, :mod:`.backward`, :mod:`.boundary`, :mod:`.decay_grad`, :mod:`.decode`,
  :mod:`.context`: the ``@triton.jit`` kernels.

``TRITON_INTERPRET=1`` must be set before this package is imported for the kernels to run on CPU
tensors through Triton's interpreter.
"""

from .config import LaunchConfig, choose_config, config_override, fused_backward_fits
from .launch import (SegmentStates, StartStatesLayout, decay_gradient, decode_step, final_state,
                     key_value_gradients, linear_attention, start_states_layout, state_itemsize_of)

__all__ = ["linear_attention", "key_value_gradients", "decay_gradient", "final_state", "decode_step", "LaunchConfig",
           "SegmentStates", "StartStatesLayout", "start_states_layout", "choose_config", "config_override",
           "fused_backward_fits", "state_itemsize_of"]
