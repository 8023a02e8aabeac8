"""The typed pretraining config: the launch YAMLs load and validate at their world size, overrides apply,
mistakes fail with one-line messages naming the key and values, and the parameter count is right. No processes
(one subprocess for the CLI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_muon.config import (
    ConfigError,
    DataBlendEntry,
    ModelConfig,
    ParallelConfig,
    ParallelDims,
    PretrainConfig,
    load_config,
    padded_vocab_size,
    to_yaml,
    validate,
    validate_tokenizer,
)
from megatron_muon.config.cli import main
from megatron_muon.config.param_count import count_parameters

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "launch" / "configs").glob("*.yaml"))
TINY = REPO / "launch" / "configs" / "tiny_cpu.yaml"


def test_the_launch_configs_exist():
    assert {p.name for p in CONFIGS} >= {"tiny_cpu.yaml", "moe_1b_8gpu.yaml", "moonlight_16b_a3b_64gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_launch_config_validates_at_its_world_size_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    dims = validate(cfg)
    assert dims.world_size == cfg.parallel.world_size
    assert dims.tp * dims.pp * dims.cp * dims.dp == dims.world_size
    saved = tmp_path / "resolved.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(saved) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launch_config_comments_state_the_true_parameter_counts(path):
    total, active = count_parameters(load_config(path).model)
    text = path.read_text()
    assert f"{total:,} total" in text, f"{path.name}: the comment does not state total={total:,}"
    assert f"{active:,} active" in text, f"{path.name}: the comment does not state active={active:,}"


def test_tiny_cpu_is_the_documented_four_process_layout():
    cfg = load_config(TINY)
    dims = validate(cfg)
    assert (dims.tp, dims.pp, dims.ep, dims.etp, dims.dp, dims.expert_dp) == (2, 2, 2, 1, 1, 1)
    assert dims.sequence_parallel
    assert cfg.training.num_microbatches(dims.dp) == 8
    assert cfg.model.moe_layer_pattern() == [0, 1, 1, 1]
    assert cfg.model.vocab_size == padded_vocab_size(4000, cfg.parallel.tp) == 4096
    validate_tokenizer(cfg, 4000)
    with pytest.raises(ConfigError, match=r"tokenizer has 4097 tokens but model.vocab_size=4096.*4352"):
        validate_tokenizer(cfg, 4097)


def test_overrides_apply_with_their_types():
    cfg = load_config(
        TINY,
        [
            "model.hidden_size=256",
            "optimizer.muon.lr=0.01",
            "parallel.etp=null",
            "data.blend=[{prefix: a, weight: 2}, {prefix: b}]",
        ],
    )
    assert cfg.model.hidden_size == 256 and isinstance(cfg.model.hidden_size, int)
    assert cfg.optimizer.muon.lr == 0.01
    assert cfg.parallel.etp is None and cfg.parallel.dims(8).etp == 2  # None: expert TP = TP
    assert cfg.data.blend == [DataBlendEntry(prefix="a", weight=2.0), DataBlendEntry(prefix="b", weight=1.0)]
    assert cfg.model.num_layers == 4  # untouched keys keep the file's values


def test_list_items_are_overridable_by_index():
    cfg = load_config(
        TINY,
        [
            "data.blend=[{prefix: a, weight: 2}, {prefix: b}]",
            "data.blend.1.prefix=c",  # the dotted form a shell user writes
            "data.blend[0].weight=5",  # OmegaConf's index form
            "optimizer.betas.1=0.98",
        ],
    )
    assert cfg.data.blend == [DataBlendEntry(prefix="a", weight=5.0), DataBlendEntry(prefix="c", weight=1.0)]
    assert cfg.optimizer.betas == [0.9, 0.98]
    whole_item = load_config(TINY, ["data.blend.0={prefix: d, weight: 3}"])
    assert whole_item.data.blend == [DataBlendEntry(prefix="d", weight=3.0)]


def test_defaults_without_a_file():
    cfg = load_config(None, ["data.mock=true", "parallel.world_size=1"])
    assert cfg.model == ModelConfig()
    validate(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.hiden_size=3", "unknown config key 'model.hiden_size'.*did you mean 'model.hidden_size'"),
        ("muon.lr=0.1", "unknown config key 'muon.lr'.*did you mean 'optimizer.muon.lr'"),
        ("optimizer.muon.lrr=1", "unknown config key 'optimizer.muon.lrr'.*did you mean 'optimizer.muon.lr'"),
        ("data.blend=[{prefx: a}]", "unknown config key 'prefx' in a DataBlendEntry.*did you mean 'prefix'"),
        ("model.hidden_size=abc", "model.hidden_size='abc' is not a valid int"),
        ("training.seed=1.5", "training.seed=1.5 is not a valid int"),
        ("optimizer.betas=[0.9,x]", r"optimizer.betas\[1\]='x' is not a valid float"),
        ("model.moe_layer_freq=abc", "model.moe_layer_freq='abc' is not a valid"),
        ("hidden_size", "override 'hidden_size' is not of the form key=value"),
        (
            "data.blend.1.prefix=x",
            r"data.blend has 1 entry, so '1' is not an index of it \(valid indices 0..0\)",
        ),
        ("data.blend.first.prefix=x", "data.blend has 1 entry, so 'first' is not an index of it"),
        (
            "data.blend.0.prefx=x",
            r"unknown config key 'data.blend\[0\].prefx'.*did you mean 'data.blend\[0\].prefix'",
        ),
        ("data.blend.0.weight=heavy", r"data.blend\[0\].weight='heavy' is not a valid float"),
        ("optimizer.betas.1=x", r"optimizer.betas\[1\]='x' is not a valid float"),
        ("model.hidden_size.0=1", "model.hidden_size=128 is a single value, not a list or section"),
    ],
)
def test_bad_overrides_fail_with_a_one_line_message(override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(TINY, [override])
    assert "\n" not in str(caught.value)


def test_bad_keys_and_types_in_a_yaml_file_name_the_key_and_the_file(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  num_layer: 4\n")
    with pytest.raises(
        ConfigError, match=rf"unknown config key 'model.num_layer' \(in {unknown}\).*'model.num_layers'"
    ):
        load_config(unknown)
    wrong_type = tmp_path / "wrong_type.yaml"
    wrong_type.write_text("parallel:\n  tp: two\n")
    with pytest.raises(ConfigError, match=r"parallel.tp='two' is not a valid int"):
        load_config(wrong_type)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def tiny(*overrides: str) -> PretrainConfig:
    return load_config(TINY, list(overrides))


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        # TP against heads and query groups.
        (
            [
                "model.hidden_size=192",
                "model.num_attention_heads=24",
                "model.num_query_groups=8",
                "parallel.tp=3",
                "parallel.pp=1",
                "parallel.ep=1",
                "parallel.world_size=3",
            ],
            3,
            "parallel.tp=3 does not divide model.num_query_groups=8",
        ),
        (
            ["parallel.tp=8", "parallel.pp=1", "parallel.world_size=8"],
            8,
            "parallel.tp=8 does not divide model.num_attention_heads=4",
        ),
        # World size = TP x PP x CP x DP.
        (
            ["parallel.world_size=6"],
            6,
            r"world_size=6 is not divisible by parallel.tp=2 x parallel.pp=2 x parallel.cp=1 = 4",
        ),
        (["parallel.world_size=4"], 8, "parallel.world_size=4 but 8 processes were started"),
        # The expert grid and EP against the experts.
        (
            ["parallel.etp=2"],
            4,
            r"parallel.ep=2 x parallel.etp=2 = 4 does not divide the ranks of one pipeline stage, world_size=4 / "
            r"parallel.pp=2 = 2",
        ),
        (
            ["parallel.world_size=8", "parallel.ep=4", "model.num_moe_experts=6"],
            8,
            "parallel.ep=4 does not divide model.num_moe_experts=6",
        ),
        # Batch divisibility.
        (
            ["training.global_batch_size=10", "training.micro_batch_size=4"],
            4,
            r"training.global_batch_size=10 is not divisible by training.micro_batch_size=4 x data-parallel size 1 = 4",
        ),
        (
            ["parallel.world_size=8", "training.global_batch_size=12", "training.micro_batch_size=4"],
            8,
            r"training.global_batch_size=12 is not divisible by training.micro_batch_size=4 x data-parallel size 2 = 8",
        ),
        # PP (and virtual stages) against the layers.
        (["model.num_layers=5"], 4, "parallel.pp=2 does not divide model.num_layers=5"),
        (["parallel.vpp=4"], 4, r"parallel.pp=2 x parallel.vpp=4 = 8 does not divide model.num_layers=4"),
        # Vocabulary and sequence against TP (and CP).
        (["model.vocab_size=4095"], 4, "parallel.tp=2 does not divide model.vocab_size=4095"),
        (["model.seq_length=127"], 4, "parallel.tp=2 does not divide model.seq_length=127"),
        (
            ["parallel.world_size=8", "parallel.cp=2", "model.seq_length=130"],
            8,
            r"parallel.tp=2 x parallel.cp=2 = 4 does not divide model.seq_length=130",
        ),
        (["parallel.sequence_parallel=false"], 4, "sequence_parallel=false with parallel.tp=2"),
        # Model, optimizer, data and checkpoint rules.
        (
            ["model.moe_layer_freq=[0,1,1]"],
            4,
            "model.moe_layer_freq has 3 entries, expected model.num_layers=4",
        ),
        (["model.moe_router_enable_expert_bias=true"], 4, "needs model.moe_router_score_function='sigmoid'"),
        (["model.fp8=current"], 4, "model.fp8='current' needs model.precision='bf16'"),
        (["optimizer.muon.tp_mode=bogus"], 4, "optimizer.muon.tp_mode='bogus'"),
        (["optimizer.muon.scale_mode=adam"], 4, "optimizer.muon.scale_mode='adam' is not one of"),
        (
            ["optimizer.distributed_optimizer=true", "optimizer.muon.tp_mode=duplicated"],
            4,
            "optimizer.distributed_optimizer=true cannot serve optimizer.muon.tp_mode=duplicated",
        ),
        (
            ["optimizer.overlap_param_gather=true"],
            4,
            "optimizer.overlap_param_gather=true needs optimizer.distributed_optimizer=true",
        ),
        (["optimizer.ddp_bucket_size=0"], 4, "optimizer.ddp_bucket_size=0 must be > 0"),
        (["optimizer.decay_style=step"], 4, "optimizer.decay_style='step' is not one of"),
        (
            ["optimizer.warmup_iters=501"],
            4,
            r"optimizer.warmup_iters=501 must be in \[0, lr_decay_iters=500\]",
        ),
        (["data.split=1000,0,0"], 4, "leaves validation no documents"),
        (["data.blend=[]"], 4, "no training data"),
        (["checkpoint.save_dir=null"], 4, "checkpoint.save_interval=250 needs checkpoint.save_dir"),
    ],
)
def test_layout_and_cross_field_rules_raise_naming_the_values(overrides, world_size, message):
    cfg = tiny(*overrides)
    with pytest.raises(ConfigError, match=message) as caught:
        validate(cfg, world_size)
    assert "\n" not in str(caught.value)


def test_parallel_dims_derive_data_and_expert_parallel_sizes():
    dims = ParallelDims(world_size=64, tp=2, pp=1, ep=8, etp=1)
    assert (dims.dp, dims.expert_dp, dims.stage_size) == (32, 8, 64)
    dims = ParallelDims(world_size=16, tp=2, pp=2, cp=2, ep=2, etp=2)
    assert (dims.dp, dims.expert_dp, dims.stage_size) == (2, 2, 8)
    assert ParallelConfig(tp=4, ep=2).dims(8).etp == 4  # expert TP defaults to TP
    assert (
        ParallelConfig(tp=4).dims(8).sequence_parallel and not ParallelConfig(tp=1).dims(8).sequence_parallel
    )
    with pytest.raises(ConfigError, match="parallel.vpp=2 needs parallel.pp > 1"):
        ParallelDims(world_size=4, tp=1, pp=1, vpp=2)


def test_moe_layer_pattern():
    assert ModelConfig(num_layers=6, moe_layer_freq=2, first_k_dense_layers=0).moe_layer_pattern() == [
        1,
        0,
        1,
        0,
        1,
        0,
    ]
    assert ModelConfig(num_layers=4, moe_layer_freq=1, first_k_dense_layers=2).moe_layer_pattern() == [
        0,
        0,
        1,
        1,
    ]
    assert ModelConfig(
        num_layers=3, moe_layer_freq=[1, 0, 1], first_k_dense_layers=0
    ).moe_layer_pattern() == [1, 0, 1]
    assert ModelConfig(num_layers=3, num_moe_experts=0).moe_layer_pattern() == [0, 0, 0]


def test_count_parameters_matches_a_hand_count():
    model = ModelConfig(
        num_layers=2,
        hidden_size=8,
        num_attention_heads=2,
        num_query_groups=1,
        ffn_hidden_size=16,
        num_moe_experts=4,
        moe_ffn_hidden_size=6,
        moe_router_topk=2,
        moe_layer_freq=[0, 1],
        first_k_dense_layers=0,
        vocab_size=32,
        share_embeddings_and_output_weights=False,
    )
    head_dim = 8 // 2
    attention = (
        8 + 8 * (2 + 2 * 1) * head_dim + 2 * head_dim * 8
    )  # input norm + QKV (2 q, 1 k, 1 v heads) + proj
    dense_layer = attention + 8 + 3 * 8 * 16  # pre-MLP norm + SwiGLU fc1 (gate, up) and fc2
    expert = 3 * 8 * 6
    moe_common = attention + 8 + 4 * 8  # pre-MLP norm + router
    outside = 2 * 32 * 8 + 8  # embedding + output layer + final norm
    assert (attention, dense_layer, expert) == (200, 592, 144)
    assert (
        count_parameters(model)
        == (
            dense_layer + moe_common + 4 * expert + outside,
            dense_layer + moe_common + 2 * expert + outside,
        )
        == (1928, 1640)
    )
    # count_parameters also matched sum(p.numel()) of megatron GPTModels (one rank, local spec) for the default
    # ModelConfig, a LayerNorm + QK-norm + shared-expert + tied-embedding shape and two MLA shapes (checked once,
    # outside this suite: building models needs a process group).


def test_count_parameters_of_multi_latent_attention_by_hand():
    model = ModelConfig(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        ffn_hidden_size=8,
        num_moe_experts=0,
        multi_latent_attention=True,
        q_lora_rank=None,
        kv_lora_rank=4,
        qk_head_dim=3,
        qk_pos_emb_head_dim=2,
        v_head_dim=5,
        qk_layernorm=True,
        vocab_size=10,
        share_embeddings_and_output_weights=True,
    )
    attention = (
        16  # input norm
        + 16 * 2 * (3 + 2)  # linear_q_proj: both heads' nope + rope query dims
        + 16 * (4 + 2)  # linear_kv_down_proj: kv latent + the shared rotary key
        + 4  # kv latent norm
        + 4 * 2 * (3 + 5)  # linear_kv_up_proj: per head key (nope) and value
        + 2 * 5 * 16  # linear_proj
    )
    mlp = 16 + 3 * 16 * 8
    outside = 10 * 16 + 16  # tied embedding + final norm
    assert count_parameters(model) == (attention + mlp + outside,) * 2 == (1076, 1076)


def test_cli_print_outputs_the_resolved_yaml():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_muon.config",
            str(TINY),
            "model.hidden_size=256",
            "--print",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["hidden_size"] == 256
    assert printed["parallel"]["world_size"] == 4
    assert printed["optimizer"]["muon"]["scale_mode"] == "spectral"


def test_cli_summary_and_errors(capsys):
    assert main([str(TINY)]) == 0
    out = capsys.readouterr().out
    assert "world 4 = TP2 x PP2 x CP1 x DP1" in out and "2,048 tokens/step" in out
    assert main([str(TINY), "model.hiden_size=3"]) == 2
    assert "did you mean 'model.hidden_size'" in capsys.readouterr().err
    assert main([str(TINY), "parallel.world_size=6"]) == 2
    assert "world_size=6 is not divisible" in capsys.readouterr().err
    assert main(["none", "--print"]) == 0  # no world size: printed, not validated
    assert yaml.safe_load(capsys.readouterr().out)["model"]["hidden_size"] == ModelConfig().hidden_size


def test_tiny_cpu_model_builds_a_megatron_transformer_config():
    from megatron_muon.models.gpt_moe import build_transformer_config

    cfg = load_config(TINY)
    config = build_transformer_config(
        cfg.model, tp=cfg.parallel.tp, pp=cfg.parallel.pp, ep=cfg.parallel.ep, etp=1
    )
    assert config.moe_layer_freq == [0, 1, 1, 1] and cfg.model.vocab_size == 4096
    assert (
        config.tensor_model_parallel_size,
        config.expert_tensor_parallel_size,
        config.sequence_parallel,
    ) == (
        2,
        1,
        True,
    )
    # MLA reaches megatron's MLATransformerConfig (built on the local spec by models/mla_attention.py).
    mla = ModelConfig(multi_latent_attention=True, num_query_groups=None, q_lora_rank=24, kv_lora_rank=16)
    mla_config = build_transformer_config(mla, tp=2, pp=1, ep=1)
    assert type(mla_config).__name__ == "MLATransformerConfig"
    assert (
        mla_config.q_lora_rank,
        mla_config.kv_lora_rank,
        mla_config.qk_head_dim,
        mla_config.v_head_dim,
    ) == (
        24,
        16,
        128,
        128,
    )
