"""MoE GPT models built from megatron-core specs, with what derives from the run config's ``ModelConfig``:

- ``gpt_moe.py``: the builder (``GptMoeConfig`` -> megatron ``TransformerConfig`` -> ``GPTModel`` chunks);
- ``mla_attention.py``: the local spec's multi-latent attention;
- ``model_bridge.py``: ``ModelConfig`` -> ``GptMoeConfig``, refusing what the builder does not build;
- ``param_count.py``: the parameter counts of the model a ``ModelConfig`` describes.

Nothing is re-exported here, so importing the parameter count does not import megatron.
"""
