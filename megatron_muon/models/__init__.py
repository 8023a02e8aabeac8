"""MoE GPT models built from megatron-core specs, with what derives from the run config's ``ModelConfig``:

- ``tiny.py``: the builder (``TinyMoEConfig`` -> megatron ``TransformerConfig`` -> ``GPTModel`` chunks);
- ``mla_attention.py``: the local spec's multi-latent attention;
- ``model_bridge.py``: ``ModelConfig`` -> ``TinyMoEConfig``, refusing what the builder does not build;
- ``param_count.py``: the parameter counts of the model a ``ModelConfig`` describes.

Nothing is re-exported here, so importing the parameter count does not import megatron.
"""
