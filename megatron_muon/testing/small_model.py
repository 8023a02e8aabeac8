"""The small MoE GPT of the tests, the benchmarks and the example, and its Muon + AdamW optimizer, built one way.

:func:`build_small_model` is the recipe they all need: a ``ModelConfig`` -> megatron's ``TransformerConfig`` at a
layout (``models.gpt_moe.build_transformer_config``) -> seeded ``GPTModel`` chunks -> megatron's DDP (or the
distributed optimizer's shard-aligned DDP, FSDP, or nothing). :meth:`SmallModel.build_optimizer` puts Muon + AdamW
on it (``optim.build.build_optimizer``), the AdamW side's precision and distributed optimizer following the model.
The trainer's own path is ``training/parts.py``; this one leaves out the run config's other sections.

Call inside a process whose megatron parallel state is initialized (``run_distributed`` on the CPU, the
``cuda_world`` fixture of tests/gpu on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from megatron_muon.config.schema import ModelConfig

if TYPE_CHECKING:
    from megatron_muon.optim.options import MuonConfig

__all__ = ["SmallModel", "Wrapping", "build_small_model"]

Wrapping = Literal["ddp", "distributed_optimizer", "fsdp", "none"]


@dataclass(slots=True)
class SmallModel:
    """One rank's model and what it was built from."""

    model: ModelConfig
    """The model's shape and numerics."""
    config: Any
    """megatron's ``TransformerConfig`` (hooked into DDP or FSDP by the wrapping)."""
    chunks: list[Any]
    """One per virtual pipeline stage: megatron ``DistributedDataParallel``, ``FullyShardedChunk`` with
    ``wrap="fsdp"``, the bare ``GPTModel`` with ``wrap="none"``."""
    pg: Any
    """The megatron ``ProcessGroupCollection`` it was built with."""
    wrap: Wrapping

    def adam_config(self, **settings: Any) -> Any:
        """megatron's ``OptimizerConfig`` of the AdamW side: ``settings`` (lr, weight_decay, clip_grad, ...) over
        what the model decides: bf16 as the model's, the distributed optimizer as its wrapping."""
        from megatron.core.optimizer import OptimizerConfig

        model_side = {
            "bf16": bool(self.config.bf16),
            "fp16": False,
            "use_distributed_optimizer": self.wrap == "distributed_optimizer",
        }
        return OptimizerConfig(optimizer="adam", **(model_side | settings))

    def build_optimizer(self, muon: MuonConfig, adam: Any = None, **options: Any) -> Any:
        """Muon + AdamW over the chunks (megatron ``ChainedOptimizer``): ``muon`` for the hidden matrices,
        ``adam`` (default :meth:`adam_config`) for the rest; ``options``: ``optim.build.build_optimizer``'s
        keywords (``router_lr_multiplier``, ``cost_model``)."""
        from megatron_muon.optim.build import build_optimizer

        return build_optimizer(
            self.chunks, self.adam_config() if adam is None else adam, muon, self.pg, **options
        )


def build_small_model(
    model: ModelConfig | None = None,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    seed: int | None = 1234,
    wrap: Wrapping = "ddp",
    router: str = "adamw",
    ddp_config: Any = None,
    layout_independent: bool = False,
    device: torch.device | str = "cpu",
    config_fields: dict[str, Any] | None = None,
    pg: Any = None,
) -> SmallModel:
    """This rank's chunks of ``model`` (default ``ModelConfig()``: 4 layers, hidden 64, 4 experts) at TP ``tp``,
    PP ``pp``, EP ``ep``, expert-TP ``etp`` (None: ``tp``) and ``vpp`` virtual stages per pipeline rank.

    ``seed``: torch's generator and megatron's tensor-parallel RNG tracker are seeded with it just before the build
    (None: left as they are); ``layout_independent``: the weights are then redrawn by the trainer's
    layout-independent initialization from ``seed`` (``training/initialization.py``).
    ``wrap``: ``ddp`` (megatron's DDP with ``ddp_config``; None: ``wrap_in_ddp``'s default) |
    ``distributed_optimizer`` (Muon's parameters for ``router``, as ``MuonConfig.router``, tagged, then DDP with
    megatron's shard-aligned layout; ``ddp_config`` must use the distributed optimizer) | ``fsdp``
    (``training/fsdp.py``: fp32 shards gathered in the model's precision, as the trainer does) | ``none``.
    ``device``: on ``cuda`` megatron draws the weights on the GPU and the chunks are moved there before wrapping.
    ``config_fields``: megatron ``TransformerConfig`` fields that ``ModelConfig`` does not own (e.g. an FP8 recipe),
    set before the build. ``pg``: default megatron's global groups (``use_mpu_process_groups``).
    """
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_muon.models.gpt_moe import build_gpt_moe_model_chunks, build_transformer_config

    if wrap not in get_args(Wrapping):
        raise ValueError(f"wrap={wrap!r}; valid: {list(get_args(Wrapping))}")
    if layout_independent and seed is None:
        raise ValueError("layout_independent=True draws from seed; give one")
    if ddp_config is not None and wrap in ("fsdp", "none"):
        raise ValueError(f"ddp_config is for megatron's DDP; wrap={wrap!r} does not use it")
    if wrap == "distributed_optimizer" and ddp_config is None:
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    if ddp_config is not None and ddp_config.use_distributed_optimizer != (wrap == "distributed_optimizer"):
        raise ValueError(
            f"ddp_config.use_distributed_optimizer={ddp_config.use_distributed_optimizer} with wrap={wrap!r}: "
            "the distributed optimizer's layout needs wrap='distributed_optimizer' (it tags Muon's parameters)"
        )
    model = ModelConfig() if model is None else model
    pg = ProcessGroupCollection.use_mpu_process_groups() if pg is None else pg
    device = torch.device(device)
    config = build_transformer_config(
        model, tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp, use_cpu_initialization=device.type != "cuda"
    )
    for name, value in (config_fields or {}).items():
        if not hasattr(config, name):
            raise ValueError(f"TransformerConfig has no field {name!r}")
        setattr(config, name, value)
    compute_dtype = None
    if wrap == "fsdp" and config.params_dtype != torch.float32:
        compute_dtype, config.params_dtype = config.params_dtype, torch.float32
    if seed is not None:
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
    chunks = build_gpt_moe_model_chunks(model, config, pg)
    if device.type == "cuda":
        chunks = [chunk.to(device) for chunk in chunks]
    if layout_independent and seed is not None:
        from megatron_muon.training.initialization import initialize_layout_independent_

        initialize_layout_independent_(chunks, config, seed)
    if wrap == "fsdp":
        from megatron_muon.training.fsdp import wrap_in_fsdp

        chunks = wrap_in_fsdp(chunks, config, pg_collection=pg, param_dtype=compute_dtype)
    elif wrap in ("ddp", "distributed_optimizer"):
        from megatron_muon.training.step import wrap_in_ddp

        if wrap == "distributed_optimizer":
            from megatron_muon.optim.layer_wise import tag_muon_params

            tag_muon_params(chunks, router=router)
        chunks = wrap_in_ddp(chunks, config, pg_collection=pg, ddp_config=ddp_config)
    return SmallModel(model=model, config=config, chunks=chunks, pg=pg, wrap=wrap)
