"""muP on a real megatron MoE GPTModel (one gloo rank): the optimizer's param groups carry muP's LR, ε and weight
decay per class, the logits leave the model times 1/m, and the weights are drawn with muP's init std."""

from __future__ import annotations

import math

import pytest

from megatron_muon import mup
from megatron_muon.testing import run_distributed

pytestmark = pytest.mark.slow

BASE, WIDTH = 32, 128  # m = 4
ADAM_LR, ADAM_MIN_LR, ADAM_EPS, MUON_LR, MUON_WD = 1e-3, 1e-4, 1e-8, 0.02, 0.1
ROUTER_MULT = 3.0


def _max_lr_by_name(chained, names):
    """Peak LR of every parameter of a megatron ``ChainedOptimizer``, by parameter name."""
    return {
        names[id(param)]: group["max_lr"]
        for member in chained.chained_optimizers
        for group in member.optimizer.param_groups
        for param in group["params"]
    }


def _build_on_rank(base_hidden_size, output_logit_multiplier=1.0):
    import torch
    from megatron.core.optimizer import get_megatron_optimizer

    from megatron_muon.config import ModelConfig
    from megatron_muon.models.gpt_moe import causal_attention_mask
    from megatron_muon.optim.build import MuonConfig, adamw_config_overrides
    from megatron_muon.testing.small_model import build_small_model

    cfg = ModelConfig(
        num_layers=2,
        hidden_size=WIDTH,
        ffn_hidden_size=2 * WIDTH,
        moe_ffn_hidden_size=WIDTH,
        moe_layer_freq=[0, 1],
        mup_base_hidden_size=base_hidden_size,
        output_logit_multiplier=output_logit_multiplier,
    )
    small = build_small_model(cfg, seed=0)
    pg, chunks = small.pg, small.chunks
    adam_config = small.adam_config(lr=ADAM_LR, min_lr=ADAM_MIN_LR, adam_eps=ADAM_EPS)
    optimizer = small.build_optimizer(
        MuonConfig(lr=MUON_LR, weight_decay=MUON_WD, compute_dtype="float32"), adam_config
    )
    names = {id(p): n for n, p in chunks[0].named_parameters()}
    with_router_multiplier = small.build_optimizer(
        MuonConfig(lr=MUON_LR, weight_decay=MUON_WD, compute_dtype="float32"),
        adam_config,
        router_lr_multiplier=ROUTER_MULT,
    )
    lr_with_router_multiplier = _max_lr_by_name(with_router_multiplier, names)
    # The all-AdamW baseline (optimizer.use_muon=false): megatron's optimizer with megatron's muP overrides.
    adamw_only = get_megatron_optimizer(
        adam_config,
        chunks,
        config_overrides=adamw_config_overrides(adam_config, chunks),
        use_gloo_process_groups=False,
        pg_collection=pg,
    )
    adamw_only_lr = _max_lr_by_name(adamw_only, names)
    groups = {}
    for member in optimizer.chained_optimizers:
        kind = "muon" if hasattr(member.optimizer, "placement") else "adamw"
        for group in member.optimizer.param_groups:
            for param in group["params"]:
                groups[names[id(param)]] = {
                    "kind": kind,
                    "max_lr": group["max_lr"],
                    "min_lr": group["min_lr"],
                    "eps": group.get("eps"),
                    "start_wd": group.get("start_wd"),
                }
    stds = {name: float(p.detach().std()) for name, p in chunks[0].named_parameters() if p.dim() == 2}

    gpt = chunks[0].module
    captured = {}

    def keep_raw_logits(module, inputs, output):
        captured["raw"] = output[0]

    gpt.output_layer.register_forward_hook(keep_raw_logits)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = chunks[0](
            input_ids=tokens,
            position_ids=torch.arange(cfg.seq_length).expand(2, -1),
            attention_mask=causal_attention_mask(cfg.seq_length),
        )
    ratio = float(logits.transpose(0, 1).norm() / captured["raw"].norm())
    return groups, stds, ratio, adamw_only_lr, lr_with_router_multiplier


@pytest.fixture(scope="module")
def built():
    return {
        "mup": run_distributed(_build_on_rank, 1, args=(BASE,))[0],
        "standard": run_distributed(_build_on_rank, 1, args=(None,))[0],
        "standard_logits_x2": run_distributed(_build_on_rank, 1, args=(None, 2.0))[0],
    }


def _one(groups, fragment):
    matches = [name for name in groups if fragment in name]
    assert matches, f"no parameter named like {fragment!r} in {sorted(groups)}"
    return groups[matches[0]]


def test_param_groups_follow_the_mup_rules(built):
    groups, _, _, _, _ = built["mup"]
    m = WIDTH / BASE
    for fragment in (
        "linear_qkv.weight",
        "linear_proj.weight",
        "mlp.linear_fc1.weight",
        "experts.local_experts.0",
    ):
        group = _one(groups, fragment)
        # Muon: the LR transfers as is (spectral scale); the weight decay coefficient goes as 1/m.
        assert group["kind"] == "muon" and group["max_lr"] == MUON_LR, (fragment, group)
        assert group["start_wd"] == pytest.approx(mup.muon_weight_decay(MUON_WD, m)), (fragment, group)
    router = _one(groups, "router.weight")
    assert router["kind"] == "adamw"
    assert router["max_lr"] == pytest.approx(ADAM_LR / m) and router["min_lr"] == pytest.approx(
        ADAM_MIN_LR / m
    )
    assert router["eps"] in (None, ADAM_EPS)  # output-type: its gradient does not shrink with width
    for fragment in ("word_embeddings.weight", "output_layer.weight", "final_layernorm.weight"):
        group = _one(groups, fragment)
        assert group["kind"] == "adamw" and group["max_lr"] == ADAM_LR and group["eps"] in (None, ADAM_EPS), (
            group
        )


def test_standard_parametrization_keeps_the_base_values(built):
    groups, _, ratio, _, _ = built["standard"]
    assert _one(groups, "router.weight")["max_lr"] == ADAM_LR
    assert _one(groups, "linear_qkv.weight")["start_wd"] == MUON_WD
    assert ratio == pytest.approx(1.0)


def test_logits_leave_the_model_times_one_over_m(built):
    _, _, ratio, _, _ = built["mup"]
    assert ratio == pytest.approx(BASE / WIDTH, rel=1e-5)


def test_weights_are_drawn_with_the_mup_std(built):
    _, stds, _, _, _ = built["mup"]
    m = WIDTH / BASE
    hidden = mup.init_std(0.02, fan_in=WIDTH, base_fan_in=BASE)
    residual = mup.residual_output_init_std(0.02, num_layers=2, width_multiplier=m)
    assert _one(stds, "linear_qkv.weight") == pytest.approx(hidden, rel=0.05)
    assert _one(stds, "router.weight") == pytest.approx(mup.router_init_std(0.02, m), rel=0.1)
    assert _one(stds, "linear_proj.weight") == pytest.approx(residual, rel=0.05)
    assert _one(stds, "experts.local_experts.0.linear_fc2.weight") == pytest.approx(residual, rel=0.05)
    assert _one(stds, "word_embeddings.weight") == pytest.approx(0.02, rel=0.05)
    assert _one(stds, "output_layer.weight") == pytest.approx(0.02, rel=0.05)
    assert not math.isclose(hidden, 0.02)


def test_adamw_only_baseline_gets_megatrons_mup_learning_rates(built):
    lrs, m = built["mup"][3], WIDTH / BASE
    for fragment in ("linear_qkv.weight", "linear_fc1.weight", "router.weight"):
        assert _one(lrs, fragment) == pytest.approx(ADAM_LR / m), fragment
    for fragment in ("word_embeddings.weight", "output_layer.weight", "final_layernorm.weight"):
        assert _one(lrs, fragment) == ADAM_LR, fragment
    assert set(built["standard"][3].values()) == {ADAM_LR}


def test_router_lr_multiplier_is_a_base_multiplier(built):
    """optimizer.router_lr_multiplier scales the router's AdamW LR at every width, on top of muP's 1/m; nothing
    else moves."""
    m = WIDTH / BASE
    for name, width_factor in (("mup", 1 / m), ("standard", 1.0)):
        plain, scaled = built[name][0], built[name][4]
        assert _one(scaled, "router.weight") == pytest.approx(ADAM_LR * ROUTER_MULT * width_factor), name
        for fragment in ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight"):
            assert _one(scaled, fragment) == _one(plain, fragment)["max_lr"], (name, fragment)


def test_output_logit_multiplier_without_mup_multiplies_the_logits(built):
    """A base logit multiplier without muP: megatron's logit hook at m = 1, the logits times the multiplier, the
    optimizer's groups as in the standard model."""
    groups, _, ratio, _, _ = built["standard_logits_x2"]
    assert ratio == pytest.approx(2.0, rel=1e-5)
    standard = built["standard"][0]
    assert {k: g["max_lr"] for k, g in groups.items()} == {k: g["max_lr"] for k, g in standard.items()}
