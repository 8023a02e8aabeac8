"""Every key of the ``model``, ``parallel`` and ``optimizer`` sections changes what is built, or is refused.

For each field we change it to another valid value (in a context where it matters, e.g. the expert-bias rate with
the expert bias on) and build, without processes or a model, what the trainer builds from the config
(``training/megatron_configs.py``): megatron's ``TransformerConfig``, the arguments of megatron's ``GPTModel`` (layer
spec included), the AdamW side's ``OptimizerConfig`` and the ``OptimizerParamScheduler`` arguments. The change must
show in one of them, or the builder must refuse the config in one line. A key that changes nothing is a bug.
The few fields that act elsewhere are listed, with where, in ``ACTS_ELSEWHERE``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pytest
import torch

from megatron_muon.config import (
    ConfigError,
    ModelConfig,
    OptimizationConfig,
    ParallelConfig,
    load_config,
    validate,
)
from megatron_muon.optim.options import MuonConfig, QKClipConfig

MLA = {
    "model.multi_latent_attention": True,
    "model.num_query_groups": None,
    "model.kv_lora_rank": 32,
    "model.qk_head_dim": 16,
    "model.qk_pos_emb_head_dim": 8,
    "model.v_head_dim": 16,
}
EXPERT_BIAS = {"model.moe_router_score_function": "sigmoid", "model.moe_router_enable_expert_bias": True}
WSD = {"optimizer.decay_style": "WSD"}
MUP = {"model.mup_base_hidden_size": 32, "optimizer.muon.scale_mode": "spectral"}
TWO_RANKS = {"parallel.world_size": 2}

# (key, other valid value, context: keys set in both the base and the changed config).
CHANGES: list[tuple[str, Any, dict[str, Any]]] = [
    ("model.num_layers", 8, {}),
    ("model.hidden_size", 128, {}),
    ("model.ffn_hidden_size", 256, {}),
    ("model.moe_ffn_hidden_size", 32, {}),
    ("model.num_attention_heads", 8, {}),
    ("model.num_query_groups", 4, {}),
    ("model.num_query_groups", None, {}),
    ("model.kv_channels", 32, {}),
    ("model.qk_layernorm", True, {}),
    ("model.num_moe_experts", 8, {}),
    ("model.num_moe_experts", 0, {}),
    ("model.moe_router_topk", 1, {}),
    ("model.moe_layer_freq", 2, {}),
    ("model.moe_layer_freq", [0, 0, 1, 1], {}),
    ("model.first_k_dense_layers", 0, {}),
    ("model.moe_shared_expert_intermediate_size", 64, {}),
    ("model.moe_router_score_function", "sigmoid", {}),
    ("model.moe_router_load_balancing_type", "seq_aux_loss", {}),
    ("model.moe_router_load_balancing_type", "none", {}),
    ("model.moe_aux_loss_coeff", 1e-3, {}),
    ("model.moe_router_enable_expert_bias", True, {"model.moe_router_score_function": "sigmoid"}),
    ("model.moe_router_bias_update_rate", 1e-2, EXPERT_BIAS),
    ("model.moe_router_topk_scaling_factor", 2.5, {}),
    ("model.vocab_size", 512, {}),
    ("model.seq_length", 64, {}),
    ("model.rotary_base", 50000, {}),
    ("model.init_method_std", 0.01, {}),
    ("model.mup_base_hidden_size", 32, {"optimizer.muon.scale_mode": "spectral"}),
    ("model.mup_base_head_dim", 16.0, MUP),
    ("model.output_logit_multiplier", 2.0, {}),
    ("model.output_logit_multiplier", 2.0, MUP),
    ("model.attention_scale_multiplier", 0.5, {}),
    ("model.attention_scale_multiplier", 0.5, MUP),
    ("model.share_embeddings_and_output_weights", True, {}),
    ("model.normalization", "LayerNorm", {}),
    ("model.norm_epsilon", 1e-6, {}),
    ("model.transformer_impl", "transformer_engine", {}),
    (
        "model.multi_latent_attention",
        True,
        {key: value for key, value in MLA.items() if key != "model.multi_latent_attention"},
    ),
    ("model.q_lora_rank", 16, MLA),
    ("model.kv_lora_rank", 16, MLA),
    ("model.qk_head_dim", 8, MLA),
    ("model.qk_pos_emb_head_dim", 4, MLA),
    ("model.v_head_dim", 8, MLA),
    ("model.precision", "bf16", {}),
    ("model.fp8", "delayed", {"model.precision": "bf16", "model.transformer_impl": "transformer_engine"}),
    ("parallel.tp", 2, TWO_RANKS),
    ("parallel.pp", 2, TWO_RANKS),
    ("parallel.vpp", 2, {**TWO_RANKS, "parallel.pp": 2}),
    ("parallel.cp", 2, TWO_RANKS),
    ("parallel.ep", 2, TWO_RANKS),
    ("parallel.etp", 1, {**TWO_RANKS, "parallel.tp": 2}),
    ("parallel.sequence_parallel", False, {**TWO_RANKS, "parallel.tp": 2, "model.num_moe_experts": 0}),
    ("optimizer.lr", 1e-3, {}),
    ("optimizer.min_lr", 0.0, {}),
    ("optimizer.weight_decay", 0.01, {}),
    ("optimizer.betas", [0.8, 0.99], {}),
    ("optimizer.eps", 1e-6, {}),
    ("optimizer.clip_grad", 0.5, {}),
    ("optimizer.warmup_iters", 10, {}),
    ("optimizer.decay_style", "linear", {}),
    ("optimizer.lr_decay_iters", 50, {}),
    ("optimizer.wsd_decay_fraction", 0.5, WSD),
    ("optimizer.wsd_decay_style", "cosine", WSD),
    ("optimizer.distributed_optimizer", True, {}),
    ("optimizer.overlap_grad_reduce", True, {}),
    ("optimizer.overlap_param_gather", True, {"optimizer.distributed_optimizer": True}),
    ("optimizer.ddp_bucket_size", 8192, {"optimizer.overlap_grad_reduce": True}),
    ("optimizer.qk_clip.enabled", True, {}),
    ("optimizer.qk_clip.log_max_logits", True, {}),
]

# Fields that act on something other than the objects built here, and where (each is tested there).
ACTS_ELSEWHERE = {
    # The launcher's and pretrain's check of how many processes were started (validate); the grid is the rest.
    "parallel.world_size": "launcher only: must equal the number of processes started",
    # The trainer picks the optimizer builder: ours (Muon + AdamW) or megatron's get_megatron_optimizer (AdamW).
    "optimizer.use_muon": "trainer: build_optimizer vs get_megatron_optimizer",
    # Handed whole, as one MuonConfig object, to optim.build.build_optimizer (tests/unit/test_muon.py and the
    # distributed optimizer tests check what each option does).
    **{f"optimizer.muon.{f.name}": "optim.build.build_optimizer" for f in dataclasses.fields(MuonConfig)},
    # A base multiplier of the router's AdamW LR, a param-group override in optim.build.build_optimizer
    # (tests/distributed/test_mup_optimizer.py::test_router_lr_multiplier_is_a_base_multiplier).
    "optimizer.router_lr_multiplier": "optim.build.build_optimizer",
    # QK-clip's rule parameters go to optim.qk_clip.QKClip (tests/distributed/test_qk_clip.py).
    "optimizer.qk_clip.threshold": "optim.qk_clip.QKClip",
    "optimizer.qk_clip.alpha": "optim.qk_clip.QKClip",
    # The trainer wraps the chunks in training/fsdp.py's FullyShardedChunk instead of megatron's DDP
    # (tests/integration/test_launcher_fsdp.py, tests/distributed/test_parallel_muon.py's FSDP layouts).
    "parallel.fsdp": "training.parts.build_training_parts: wrap_in_fsdp vs wrap_in_ddp",
}

# What the builder may refuse on this machine, and why; any other refusal fails the test.
MAY_BE_REFUSED = {
    "model.kv_channels": "the local-spec builder derives the head dim from hidden_size / heads",
    "model.normalization": "the local-spec builder builds RMSNorm only",
    "model.transformer_impl": "Transformer Engine needs a GPU and an importable transformer_engine",
    "model.fp8": "FP8 GEMMs need Transformer Engine",
    "parallel.cp": "megatron-core 0.19.2's local attention has no context parallelism",
}


def _comparable(value: Any, depth: int = 0) -> Any:
    """``value`` as nested tuples that compare equal when two builds are the same (``functools.partial`` and
    megatron's layer specs compare by identity otherwise)."""
    if depth > 40:
        return repr(value)
    if isinstance(value, functools.partial):
        return (
            "partial",
            _comparable(value.func, depth + 1),
            _comparable((value.args, value.keywords), depth + 1),
        )
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return (type(value), tuple((f.name, _comparable(getattr(value, f.name), depth + 1)) for f in fields))
    if isinstance(value, (list, tuple)):
        return tuple(_comparable(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((str(key), _comparable(item, depth + 1)) for key, item in value.items()))
    return value


class _Group:
    """A one-rank pipeline group: all the model builder asks of ``pg_collection.pp``."""

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1


class _Groups:
    pp = _Group()


def _gpt_model_arguments(model, config, monkeypatch) -> list[dict[str, Any]]:
    """The keyword arguments megatron's ``GPTModel`` gets from our builder (layer spec included), without building."""
    import megatron_muon.models.gpt_moe as builder

    calls: list[dict[str, Any]] = []

    def record(**kwargs):
        calls.append(kwargs)
        return (
            torch.nn.Module()
        )  # an empty model: what the builder does after GPTModel() finds nothing to change

    monkeypatch.setattr(builder, "GPTModel", record)
    builder.build_gpt_moe_model_chunks(model, config, _Groups())
    return [{k: v for k, v in call.items() if k not in ("config", "pg_collection")} for call in calls]


def _config(settings: dict[str, Any]):
    overrides = ["data.mock=true", "training.train_iters=100"]
    overrides += [f"{key}={_yaml(value)}" for key, value in settings.items()]
    return load_config(None, overrides)


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _built(settings: dict[str, Any], monkeypatch) -> Any:
    """What the trainer builds from the config with ``settings``, comparable; or ``ConfigError`` if refused."""
    from megatron_muon.platform.device import Device
    from megatron_muon.training.megatron_configs import (
        adamw_optimizer_config,
        ddp_config,
        scheduler_arguments,
        transformer_config,
    )

    cfg = _config(settings)
    dims = validate(
        cfg, cfg.parallel.world_size or 1
    )  # the value must be valid: a failure here is the test's bug
    try:
        config = transformer_config(cfg, dims, Device(type="cpu"))
    except ConfigError as error:
        return error
    return {
        "TransformerConfig": _comparable(config),
        "GPTModel": _comparable(_gpt_model_arguments(cfg.model, config, monkeypatch)),
        "OptimizerConfig": _comparable(adamw_optimizer_config(cfg)),
        "DistributedDataParallelConfig": _comparable(ddp_config(cfg)),
        "scheduler": _comparable(scheduler_arguments(cfg)),
    }


def _section_keys() -> set[str]:
    keys = set()
    for prefix, section in (
        ("model", ModelConfig),
        ("parallel", ParallelConfig),
        ("optimizer", OptimizationConfig),
    ):
        for f in dataclasses.fields(section):
            nested = (
                {"muon": MuonConfig, "qk_clip": QKClipConfig}.get(f.name) if prefix == "optimizer" else None
            )
            if nested is None:
                keys.add(f"{prefix}.{f.name}")
            else:
                keys.update(f"{prefix}.{f.name}.{g.name}" for g in dataclasses.fields(nested))
    return keys


def test_every_field_is_walked_or_acts_elsewhere():
    walked = {key for key, _, _ in CHANGES}
    assert not walked & set(ACTS_ELSEWHERE)
    assert walked | set(ACTS_ELSEWHERE) == _section_keys(), (
        f"not covered: {sorted(_section_keys() - walked - set(ACTS_ELSEWHERE))}; "
        f"not a field: {sorted((walked | set(ACTS_ELSEWHERE)) - _section_keys())}"
    )


def test_the_comparison_sees_identical_builds_as_equal(monkeypatch):
    assert _built({}, monkeypatch) == _built({}, monkeypatch)


@pytest.mark.parametrize(
    ("key", "value", "context"), CHANGES, ids=[f"{key}={value}" for key, value, _ in CHANGES]
)
def test_the_change_reaches_what_is_built_or_is_refused(key, value, context, monkeypatch):
    base = _built(context, monkeypatch)
    changed = _built({**context, key: value}, monkeypatch)
    for outcome in (base, changed):
        if isinstance(outcome, ConfigError):
            assert "\n" not in str(outcome)
            assert key in MAY_BE_REFUSED, (
                f"{key}={value!r}: the builder refused an unexpected config: {outcome}"
            )
    if isinstance(changed, ConfigError) or isinstance(base, ConfigError):
        return
    differing = [name for name in base if base[name] != changed[name]]
    assert differing, (
        f"{key}: {context[key] if key in context else 'default'} -> {value!r} changes nothing built"
    )
