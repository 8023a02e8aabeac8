"""Bad multi-head latent attention input stops in the config checks with one line naming the value and what would
be valid, before any process starts; good input reaches the model builder."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_muon.config import ConfigError, ModelConfig, ParallelConfig
from megatron_muon.config.checks import check_model, check_parallel
from megatron_muon.config.cli import main

REPO = Path(__file__).resolve().parents[2]
PROXY = REPO / "launch" / "configs" / "moonlight_proxy_cpu.yaml"
MLA = dict(multi_latent_attention=True, num_query_groups=None, kv_lora_rank=64, qk_head_dim=32, v_head_dim=32)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(qk_pos_emb_head_dim=15), "model.qk_pos_emb_head_dim=15 must be even"),
        (dict(qk_head_dim=0), "model.qk_head_dim"),
        (dict(v_head_dim=-4), "model.v_head_dim"),
        (dict(q_lora_rank=0), "model.q_lora_rank=0 must be >= 1 or null"),
        (dict(kv_channels=48), "model.kv_channels=48 with model.multi_latent_attention=true"),
        (dict(num_query_groups=2), "model.num_query_groups=2 with model.multi_latent_attention=true"),
        (dict(mup_base_hidden_size=64), "muP with MLA is not implemented"),
    ],
)
def test_inconsistent_mla_shapes_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        check_model(ModelConfig(**(MLA | overrides)))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("model", "tp", "message"),
    [
        (
            dict(qk_pos_emb_head_dim=6, kv_lora_rank=64),
            4,
            r"parallel.tp=4 does not divide .*qk_pos_emb_head_dim=70",
        ),
        (dict(q_lora_rank=30), 4, "parallel.tp=4 does not divide model.q_lora_rank=30"),
        (dict(num_attention_heads=6), 4, "parallel.tp=4 does not divide model.num_attention_heads=6"),
    ],
)
def test_layouts_tensor_parallelism_does_not_divide_are_one_line_errors(model, tp, message):
    config = ModelConfig(**(MLA | dict(num_attention_heads=8, vocab_size=512) | model))
    check_model(config)
    with pytest.raises(ConfigError, match=message) as error:
        check_parallel(ParallelConfig(tp=tp), tp, config)
    assert "\n" not in str(error.value)


def test_the_proxy_config_validates_and_bad_overrides_stop_in_the_cli(capsys):
    assert main([str(PROXY)]) == 0
    assert "world 4 = TP2 x PP2" in capsys.readouterr().out
    assert main([str(PROXY), "model.qk_pos_emb_head_dim=7"]) == 2
    err = capsys.readouterr().err
    assert "model.qk_pos_emb_head_dim=7 must be even" in err and err.strip().count("\n") == 0, err
    assert main([str(PROXY), "model.kv_lora_rank=63"]) == 2  # 63 + 16 = 79 rows over TP2
    assert (
        "parallel.tp=2 does not divide model.kv_lora_rank + model.qk_pos_emb_head_dim=79"
        in capsys.readouterr().err
    )


def test_qk_clip_with_the_mla_latent_norms_is_allowed_but_not_with_gqa_qk_norms(capsys):
    # With MLA the norms sit on the latents, before the up projections QK-clip rescales.
    assert main([str(PROXY), "model.qk_layernorm=true", "optimizer.qk_clip.enabled=true"]) == 0
    capsys.readouterr()
    gqa = ["model.multi_latent_attention=false", "model.num_query_groups=2", "model.qk_layernorm=true"]
    assert main([str(PROXY), *gqa, "optimizer.qk_clip.enabled=true"]) == 2
    assert "the norm on queries and keys undoes any rescaling" in capsys.readouterr().err
