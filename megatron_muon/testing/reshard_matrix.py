"""Checkpoints saved at one parallel layout and loaded at another: the model trained with the trainer's own
initialization (layout-independent, ``training/initialization.py``), Muon + AdamW, megatron's scheduler.

Each layout trains :data:`STEPS` steps from the same seed and saves after :data:`SAVE_AT`; a load at another
layout continues from that checkpoint and must reproduce the saving layout's own steps ``SAVE_AT+1 … STEPS``.
Every layout of one world size runs inside the same processes (megatron's parallel state is rebuilt for each), so
the whole matrix costs one process start per world size. Used by ``tests/distributed/test_checkpoint_layouts.py``
(a covering subset) and ``tools/checkpoint_reshard_matrix.py`` (every pair).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["LAYOUTS", "MODEL", "SAVE_AT", "STEPS", "load_and_continue", "train_and_save"]

# name: (world size, tp, pp, ep, expert tp)
LAYOUTS: dict[str, tuple[int, int, int, int, int]] = {
    "w1": (1, 1, 1, 1, 1),
    "tp2_pp2_ep2": (4, 2, 2, 2, 1),
    "dp4_ep4": (4, 1, 1, 4, 1),
    "tp2_dp2": (4, 2, 1, 1, 1),
    "pp4": (4, 1, 4, 1, 1),
    "tp2_etp2_ep2": (4, 2, 1, 2, 2),
}
MODEL = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, num_moe_experts=4)
GLOBAL_BATCH, MICRO_BATCH, SEED = 8, 2, 1234
STEPS, SAVE_AT = 4, 2


def _use_layout(name: str) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    world, tp, pp, ep, etp = LAYOUTS[name]
    if torch.distributed.get_world_size() != world:
        raise ValueError(
            f"layout {name} needs world size {world}, this run has {torch.distributed.get_world_size()}"
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    torch.manual_seed(SEED)
    model_parallel_cuda_manual_seed(SEED)


def _build(name: str):
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_muon.models.tiny import TinyMoEConfig, build_gpt_moe_model_chunks, build_transformer_config
    from megatron_muon.optim.build import MuonOptions, build_optimizer
    from megatron_muon.training.initialization import initialize_layout_independent_
    from megatron_muon.training.step import wrap_in_ddp

    _use_layout(name)
    _, tp, pp, ep, etp = LAYOUTS[name]
    pg = ProcessGroupCollection.use_mpu_process_groups()
    cfg = TinyMoEConfig(**MODEL)
    config = build_transformer_config(cfg, tp=tp, pp=pp, ep=ep, etp=etp)
    chunks = build_gpt_moe_model_chunks(cfg, config, pg)
    initialize_layout_independent_(chunks, config, SEED)
    chunks = wrap_in_ddp(chunks, config, pg_collection=pg)
    optimizer = build_optimizer(
        chunks,
        OptimizerConfig(optimizer="adam", lr=3e-3, min_lr=3e-4, weight_decay=0.01, clip_grad=1.0),
        # fp32 Newton–Schulz: layouts then agree to rounding (bf16 NS differs by its own rounding per layout)
        MuonOptions(lr=0.02, min_lr=0.002, weight_decay=0.01, compute_dtype="float32", tp_mode="auto"),
        pg,
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
    return cfg, pg, chunks, optimizer, scheduler


def _losses(cfg, pg, chunks, optimizer, scheduler, first_step: int, last_step: int, save=None) -> list[float]:
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


def train_and_save(root: str, names: list[str]) -> dict[str, tuple[list[float], dict]]:
    """Collective: for each layout of ``names`` (all of this world size), train :data:`STEPS` steps from the seed
    and save after :data:`SAVE_AT` to ``root/<name>``. Returns every layout's losses and this rank's pieces of the
    initial Muon matrices (``testing/canonical.py: collect_pieces``; assemble them over ranks to compare)."""
    from megatron_muon.testing.canonical import collect_pieces
    from megatron_muon.training.checkpoint import save_checkpoint

    result = {}
    for name in names:
        cfg, pg, chunks, optimizer, scheduler = _build(name)
        initial = collect_pieces(chunks)

        def save(chunks, optimizer, scheduler, name=name):
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

        result[name] = (_losses(cfg, pg, chunks, optimizer, scheduler, 1, STEPS, save), initial)
    return result


def load_and_continue(root: str, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], list[float]]:
    """Collective: for each ``(saved at, load at)`` pair (load layouts of this world size), load ``root/<saved
    at>`` at the other layout and train steps ``SAVE_AT+1 … STEPS``. Returns their losses."""
    from megatron_muon.training.checkpoint import load_checkpoint

    result = {}
    for saved, target in pairs:
        cfg, pg, chunks, optimizer, scheduler = _build(target)
        progress = load_checkpoint(Path(root) / saved, chunks, optimizer, scheduler)
        if progress["iteration"] != SAVE_AT:
            raise RuntimeError(f"{saved}: loaded iteration {progress['iteration']}, expected {SAVE_AT}")
        result[(saved, target)] = _losses(cfg, pg, chunks, optimizer, scheduler, SAVE_AT + 1, STEPS)
    return result


def run_matrix(root: str, timeout_s: float = 1800) -> dict:
    """Every layout saves; every checkpoint loads at every layout (one process start per world size and phase).
    Returns ``{"losses": {layout: [...]}, "resumed": {(saved, loaded): [...]}}``."""
    from megatron_muon.testing.multiprocess import run_distributed

    world4 = [name for name, sizes in LAYOUTS.items() if sizes[0] == 4]
    losses = {
        name: value[0] for name, value in run_distributed(train_and_save, 1, args=(root, ["w1"]))[0].items()
    }
    saved4 = run_distributed(
        train_and_save, 4, tp=2, pp=2, ep=2, etp=1, args=(root, world4), timeout_s=timeout_s
    )
    losses |= {name: value[0] for name, value in saved4[0].items()}
    pairs4 = [(source, target) for source in LAYOUTS for target in world4]
    pairs1 = [(source, "w1") for source in LAYOUTS]
    resumed = run_distributed(
        load_and_continue, 4, tp=2, pp=2, ep=2, etp=1, args=(root, pairs4), timeout_s=timeout_s
    )[0]
    resumed |= run_distributed(load_and_continue, 1, args=(root, pairs1), timeout_s=timeout_s)[0]
    return {"losses": losses, "resumed": resumed}


def matrix_markdown(result: dict) -> str:
    """The largest |resumed loss − the saving layout's own loss| over steps SAVE_AT+1 … STEPS, per pair."""
    names = list(LAYOUTS)
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
