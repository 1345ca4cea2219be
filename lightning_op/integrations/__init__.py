"""Integrations with other libraries' models, each in its own module and imported only on request
(``import lightning_op`` imports none of them, nor the libraries they patch).

- :mod:`lightning_op.integrations.transformers`: ``patch_model`` / ``unpatch_model`` for Hugging
  Face transformers models in eager mode (MiniMax's lightning-attention layers run the op).
"""
