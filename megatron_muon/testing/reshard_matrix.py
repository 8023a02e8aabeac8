"""Checkpoints saved at one parallel layout and loaded at another: the model trained with the trainer's own
initialization (layout-independent, ``training/initialization.py``), Muon + AdamW, megatron's scheduler.

Each layout trains :data:`STEPS` steps from the same seed and saves after :data:`SAVE_AT`; a load at another
layout continues from that checkpoint and must reproduce the saving layout's own steps ``SAVE_AT+1 … STEPS``.
One process start per layout does its loads and its own save. Used by ``tests/distributed/test_checkpoint_layouts.py``
(a covering subset) and ``tools/checkpoint_reshard_matrix.py`` (every pair).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_muon.config.schema import ModelConfig

__all__ = [
    "DISTRIBUTED_OPTIMIZER_LAYOUTS",
    "FULLY_SHARDED_LAYOUTS",
    "LAYOUTS",
    "MODEL",
    "SAVE_AT",
    "STEPS",
    "matrix_markdown",
    "run_layout",
    "run_layout_processes",
    "run_matrix",
]

# name: (world size, tp, pp, ep, expert tp)
LAYOUTS: dict[str, tuple[int, int, int, int, int]] = {
    "w1": (1, 1, 1, 1, 1),
    "tp2_pp2_ep2": (4, 2, 2, 2, 1),
    "dp4_ep4": (4, 1, 1, 4, 1),
    "tp2_dp2": (4, 2, 1, 1, 1),
    "pp4": (4, 1, 4, 1, 1),
    "tp2_etp2_ep2": (4, 2, 1, 2, 2),
    "tp2_dp2_distopt": (4, 2, 1, 1, 1),
    "dp4_ep2_fsdp": (4, 1, 1, 2, 1),
}
DISTRIBUTED_OPTIMIZER_LAYOUTS = frozenset({"tp2_dp2_distopt"})
"""Layouts trained with ``optimizer.distributed_optimizer: true`` (Muon and AdamW state sharded over DP)."""
FULLY_SHARDED_LAYOUTS = frozenset({"dp4_ep2_fsdp"})
"""Layouts trained with ``parallel.fsdp: true`` (parameters, gradients and state sharded over DP; experts over
expert-DP)."""
MODEL: dict[str, Any] = dict(
    num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, num_moe_experts=4
)
GLOBAL_BATCH, MICRO_BATCH, SEED = 8, 2, 1234
STEPS, SAVE_AT = 4, 2


def _use_layout(name: str) -> None:
    """Check that this process group was started at ``name``'s layout (``run_distributed``'s sizes).

    One layout per process start: rebuilding megatron's parallel state inside a process leaves global state
    behind (megatron-core 0.19.2: the MoE metrics tracker keeps the previous layout's groups and a PP4 step then
    deadlocks in its all-reduce)."""
    from megatron.core import parallel_state

    world, tp, pp, ep, etp = LAYOUTS[name]
    actual = (
        torch.distributed.get_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size(),
        parallel_state.get_expert_tensor_parallel_world_size(),
    )
    if actual != (world, tp, pp, ep, etp):
        raise ValueError(
            f"layout {name} is (world, tp, pp, ep, etp) = {LAYOUTS[name]}; this process group is {actual}"
        )


def _build(
    name: str,
) -> tuple[
    ModelConfig, ProcessGroupCollection, list[torch.nn.Module], MegatronOptimizer, OptimizerParamScheduler
]:
    """Model chunks, optimizer and schedule of layout ``name`` (in a process group started at it), from the seed."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_muon.config.schema import ModelConfig
    from megatron_muon.optim.options import MuonConfig
    from megatron_muon.testing.small_model import build_small_model

    _use_layout(name)
    _, tp, pp, ep, etp = LAYOUTS[name]
    wrap: Literal["ddp", "distributed_optimizer", "fsdp"] = (
        "fsdp"
        if name in FULLY_SHARDED_LAYOUTS
        else "distributed_optimizer"
        if name in DISTRIBUTED_OPTIMIZER_LAYOUTS
        else "ddp"
    )
    small = build_small_model(
        ModelConfig(**MODEL),
        tp=tp,
        pp=pp,
        ep=ep,
        etp=etp,
        seed=SEED,
        layout_independent=True,  # the trainer's initialization
        wrap=wrap,
        router="adamw",
    )
    optimizer = small.build_optimizer(
        # fp32 Newton–Schulz: layouts then agree to rounding (bf16 NS differs by its own rounding per layout)
        MuonConfig(lr=0.02, min_lr=0.002, weight_decay=0.01, compute_dtype="float32", tp_mode="auto"),
        small.adam_config(lr=3e-3, min_lr=3e-4, weight_decay=0.01, clip_grad=1.0),
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=3e-4,
        max_lr=3e-3,
        min_lr=3e-4,
        lr_warmup_steps=1,
        lr_decay_steps=STEPS,
        lr_decay_style="cosine",
        start_wd=0.01,
        end_wd=0.01,
        wd_incr_steps=STEPS,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return small.model, small.pg, small.chunks, optimizer, scheduler


def _losses(
    cfg: ModelConfig,
    pg: ProcessGroupCollection,
    chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    first_step: int,
    last_step: int,
    save: Callable[[list[torch.nn.Module], MegatronOptimizer, OptimizerParamScheduler], None] | None = None,
) -> list[float]:
    """Train steps ``first_step … last_step`` (1-based) on the layout-independent synthetic stream."""
    from megatron_muon.training.step import synthetic_batches, train_step

    num_microbatches = GLOBAL_BATCH // (MICRO_BATCH * pg.dp.size())
    data = synthetic_batches(
        vocab_size=cfg.vocab_size,
        seq_length=cfg.seq_length,
        micro_batch_size=MICRO_BATCH,
        num_microbatches=num_microbatches,
        data_parallel_rank=pg.dp.rank(),
        data_parallel_size=pg.dp.size(),
        seed=7,
    )
    for _ in range((first_step - 1) * num_microbatches):
        next(data)
    losses = []
    for step in range(first_step, last_step + 1):
        result = train_step(
            chunks,
            optimizer,
            data,
            num_microbatches=num_microbatches,
            seq_length=cfg.seq_length,
            micro_batch_size=MICRO_BATCH,
            pg_collection=pg,
        )
        if result["skipped"]:
            raise RuntimeError(f"step {step} was skipped (NaN/Inf)")
        scheduler.step(increment=1)
        losses.append(float(result["loss"]))
        if save is not None and step == SAVE_AT:
            save(chunks, optimizer, scheduler)
    return losses


def run_layout(root: str, name: str, load_from: list[str], save: bool) -> dict[str, Any]:
    """Collective, in a process group started at layout ``name``: first load each checkpoint ``root/<source>`` of
    ``load_from`` and train steps ``SAVE_AT+1 … STEPS`` from it; then (``save``) train :data:`STEPS` steps from
    the seed and save after :data:`SAVE_AT` to ``root/<name>``.

    Returns ``{"resumed": {source: losses}, "losses": losses or None, "initial": this rank's pieces of the initial
    Muon matrices}`` (``testing/canonical.py: collect_pieces``; assemble them over ranks to compare layouts)."""
    from megatron_muon.testing.canonical import collect_pieces
    from megatron_muon.training.checkpoint import load_checkpoint, save_checkpoint

    result: dict[str, Any] = {"resumed": {}, "losses": None, "initial": None}
    for source in load_from:
        cfg, pg, chunks, optimizer, scheduler = _build(name)
        progress = load_checkpoint(Path(root) / source, chunks, optimizer, scheduler)
        if progress["iteration"] != SAVE_AT:
            raise RuntimeError(f"{source}: loaded iteration {progress['iteration']}, expected {SAVE_AT}")
        result["resumed"][source] = _losses(cfg, pg, chunks, optimizer, scheduler, SAVE_AT + 1, STEPS)
    if save:
        cfg, pg, chunks, optimizer, scheduler = _build(name)
        result["initial"] = collect_pieces(chunks)

        def save_now(
            chunks: list[torch.nn.Module], optimizer: MegatronOptimizer, scheduler: OptimizerParamScheduler
        ) -> None:
            save_checkpoint(
                Path(root) / name,
                SAVE_AT,
                chunks,
                optimizer,
                scheduler,
                consumed_samples=SAVE_AT * GLOBAL_BATCH,
                config_yaml=f"# saved at layout {name}\n",
                keep_last=0,
            )

        result["losses"] = _losses(cfg, pg, chunks, optimizer, scheduler, 1, STEPS, save_now)
    return result


def run_layout_processes(
    root: str, name: str, load_from: list[str], save: bool, timeout_s: float = 1800
) -> list[dict[str, Any]]:
    """:func:`run_layout` on a fresh process group of ``name``'s layout; its result on every rank."""
    from megatron_muon.testing.multiprocess import run_distributed

    world, tp, pp, ep, etp = LAYOUTS[name]
    return run_distributed(
        run_layout,
        world,
        tp=tp,
        pp=pp,
        ep=ep,
        etp=etp,
        args=(root, name, load_from, save),
        timeout_s=timeout_s,
    )


def run_matrix(root: str, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Every layout of ``names`` (default: all of :data:`LAYOUTS`) saves; every checkpoint loads at every one of
    them (two process starts per layout). Returns ``{"losses": {layout: [...]}, "resumed": {(saved, loaded):
    [...]}}``."""
    names = list(LAYOUTS) if names is None else list(names)
    unknown = [name for name in names if name not in LAYOUTS]
    if unknown or not names:
        raise ValueError(f"layouts {unknown or names} are not among {sorted(LAYOUTS)}")
    losses = {name: run_layout_processes(root, name, [], True)[0]["losses"] for name in names}
    resumed: dict[tuple[str, str], list[float]] = {}
    for target in names:
        loaded = run_layout_processes(root, target, names, False)[0]["resumed"]
        resumed |= {(source, target): values for source, values in loaded.items()}
    return {"losses": losses, "resumed": resumed}


def matrix_markdown(result: dict[str, Any]) -> str:
    """The largest |resumed loss − the saving layout's own loss| over steps SAVE_AT+1 … STEPS, per pair of the
    layouts that ``result`` holds."""
    names = list(result["losses"])
    lines = [
        "| saved at \\ loaded at | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for source in names:
        own = result["losses"][source][SAVE_AT:]
        cells = []
        for target in names:
            values = result["resumed"][(source, target)]
            cells.append(f"{max(abs(a - b) for a, b in zip(values, own, strict=True)):.1e}")
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    first = {name: values[0] for name, values in result["losses"].items()}
    lines.append("")
    lines.append(
        "Iteration-1 loss per layout (same seed): "
        + ", ".join(f"{name} {value:.6f}" for name, value in first.items())
    )
    return "\n".join(lines)
