"""Short training runs of the tiny MoE GPT in one process (CPU or one GPU), through the trainer's pieces (model
builder, megatron DDP, ``build_optimizer``, ``train_step``): the GPU tests' training steps, and the measurement of
what FP8 Newton–Schulz costs in loss.

Call inside a process whose megatron parallel state is initialized (``run_distributed`` on the CPU, the
``cuda_world`` fixture of tests/gpu on a GPU).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_muon.config.schema import TransformerImpl

__all__ = ["TinyRun", "train_tiny_moe"]

DEFAULT_MODEL: dict[str, Any] = dict(  # ModelConfig's fields
    num_layers=4,
    hidden_size=128,
    ffn_hidden_size=256,
    moe_ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    num_moe_experts=4,
    vocab_size=512,
    seq_length=64,
)


@dataclass(slots=True)
class TinyRun:
    """A finished tiny training run: its losses and what it trained, for the test to inspect."""

    losses: list[float]
    """Training loss (nats per token) of each step."""
    chunks: list[Any]
    """The DDP-wrapped model chunks."""
    optimizer: Any
    """The megatron ``ChainedOptimizer`` (Muon + AdamW)."""
    skipped: list[bool] = field(default_factory=list)
    """Whether each step's update was skipped (non-finite gradients)."""


def _on_device(
    batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    for batch in batches:
        yield {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def train_tiny_moe(
    pg_collection: ProcessGroupCollection,
    *,
    steps: int,
    device: str | torch.device = "cpu",
    model: dict[str, Any] | None = None,
    bf16: bool = False,
    transformer_impl: TransformerImpl = "local",
    fp8_recipe: str | None = None,
    fp8_param: bool = False,
    ns_compute_dtype: str = "bfloat16",
    ns_fp8_steps: int = 0,
    muon_lr: float = 0.02,
    adam_lr: float = 3e-3,
    micro_batch_size: int = 4,
    num_microbatches: int = 2,
    seed: int = 1234,
) -> TinyRun:
    """Train the tiny MoE GPT ``steps`` steps with Muon + AdamW at TP = PP = EP = 1; the same weights and data for
    the same ``seed`` whatever the numerics.

    ``bf16``: bf16 params, fp32 main params in the optimizer (as ``model.precision: bf16``). ``fp8_recipe``:
    megatron's ``fp8_recipe`` (delayed | tensorwise | mxfp8) with ``fp8="hybrid"`` (e4m3 forward, e5m2
    gradients), Transformer Engine only; ``fp8_param``: FP8 primary weights. ``ns_fp8_steps``: FP8 Newton–Schulz
    (``MuonConfig.ns_fp8_steps``)."""
    from megatron_muon.config.schema import ModelConfig
    from megatron_muon.optim.options import MuonConfig
    from megatron_muon.testing.small_model import build_small_model
    from megatron_muon.training.step import synthetic_batches, train_step

    device = torch.device(device)
    if (fp8_recipe or fp8_param) and transformer_impl != "transformer_engine":
        raise ValueError(
            f"fp8_recipe={fp8_recipe!r} / fp8_param={fp8_param} need transformer_impl='transformer_engine'"
        )
    if fp8_param and not fp8_recipe:
        raise ValueError("fp8_param=True needs an fp8_recipe")
    cfg = ModelConfig(
        **(model or DEFAULT_MODEL),
        transformer_impl=transformer_impl,
        precision="bf16" if bf16 or fp8_recipe else "fp32",
    )
    # On the GPU megatron builds in place (FP8 primary weights cannot live on the CPU).
    small = build_small_model(
        cfg,
        seed=seed,
        device=device,
        config_fields=dict(fp8="hybrid", fp8_recipe=fp8_recipe, fp8_param=fp8_param) if fp8_recipe else None,
        pg=pg_collection,
    )
    chunks = small.chunks
    optimizer = small.build_optimizer(
        MuonConfig(lr=muon_lr, weight_decay=0.01, compute_dtype=ns_compute_dtype, ns_fp8_steps=ns_fp8_steps),
        small.adam_config(lr=adam_lr, weight_decay=0.01, clip_grad=1.0),
    )
    data = _on_device(
        synthetic_batches(
            vocab_size=cfg.vocab_size,
            seq_length=cfg.seq_length,
            micro_batch_size=micro_batch_size,
            num_microbatches=num_microbatches,
            data_parallel_rank=0,
            data_parallel_size=1,
            seed=seed,
        ),
        device,
    )
    run = TinyRun(losses=[], chunks=chunks, optimizer=optimizer)
    for _ in range(steps):
        result = train_step(
            chunks,
            optimizer,
            data,
            num_microbatches=num_microbatches,
            seq_length=cfg.seq_length,
            micro_batch_size=micro_batch_size,
            pg_collection=pg_collection,
        )
        run.losses.append(float(result["loss"]))
        run.skipped.append(bool(result["skipped"]))
    return run
