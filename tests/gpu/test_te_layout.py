"""The Muon routing and layout recognise a real Transformer Engine model (megatron's TE spec: fused-norm QKV and
fc1, TE attention, grouped-GEMM experts with ``weight0 … weightN``) exactly as the local-spec model of the same
shape: the same logical matrices, keys and shapes, and the same parameters left to AdamW. The CPU twin with test
doubles is tests/unit/test_layout_te.py."""

from __future__ import annotations

from megatron_muon.config import ModelConfig
from megatron_muon.optim.layout import LayoutConfig, megatron_param_pieces
from megatron_muon.optim.param_groups import TE_GROUPED_LINEAR_CLASS_NAMES, route_parameters
from megatron_muon.testing.small_model import build_small_model
from megatron_muon.testing.tiny_training import DEFAULT_MODEL


def _model(pg, transformer_impl: str):
    small = build_small_model(
        ModelConfig(**DEFAULT_MODEL, transformer_impl=transformer_impl),
        seed=0,
        wrap="none",
        device="cuda",
        pg=pg,
    )
    (chunk,) = small.chunks
    return chunk, small.config


def _logical_matrices(chunk, config) -> dict[str, tuple[int, int]]:
    routing = route_parameters([chunk])
    return {
        piece.key: piece.shape
        for routed in routing.muon
        for piece in megatron_param_pieces(
            routed.name, routed.param, routed.module, config, routing.module_paths[0], LayoutConfig()
        )
    }


def test_te_model_has_the_local_models_logical_matrices(cuda_world, transformer_engine):
    local, local_config = _model(cuda_world, "local")
    te, te_config = _model(cuda_world, "transformer_engine")
    assert te_config.moe_grouped_gemm
    grouped = [
        name
        for name, module in te.named_modules()
        if {cls.__name__ for cls in type(module).__mro__} & TE_GROUPED_LINEAR_CLASS_NAMES
    ]
    assert grouped, "the TE model has no grouped-GEMM experts"
    assert any(name.endswith("weight0") for name, _ in te.named_parameters())
    assert _logical_matrices(te, te_config) == _logical_matrices(local, local_config)


def test_te_model_leaves_the_same_kinds_of_parameters_to_adamw(cuda_world, transformer_engine):
    te, _ = _model(cuda_world, "transformer_engine")
    routing = route_parameters([te])
    adamw = {r.name for r in routing.adamw}
    # TE fuses the pre-attention / pre-MLP norms into the next linear layer ("layer_norm_weight").
    assert any(name.endswith("linear_qkv.layer_norm_weight") for name in adamw)
    assert any(name.endswith("router.weight") for name in adamw)
    assert all(r.param.dim() == 2 for r in routing.muon)
    muon_elements = sum(r.param.numel() for r in routing.muon)
    all_elements = sum(p.numel() for p in te.parameters())
    embedding_and_output = sum(
        r.param.numel() for r in routing.adamw if getattr(r.param, "is_embedding_or_output_parameter", False)
    )
    router = sum(r.param.numel() for r in routing.adamw if r.name.endswith("router.weight"))
    norms = sum(r.param.numel() for r in routing.adamw if r.param.dim() == 1)
    assert muon_elements + embedding_and_output + router + norms == all_elements
