"""muP rules (``megatron_muon/mup.py``): the numbers, that megatron's TransformerConfig ends up with the same ones
through its own muP hooks, and the config checks. No processes."""

from __future__ import annotations

import math

import pytest

from megatron_muon import mup
from megatron_muon.config import ConfigError, ModelConfig, load_config, validate
from megatron_muon.models.gpt_moe import build_transformer_config


def test_init_std_falls_as_one_over_sqrt_fan_in_from_the_base():
    assert mup.init_std(0.02, fan_in=64, base_fan_in=64) == pytest.approx(0.02)
    assert mup.init_std(0.02, fan_in=256, base_fan_in=64) == pytest.approx(0.01)
    # An expert fc2 whose d_ff_expert grows 2x: its own fan-in decides.
    assert mup.init_std(0.02, fan_in=256, base_fan_in=128) == pytest.approx(0.02 / math.sqrt(2))
    assert mup.residual_output_init_std(0.02, num_layers=2, width_multiplier=4) == pytest.approx(
        0.02 / math.sqrt(16)
    )


def test_output_multiplier_and_attention_scale():
    assert mup.output_logit_multiplier(4.0) == pytest.approx(0.25)
    # Standard 1/sqrt(d_head) at the base width, then 1/d_head: 4x the head dim -> 1/4 of the base scale x 1/... .
    assert mup.attention_softmax_scale(16, 16) == pytest.approx(1 / 4)
    assert mup.attention_softmax_scale(64, 16) == pytest.approx(4 / 64)
    assert mup.attention_softmax_scale(64, 16) == pytest.approx(mup.attention_softmax_scale(16, 16) / 4)


def test_adamw_multipliers_per_class():
    assert mup.adamw_multipliers("hidden", 4.0) == (0.25, 0.25)
    # The router is output-type: LR 1/fan_in, but its gradient (dL/dlogits x^T) keeps its size, so ε stays.
    assert mup.adamw_multipliers("router", 4.0) == (0.25, 1.0)
    for constant in ("embedding", "vector", "output"):
        assert mup.adamw_multipliers(constant, 4.0) == (1.0, 1.0)
    with pytest.raises(ValueError, match="parameter_class='bias'"):
        mup.adamw_multipliers("bias", 2.0)


def test_router_init_meets_the_spectral_condition_at_every_width():
    """Router (experts x d_model): its spectral norm must go as sqrt(fan_out/fan_in) = Θ(1/sqrt(d)) (Yang, Simon &
    Bernstein, Condition 1). Drawn with router_init_std it does, within sampling noise; drawn with the hidden rule
    sigma/sqrt(m) it stays Θ(1), i.e. sqrt(m) too large at width m."""
    import torch

    torch.manual_seed(0)
    base, experts, sigma = 64, 8, 0.02
    ratios_output_type, ratios_hidden = [], []
    for m in (1, 4, 16):
        d = base * m
        gaussian = torch.randn(experts, d, dtype=torch.float64)
        target = math.sqrt(experts / d)
        ratios_output_type.append(
            torch.linalg.matrix_norm(gaussian * mup.router_init_std(sigma, m), 2) / target
        )
        ratios_hidden.append(torch.linalg.matrix_norm(gaussian * sigma / math.sqrt(m), 2) / target)
    assert max(ratios_output_type) / min(ratios_output_type) < 1.3
    assert ratios_hidden[-1] / ratios_hidden[0] > 3.0  # sqrt(16) = 4, less the fan-out's share of the norm
    # megatron draws the hidden sigma/sqrt(m); the builder's rescale turns it into sigma/m.
    assert 0.02 / math.sqrt(4.0) * mup.router_init_rescale(4.0) == pytest.approx(
        mup.router_init_std(0.02, 4.0)
    )
    assert mup.router_init_std(0.02, 1.0) == 0.02 and mup.router_init_rescale(1.0) == 1.0


def test_muon_weight_decay_keeps_independent_decay_proportional_to_one_over_width():
    lr = 0.02  # unchanged by width under muP
    decays = {m: lr * mup.muon_weight_decay(0.1, m) for m in (1.0, 2.0, 4.0)}
    assert decays[2.0] == pytest.approx(decays[1.0] / 2) and decays[4.0] == pytest.approx(decays[1.0] / 4)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: mup.init_std(0.02, fan_in=0, base_fan_in=64), "fan_in=0"),
        (lambda: mup.output_logit_multiplier(-1.0), "width_multiplier=-1.0"),
        (lambda: mup.muon_weight_decay(-0.1, 2.0), "base_weight_decay=-0.1"),
        (
            lambda: mup.MupWidth(hidden_size=64, base_hidden_size=0, head_dim=16, base_head_dim=16),
            "base_hidden_size",
        ),
    ],
)
def test_rules_refuse_nonsense(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_scaled_width_dims_keep_ratios_and_refuse_fractions():
    dims = mup.scaled_width_dims(
        reference_hidden_size=64,
        hidden_size=256,
        dims={"ffn_hidden_size": 256, "moe_ffn_hidden_size": 128, "x": 0},
    )
    assert dims == {"ffn_hidden_size": 1024, "moe_ffn_hidden_size": 512, "x": 0}
    with pytest.raises(ValueError, match="ffn_hidden_size=100 at hidden_size=64 scales to 50"):
        mup.scaled_width_dims(
            reference_hidden_size=64, hidden_size=32, dims={"ffn_hidden_size": 100}, multiple_of=4
        )


def _std(init_method) -> float:
    return init_method.keywords["std"]


def test_megatron_transformer_config_carries_the_rules():
    """Width 256 over a base of 64 (m = 4), 4 heads: megatron's own muP fields and init methods match mup.py."""
    cfg = ModelConfig(
        num_layers=2, hidden_size=256, ffn_hidden_size=512, moe_layer_freq=[0, 1], mup_base_hidden_size=64
    )
    config = build_transformer_config(cfg, tp=1, pp=1, ep=1)
    assert config.use_mup and config.mup_width_mult == pytest.approx(4.0)
    assert config.mup_output_mult == pytest.approx(mup.output_logit_multiplier(4.0))
    assert config.softmax_scale == pytest.approx(mup.attention_softmax_scale(64, 16))
    assert _std(config.init_method) == pytest.approx(mup.init_std(0.02, fan_in=256, base_fan_in=64))
    assert _std(config.output_layer_init_method) == pytest.approx(mup.residual_output_init_std(0.02, 2, 4.0))
    assert _std(config.embedding_init_method) == pytest.approx(0.02)  # embedding (and untied LM head): base σ

    standard = build_transformer_config(ModelConfig(num_layers=2, moe_layer_freq=[0, 1]), tp=1, pp=1, ep=1)
    assert not standard.use_mup and standard.softmax_scale is None and standard.mup_output_mult == 1.0


def test_both_router_draws_give_the_output_type_std():
    """The router is drawn twice: by megatron at build (σ/√m, which the builder rescales) and again by the
    trainer's layout-independent initialization; both must give σ/m under muP and σ without it."""
    from megatron_muon.training.initialization import _adamw_matrix_std

    cfg = ModelConfig(
        num_layers=2, hidden_size=256, ffn_hidden_size=512, moe_layer_freq=[0, 1], mup_base_hidden_size=64
    )
    config = build_transformer_config(cfg, tp=1, pp=1, ep=1)
    name = "decoder.layers.1.mlp.router.weight"
    assert _adamw_matrix_std(name, config) == pytest.approx(mup.router_init_std(0.02, 4.0))
    assert _std(config.init_method) * mup.router_init_rescale(4.0) == pytest.approx(
        mup.router_init_std(0.02, 4.0)
    )
    standard = build_transformer_config(ModelConfig(num_layers=2, moe_layer_freq=[0, 1]), tp=1, pp=1, ep=1)
    assert _adamw_matrix_std(name, standard) == pytest.approx(0.02)


def test_base_multipliers_reach_megatron_on_top_of_the_width_rules():
    """Tuned base multipliers: logits × α_out / m, q·k × α_attn · √d_head,base / d_head; α_out = m, whose product
    is exactly 1, survives megatron's "1.0 means unset" default (which would make it 1/m)."""
    shape = dict(
        num_layers=2, hidden_size=256, ffn_hidden_size=512, moe_layer_freq=[0, 1], mup_base_hidden_size=64
    )
    config = build_transformer_config(
        ModelConfig(**shape, output_logit_multiplier=2.0, attention_scale_multiplier=0.5), tp=1, pp=1, ep=1
    )
    assert config.mup_output_mult == pytest.approx(2.0 / 4)
    assert config.softmax_scale == pytest.approx(0.5 * mup.attention_softmax_scale(64, 16))
    equal_to_m = build_transformer_config(ModelConfig(**shape, output_logit_multiplier=4.0), tp=1, pp=1, ep=1)
    assert equal_to_m.mup_output_mult == 1.0


def test_base_multipliers_without_mup_are_mup_at_m_1():
    """Without muP the multipliers still act (the SP arm of a muP-vs-SP comparison keeps the tuned base
    multipliers); every width rule is then the identity: standard init, 1/√d_head times α_attn."""
    config = build_transformer_config(
        ModelConfig(
            num_layers=2,
            hidden_size=256,
            moe_layer_freq=[0, 1],
            output_logit_multiplier=3.0,
            attention_scale_multiplier=2.0,
        ),
        tp=1,
        pp=1,
        ep=1,
    )
    assert config.use_mup and config.mup_width_mult == 1.0
    assert config.mup_output_mult == pytest.approx(3.0)
    assert config.softmax_scale == pytest.approx(2.0 / math.sqrt(64))
    assert _std(config.init_method) == pytest.approx(0.02)
    assert _std(config.output_layer_init_method) == pytest.approx(0.02 / math.sqrt(2 * 2))
    with pytest.raises(ValueError, match="output_logit_base=0"):
        mup.transformer_config_fields(mup.MupWidth(64, 64, 16, 16), output_logit_base=0)


def test_base_width_model_is_the_standard_one():
    """At m = 1 muP changes nothing but naming: same init, standard 1/sqrt(d_head), no logit multiplier."""
    config = build_transformer_config(
        ModelConfig(num_layers=2, hidden_size=64, moe_layer_freq=[0, 1], mup_base_hidden_size=64),
        tp=1,
        pp=1,
        ep=1,
    )
    assert config.softmax_scale == pytest.approx(1 / math.sqrt(16))
    assert config.mup_output_mult == 1.0
    assert _std(config.init_method) == pytest.approx(0.02)


def test_model_config_reaches_the_builder():
    model = ModelConfig(hidden_size=128, mup_base_hidden_size=32, mup_base_head_dim=8.0)
    width = model.mup_width()
    assert (width.multiplier, width.head_dim, width.base_head_dim) == (4.0, 32, 8.0)
    config = build_transformer_config(model, tp=1, pp=1, ep=1)
    assert config.mup_width_mult == pytest.approx(4.0)
    assert config.softmax_scale == pytest.approx(mup.attention_softmax_scale(32, 8.0))
    multiplied = build_transformer_config(
        ModelConfig(output_logit_multiplier=2.0, attention_scale_multiplier=0.5), tp=1, pp=1, ep=1
    )
    assert multiplied.mup_output_mult == pytest.approx(2.0)
    assert multiplied.softmax_scale == pytest.approx(0.5 / math.sqrt(16))
    assert ModelConfig().mup_width() is None
    assert (
        ModelConfig(hidden_size=128, mup_base_hidden_size=32).mup_width().base_head_dim == 8.0
    )  # 32 / 4 heads


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.mup_base_hidden_size=0"], "model.mup_base_hidden_size=0 must be >= 1"),
        (["model.mup_base_head_dim=16"], "model.mup_base_head_dim=16.0 needs model.mup_base_hidden_size"),
        (
            ["model.mup_base_hidden_size=64", "model.mup_base_head_dim=-1"],
            "model.mup_base_head_dim=-1.0 must be > 0",
        ),
        (
            ["model.mup_base_hidden_size=64", "optimizer.muon.scale_mode=moonlight"],
            "optimizer.muon.scale_mode='moonlight' with muP",
        ),
        (["model.output_logit_multiplier=0"], "model.output_logit_multiplier=0.0 must be > 0"),
        (
            ["model.attention_scale_multiplier=2", "model.multi_latent_attention=true"],
            "model.attention_scale_multiplier=2.0 with model.multi_latent_attention=true",
        ),
        (["optimizer.router_lr_multiplier=-1"], "optimizer.router_lr_multiplier=-1.0 must be > 0"),
        (
            ["optimizer.router_lr_multiplier=2", "model.num_moe_experts=0"],
            "optimizer.router_lr_multiplier=2.0 with model.num_moe_experts=0",
        ),
        (
            ["optimizer.router_lr_multiplier=2", "optimizer.use_muon=false"],
            "optimizer.router_lr_multiplier=2.0 applies to the router on AdamW beside Muon",
        ),
        (
            ["optimizer.router_lr_multiplier=2", "optimizer.muon.router=muon"],
            "optimizer.router_lr_multiplier=2.0 applies to the router on AdamW beside Muon",
        ),
    ],
)
def test_config_errors_name_the_value(overrides, message):
    cfg = load_config(None, ["data.mock=true", *overrides])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate(cfg, world_size=1)


def test_mup_with_adamw_only_baseline_validates():
    """The all-AdamW baseline takes muP too (megatron's get_mup_config_overrides); Muon's scale mode is moot."""
    cfg = load_config(
        None,
        [
            "data.mock=true",
            "model.mup_base_hidden_size=32",
            "optimizer.use_muon=false",
            "optimizer.muon.scale_mode=none",
        ],
    )
    validate(cfg, world_size=1)


def test_coord_check_router_lr_power_goes_through_the_base_multiplier():
    """``tools/coord_check.py --router-lr-power p``: router LR ∝ m^-p on top of muP's 1/m, i.e. the base
    multiplier times m^(1-p); p = 1 is the rule as coded."""
    from megatron_muon.bench.coord_check import router_lr_overrides

    base = load_config(
        None, ["data.mock=true", "model.mup_base_hidden_size=64", "optimizer.router_lr_multiplier=2"]
    )
    assert router_lr_overrides(base, 256, 0.5) == ["optimizer.router_lr_multiplier=4.0"]
    assert router_lr_overrides(base, 256, 1.0) == ["optimizer.router_lr_multiplier=2.0"]
    assert router_lr_overrides(base, 256, None) == []
    with pytest.raises(SystemExit, match="needs muP on"):
        router_lr_overrides(load_config(None, ["data.mock=true"]), 256, 0.5)
