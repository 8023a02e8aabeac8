"""MoE GPT models built from megatron-core specs and the run config's ``ModelConfig``:

- ``gpt_moe.py``: the builder (``ModelConfig`` -> megatron ``TransformerConfig`` -> ``GPTModel`` chunks), refusing
  what it does not build;
- ``mla_attention.py``: the local spec's multi-latent attention.

The parameter count of a ``ModelConfig`` is arithmetic on the config alone: ``config/param_count.py``.
"""
