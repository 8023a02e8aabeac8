"""The megatron <-> Hugging Face maps (megatron_muon/convert/): fused QKV per query group, gate/up, expert stacks,
config translation and the features each architecture refuses, saved-name normalization, safetensors shards.
Pure: no processes, no transformers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_muon.config import ModelConfig, load_config
from megatron_muon.convert.hf_maps import (
    ARCHITECTURES,
    ConversionError,
    choose_architecture,
    hf_config_from_model,
    merge_to_megatron,
    model_config_from_hf,
    obstacles,
    split_to_hf,
    tensor_mappings,
)

REPO = Path(__file__).resolve().parents[2]

SMALL = dict(
    num_layers=3,
    hidden_size=16,
    ffn_hidden_size=24,
    moe_ffn_hidden_size=8,
    num_attention_heads=4,
    num_query_groups=2,
    num_moe_experts=4,
    moe_router_topk=2,
    vocab_size=32,
    seq_length=16,
)
# One model per architecture that it represents exactly.
FITTING = {
    "mixtral": ModelConfig(**SMALL, first_k_dense_layers=0, share_embeddings_and_output_weights=True),
    "qwen3_moe": ModelConfig(**SMALL, first_k_dense_layers=0, moe_layer_freq=[1, 0, 1], qk_layernorm=True),
    "qwen2_moe": ModelConfig(**SMALL, first_k_dense_layers=1),
    "glm4_moe": ModelConfig(
        **SMALL,
        first_k_dense_layers=1,
        moe_shared_expert_intermediate_size=16,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5,
        qk_layernorm=True,
    ),
}


def test_qkv_split_follows_megatrons_per_group_interleaving():
    # 4 query heads in 2 groups, head dim 2: megatron's rows are [q0 q1 k0 v0 | q2 q3 k1 v1], 2 rows each.
    model = ModelConfig(**{**SMALL, "hidden_size": 8}, first_k_dense_layers=0)
    (qkv,) = [m for m in tensor_mappings(ARCHITECTURES["mixtral"], model) if m.layout == "qkv"][:1]
    rows = []
    for group in range(2):
        heads = [("q", 2 * group), ("q", 2 * group + 1), ("k", group), ("v", group)]
        rows += [
            {"q": 100, "k": 200, "v": 300}[kind] + 10 * head + dim for kind, head in heads for dim in range(2)
        ]
    fused = torch.tensor(rows, dtype=torch.float32).unsqueeze(1).expand(-1, 8).contiguous()
    q, k, v = split_to_hf(qkv, fused, model)
    assert q[:, 0].tolist() == [100, 101, 110, 111, 120, 121, 130, 131]
    assert k[:, 0].tolist() == [200, 201, 210, 211] and v[:, 0].tolist() == [300, 301, 310, 311]
    assert torch.equal(merge_to_megatron(qkv, [q, k, v], model), fused)


@pytest.mark.parametrize("name", list(FITTING))
def test_every_map_splits_and_merges_back_exactly(name):
    arch, model = ARCHITECTURES[name], FITTING[name]
    assert obstacles(arch, model) == []
    mappings = tensor_mappings(arch, model)
    hf_names = [n for m in mappings for n in m.hf]
    ours = [m.megatron for m in mappings if m.megatron is not None]
    assert len(hf_names) == len(set(hf_names)) and len(ours) == len(set(ours))
    generator = torch.Generator().manual_seed(0)
    for mapping in mappings:
        tensor = (
            None if mapping.megatron is None else torch.randn(mapping.megatron_shape, generator=generator)
        )
        parts = split_to_hf(mapping, tensor, model)
        assert [tuple(p.shape) for p in parts] == list(mapping.hf_shapes), mapping
        merged = merge_to_megatron(mapping, parts, model)
        assert (merged is None) if tensor is None else torch.equal(merged, tensor), mapping
        if mapping.layout == "gate_up":  # [gate; up]: the first half is the gate
            assert torch.equal(parts[0], tensor[: tensor.shape[0] // 2])


def test_map_counts_for_a_qwen3_moe_model():
    mappings = tensor_mappings(ARCHITECTURES["qwen3_moe"], FITTING["qwen3_moe"])
    hf = [n for m in mappings for n in m.hf]
    # Per layer: q, k, v, o, q_norm, k_norm, 2 norms; MoE layers 0 and 2: router + 4 experts x 3; dense layer 1:
    # 3; embeddings, final norm, lm_head.
    assert len(hf) == 3 * 8 + 2 * (1 + 4 * 3) + 3 + 3
    assert (
        "model.layers.1.mlp.gate_proj.weight" in hf and "model.layers.2.mlp.experts.3.down_proj.weight" in hf
    )
    assert "model.layers.0.self_attn.q_norm.weight" in hf and "lm_head.weight" in hf


def test_zero_biases_must_be_zero_on_import():
    mapping = next(
        m for m in tensor_mappings(ARCHITECTURES["qwen2_moe"], FITTING["qwen2_moe"]) if m.layout == "zero"
    )
    assert merge_to_megatron(mapping, [torch.zeros(mapping.hf_shapes[0])], FITTING["qwen2_moe"]) is None
    with pytest.raises(ConversionError, match=r"q_proj.bias is not zero; our model has no linear biases"):
        merge_to_megatron(mapping, [torch.ones(mapping.hf_shapes[0])], FITTING["qwen2_moe"])


def test_the_tiny_cpu_config_exports_as_qwen2_moe_and_the_architectures_say_why_not():
    model = load_config(REPO / "launch" / "configs" / "tiny_cpu.yaml").model
    assert choose_architecture(model).name == "qwen2_moe"
    assert obstacles(ARCHITECTURES["mixtral"], model) == [
        "dense layers [0] (first_k_dense_layers / moe_layer_freq; mixtral has MoE in every layer)"
    ]
    assert obstacles(ARCHITECTURES["qwen3_moe"], model) == [
        "model.qk_layernorm=false (qwen3_moe always normalizes queries and keys per head)"
    ]
    assert obstacles(ARCHITECTURES["glm4_moe"], model) == [
        "model.moe_router_score_function='softmax' (glm4_moe routes with sigmoid)"
    ]


@pytest.mark.parametrize("name", list(FITTING))
def test_auto_picks_an_architecture_that_fits(name):
    assert obstacles(ARCHITECTURES[name], FITTING[name]) == []
    chosen = choose_architecture(FITTING[name])
    assert obstacles(chosen, FITTING[name]) == []
    assert choose_architecture(FITTING[name], name).name == name


def test_models_no_architecture_represents_are_refused_naming_the_feature():
    moonlight = load_config(REPO / "launch" / "configs" / "moonlight_16b_a3b_64gpu.yaml").model
    with pytest.raises(ConversionError) as error:
        choose_architecture(moonlight)
    message = str(error.value)
    assert "\n" not in message and message.count("multi_latent_attention=true") == len(ARCHITECTURES), message
    # moe_1b: softmax router with an ungated shared expert.
    moe_1b = load_config(REPO / "launch" / "configs" / "moe_1b_8gpu.yaml").model
    with pytest.raises(ConversionError) as error:
        choose_architecture(moe_1b)
    message = str(error.value)
    assert (
        "qwen2_moe: model.moe_shared_expert_intermediate_size=1024: megatron's shared expert is ungated"
        in message
    )
    assert "glm4_moe: model.moe_router_score_function='softmax' (glm4_moe routes with sigmoid)" in message
    with pytest.raises(ConversionError, match=r"architecture 'llama' is not one of \['auto', 'mixtral'"):
        choose_architecture(moe_1b, "llama")


FIELDS = (
    "num_layers hidden_size num_attention_heads query_groups head_dim qk_layernorm num_moe_experts moe_router_topk "
    "moe_shared_expert_intermediate_size moe_router_score_function moe_router_enable_expert_bias "
    "moe_router_topk_scaling_factor vocab_size seq_length rotary_base norm_epsilon share_embeddings_and_output_weights "
    "moe_ffn_hidden_size precision"
).split()


@pytest.mark.parametrize("name", list(FITTING))
def test_hf_config_translates_back_to_the_same_model(name):
    model = replace(FITTING[name], rotary_base=5000, norm_epsilon=1e-6)
    config = json.loads(json.dumps(hf_config_from_model(ARCHITECTURES[name], model, dtype="float32")))
    arch, back = model_config_from_hf(config, where="x")
    assert arch.name == name
    assert back.moe_layer_pattern() == model.moe_layer_pattern()
    for field in FIELDS:
        assert getattr(back, field) == getattr(model, field), field
    if any(not moe for moe in model.moe_layer_pattern()):
        assert back.ffn_hidden_size == model.ffn_hidden_size


def _hf(name, **changes):
    config = hf_config_from_model(ARCHITECTURES[name], FITTING[name], dtype="bfloat16")
    config.update(changes)
    return config


@pytest.mark.parametrize(
    "config, fragment",
    [
        (
            {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
            "unsupported architecture LlamaForCausalLM",
        ),
        (
            _hf("qwen2_moe", shared_expert_intermediate_size=64),
            "shared_expert_intermediate_size=64: the shared expert",
        ),
        (_hf("qwen3_moe", norm_topk_prob=False), "norm_topk_prob=false"),
        (_hf("mixtral", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope type 'yarn'"),
        (_hf("mixtral", sliding_window=4096), "sliding_window=4096"),
        (_hf("mixtral", head_dim=8), "head_dim=8 != hidden_size / num_attention_heads=4"),
        (_hf("glm4_moe", partial_rotary_factor=0.5, rope_parameters=None), "partial_rotary_factor=0.5"),
        (_hf("glm4_moe", n_group=2), "no group-limited routing"),
        (_hf("qwen3_moe", hidden_act="gelu"), "hidden_act='gelu'"),
    ],
)
def test_hf_configs_our_model_cannot_build_are_refused(config, fragment):
    with pytest.raises(ConversionError) as error:
        model_config_from_hf(config, where="/models/x")
    assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert str(error.value).startswith("/models/x: ")


def test_bfloat16_models_import_as_bf16():
    _, model = model_config_from_hf(_hf("mixtral"), where="x")
    assert model.precision == "bf16" and model.seq_length == 16


def test_saved_names_normalize_to_a_tp1_state_dict():
    from megatron_muon.convert.megatron_io import canonical_entries

    entries = dict(canonical_entries("decoder.layers.2.mlp.experts.experts.linear_fc1.weight", (4, 16, 8)))
    assert sorted(entries) == [
        f"decoder.layers.2.mlp.experts.local_experts.{e}.linear_fc1.weight" for e in range(4)
    ]
    assert entries["decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight"].index == (3,)
    assert entries["decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight"].shape == (16, 8)
    (name, saved), *_ = canonical_entries(
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", (8,)
    )
    assert name == "decoder.layers.0.input_layernorm.weight" and saved.index == ()
    # megatron's homogeneous format: one tensor per name with a leading layer axis.
    stacked = dict(canonical_entries("decoder.layers.mlp.linear_fc1.layer_norm_weight", (3, 8)))
    assert sorted(stacked) == [f"decoder.layers.{i}.pre_mlp_layernorm.weight" for i in range(3)]
    both = dict(canonical_entries("decoder.layers.mlp.experts.experts.linear_fc2.weight", (3, 4, 8, 16)))
    assert both["decoder.layers.2.mlp.experts.local_experts.1.linear_fc2.weight"].index == (2, 1)


def test_mup_attention_scale_and_logit_multiplier_fold_into_standard_weights():
    from megatron_muon.convert.hf_maps import fold_into_hf, mup_folding

    # hidden 16 = 2 x base 8 (m = 2); head dim 4, base head dim 8 / 4 = 2: megatron's scale √2 / 4.
    model = ModelConfig(**SMALL, first_k_dense_layers=0, mup_base_hidden_size=8)
    query_factor, logit_factor = mup_folding(model)
    assert logit_factor == 0.5 and query_factor == pytest.approx(2**0.5 / 4 * 2)
    generator = torch.Generator().manual_seed(0)
    q_proj, x, k = (
        torch.randn(4, 16, generator=generator),
        torch.randn(16, generator=generator),
        torch.randn(4),
    )
    folded = fold_into_hf("model.layers.0.self_attn.q_proj.weight", q_proj, model)
    torch.testing.assert_close((q_proj @ x) @ k * (2**0.5 / 4), (folded @ x) @ k / 4**0.5)
    lm_head = torch.randn(32, 16, generator=generator)
    assert torch.equal(fold_into_hf("lm_head.weight", lm_head, model), lm_head * 0.5)
    # With QK-norm the queries are normalized after q_proj: the factor goes into q_norm's weight.
    with_norm = replace(model, qk_layernorm=True)
    assert torch.equal(fold_into_hf("model.layers.0.self_attn.q_proj.weight", q_proj, with_norm), q_proj)
    norm = torch.ones(4)
    assert torch.allclose(
        fold_into_hf("model.layers.1.self_attn.q_norm.weight", norm, with_norm), norm * query_factor
    )
    assert mup_folding(FITTING["mixtral"]) == (1.0, 1.0)
    tied = replace(model, share_embeddings_and_output_weights=True)
    assert "muP output multiplier 0.5 with tied embeddings" in obstacles(ARCHITECTURES["mixtral"], tied)[0]


def test_tensor_set_mismatches_are_one_line_with_counts():
    from megatron_muon.convert.hf_export import compare_tensor_sets

    with pytest.raises(ConversionError) as error:
        compare_tensor_sets(
            "ckpt", {"a": (2,), "b": (3,), "x": (1,)}, {"a": (2,), "b": (4,), "c": (1,)}, {"d"}
        )
    assert str(error.value) == (
        "ckpt: 3 tensors, expected 3: 1 tensor(s) missing, e.g. c; 1 tensor(s) unexpected, e.g. x; "
        "1 tensor(s) with another shape, e.g. b (3,) (expected (4,))"
    )


def test_sizes_parse():
    from megatron_muon.convert.hf_files import parse_size

    assert (
        parse_size("5GB") == 5 * 10**9 and parse_size("200KB") == 200_000 and parse_size("2MiB") == 2 * 2**20
    )
    assert parse_size("1048576") == 2**20
    with pytest.raises(ConversionError, match="size 'big'"):
        parse_size("big")


def test_shards_round_trip_and_fused_experts_read_per_expert(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from megatron_muon.convert.hf_files import INDEX_FILE, HFReader, SafetensorsWriter

    arch = ARCHITECTURES["mixtral"]
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    writer = SafetensorsWriter(tmp_path, max_shard_bytes=100)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    files = writer.close()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 200 and index["weight_map"]["t4"] == files[2]
    reader = HFReader(tmp_path, arch)
    assert all(torch.equal(reader.get(name), tensor) for name, tensor in tensors.items())

    # transformers >= 5 in memory: experts fused, [experts, 2 x ffn, hidden] = per expert [gate; up], and
    # Mixtral's block_sparse_moe renamed mlp.
    fused = tmp_path / "fused"
    fused.mkdir()
    gate_up, down = torch.randn(3, 8, 5), torch.randn(3, 5, 4)
    save_file(
        {
            "model.layers.0.mlp.experts.gate_up_proj": gate_up,
            "model.layers.0.mlp.experts.down_proj": down,
            "model.layers.0.mlp.gate.weight": torch.randn(3, 5),
        },
        str(fused / "model.safetensors"),
    )
    reader = HFReader(fused, arch)
    block = "model.layers.0.block_sparse_moe"
    assert reader.shapes[f"{block}.experts.2.w1.weight"] == (4, 5) and f"{block}.gate.weight" in reader.shapes
    assert torch.equal(reader.get(f"{block}.experts.2.w1.weight"), gate_up[2, :4])
    assert torch.equal(reader.get(f"{block}.experts.2.w3.weight"), gate_up[2, 4:])
    assert torch.equal(reader.get(f"{block}.experts.1.w2.weight"), down[1])


def test_the_command_line_offers_every_architecture(capsys):
    from megatron_muon.cli import convert_checkpoint as tool

    for name in ["auto", *ARCHITECTURES]:
        assert tool.parse_args(["export", "a", "b", "--architecture", name]).architecture == name
    with pytest.raises(SystemExit):
        tool.parse_args(["export", "a", "b", "--architecture", "llama"])
    assert "invalid choice: 'llama'" in capsys.readouterr().err
    layout = tool.parse_args(["reshard", "c", "--tp", "2", "--ep", "4"])
    assert (layout.tp, layout.pp, layout.ep, layout.etp, layout.world_size) == (2, 1, 4, None, None)


@pytest.mark.parametrize(
    ("shard", "refusal"),
    [
        ("../outside.safetensors", "is not a file name inside the model directory"),
        ("sub/../../outside.safetensors", "is not a file name inside the model directory"),
        ("ABSOLUTE", "is not a file name inside the model directory"),
        ("link.safetensors", "outside the model directory (a symbolic link out of it)"),
        ("linked_dir/outside.safetensors", "outside the model directory (a symbolic link out of it)"),
    ],
)
def test_a_crafted_index_cannot_make_the_import_open_files_outside_the_model(tmp_path, shard, refusal):
    """An index is input: every shard name must resolve inside the model directory, or one line refuses it."""
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from megatron_muon.convert.hf_files import INDEX_FILE, HFReader

    outside = tmp_path / "outside.safetensors"  # a real, readable safetensors file beside the model
    save_file({"t0": torch.zeros(2)}, str(outside))
    model = tmp_path / "model"
    model.mkdir()
    save_file({"t1": torch.ones(2)}, str(model / "model-00001-of-00002.safetensors"))
    (model / "link.safetensors").symlink_to(outside)
    (model / "linked_dir").symlink_to(tmp_path)
    shard = str(outside) if shard == "ABSOLUTE" else shard
    weight_map = {"t0": shard, "t1": "model-00001-of-00002.safetensors"}
    (model / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConversionError) as error:
        HFReader(model, ARCHITECTURES["mixtral"])
    message = str(error.value)
    assert "\n" not in message and repr(shard) in message and refusal in message, message

    # The same model with the shard inside reads; a hub-cache snapshot's links into its blobs/ are accepted.
    save_file({"t0": torch.zeros(2)}, str(model / "model-00002-of-00002.safetensors"))
    weight_map["t0"] = "model-00002-of-00002.safetensors"
    (model / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(HFReader(model, ARCHITECTURES["mixtral"]).get("t1"), torch.ones(2))
    snapshot, blobs = tmp_path / "hub" / "snapshots" / "abc123", tmp_path / "hub" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    save_file({"t0": torch.zeros(2)}, str(blobs / "f00d"))
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs/f00d"))
    (snapshot / INDEX_FILE).write_text(json.dumps({"weight_map": {"t0": "model.safetensors"}}))
    assert torch.equal(HFReader(snapshot, ARCHITECTURES["mixtral"]).get("t0"), torch.zeros(2))


def test_an_index_that_is_not_a_weight_map_is_one_line(tmp_path):
    from megatron_muon.convert.hf_files import INDEX_FILE, HFReader

    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"t0": 3}}))
    with pytest.raises(ConversionError, match="weight_map must map tensor names to shard file names"):
        HFReader(tmp_path, ARCHITECTURES["mixtral"])
