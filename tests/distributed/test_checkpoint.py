"""Distributed checkpoints of the tiny MoE GPT trained with Muon + AdamW: resuming is exact, a checkpoint loads at
another TP/PP/EP/DP layout with its Muon momentum, saves are published only when complete, and a damaged
checkpoint fails with one line naming it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from megatron_muon.testing import run_distributed

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 8
MICRO_BATCH = 2
MODEL = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, num_moe_experts=4)
SAVED_LAYOUT = dict(tp=2, pp=2, ep=2, etp=1)  # world 4
# Saved with sharded momentum (distributed mode) and replicated full momentum (duplicated mode, TP-sharded q/k/v);
# the reshard runs load it into owner and distributed plans.
SAVED_MODE = "distributed"
TOTAL_STEPS = 6
RESUME_STEP = 3
CONFIG_YAML = "model:\n  num_layers: 4\n"


def _setup(layout: dict, tp_mode: str, bf16: bool = False, normuon: bool = False):
    """Model (canonical, layout-independent weights), Muon + AdamW optimizer and a warmup + cosine schedule."""
    from megatron_muon.config import ModelConfig
    from megatron_muon.testing.canonical import fill_canonical_
    from megatron_muon.testing.small_model import build_small_model

    # bf16: bf16 model params; megatron's Float16 wrapper keeps fp32 main params for Muon and AdamW.
    model = ModelConfig(**MODEL, precision="bf16" if bf16 else "fp32")
    small = build_small_model(model, **layout, seed=1234)
    cfg, pg, chunks = small.model, small.pg, small.chunks
    fill_canonical_(chunks, salt="weight")
    optimizer = _build_optimizer(chunks, pg, tp_mode=tp_mode, bf16=bf16, normuon=normuon)
    scheduler = _scheduler(optimizer)
    return cfg, pg, chunks, optimizer, scheduler


def _scheduler(optimizer, max_lr: float = 3e-3, **options):
    """Warmup (1 step) + cosine to 3e-4 over TOTAL_STEPS, constant weight decay: megatron's scheduler."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=max_lr / 10,
        max_lr=max_lr,
        min_lr=3e-4,
        lr_warmup_steps=1,
        lr_decay_steps=TOTAL_STEPS,
        lr_decay_style="cosine",
        start_wd=0.01,
        end_wd=0.01,
        wd_incr_steps=TOTAL_STEPS,
        wd_incr_style="constant",
        **options,
    )


def _build_optimizer(chunks, pg, *, tp_mode: str, bf16: bool, split_qkv: bool = True, normuon: bool = False):
    from megatron.core.optimizer import OptimizerConfig

    from megatron_muon.optim.build import MuonConfig, build_optimizer

    return build_optimizer(
        chunks,
        OptimizerConfig(optimizer="adam", lr=3e-3, min_lr=3e-4, weight_decay=0.01, clip_grad=1.0, bf16=bf16),
        # fp32 Newton–Schulz: the losses of different layouts then agree to ~1e-5 (test_muon_training.py)
        MuonConfig(
            lr=0.02,
            min_lr=0.002,
            weight_decay=0.01,
            compute_dtype="float32",
            tp_mode=tp_mode,
            split_qkv=split_qkv,
            normuon=normuon,
        ),
        pg,
    )


def _data(cfg, pg, *, skip_steps: int):
    """The synthetic stream of this rank, advanced past ``skip_steps`` steps (what a resumed run consumed)."""
    from megatron_muon.training.step import synthetic_batches

    dp_size, dp_rank = pg.dp.size(), pg.dp.rank()
    num_microbatches = GLOBAL_BATCH // (MICRO_BATCH * dp_size)
    data = synthetic_batches(
        vocab_size=cfg.vocab_size,
        seq_length=cfg.seq_length,
        micro_batch_size=MICRO_BATCH,
        num_microbatches=num_microbatches,
        data_parallel_rank=dp_rank,
        data_parallel_size=dp_size,
        seed=7,
    )
    for _ in range(skip_steps * num_microbatches):
        next(data)
    return data, num_microbatches


def _train(cfg, pg, chunks, optimizer, scheduler, data, num_microbatches) -> float:
    from megatron_muon.training.step import train_step

    result = train_step(
        chunks,
        optimizer,
        data,
        num_microbatches=num_microbatches,
        seq_length=cfg.seq_length,
        micro_batch_size=MICRO_BATCH,
        pg_collection=pg,
    )
    assert not result["skipped"]
    scheduler.step(increment=1)
    return float(result["loss"])


def _momentum_by_rank(optimizer) -> list[tuple[str, int | None, int, int, str, torch.Tensor]]:
    """Every Muon momentum tensor this rank keeps, read from ``optimizer.state``: (matrix key, shard index or
    None for a whole matrix, shard dim, number of shards, plan mode, tensor)."""
    from megatron_muon.optim.muon import Muon

    found = []
    for member in optimizer.chained_optimizers:
        muon = member.optimizer
        if not isinstance(muon, Muon):
            continue
        plan = {m.key: m for m in muon.placement.plan.matrices}
        shard_of = {
            piece.key: piece.shard_index for group in muon.pieces for pieces in group for piece in pieces
        }
        for param_state in muon.state.values():
            for key, value in param_state.items():
                if not isinstance(value, dict) or "momentum" not in value:
                    continue
                matrix = plan[key]
                shard = shard_of[key] if matrix.mode == "distributed" else None
                found.append(
                    (key, shard, matrix.shard_dim, matrix.num_shards, matrix.mode, value["momentum"].clone())
                )
    return found


def _row_second_moments_by_rank(optimizer) -> list[tuple[str, int | None, int, int, str, torch.Tensor]]:
    """NorMuon's per-row second moments this rank keeps, in :func:`_momentum_by_rank`'s form (split along the
    rows only when a distributed matrix is; whole otherwise)."""
    from megatron_muon.optim.muon import ROW_SECOND_MOMENT, Muon

    found = []
    for member in optimizer.chained_optimizers:
        muon = member.optimizer
        if not isinstance(muon, Muon):
            continue
        plan = {m.key: m for m in muon.placement.plan.matrices}
        shard_of = {
            piece.key: piece.shard_index for group in muon.pieces for pieces in group for piece in pieces
        }
        for param_state in muon.state.values():
            for key, value in param_state.items():
                if isinstance(value, dict) and ROW_SECOND_MOMENT in value:
                    matrix = plan[key]
                    split = matrix.mode == "distributed" and matrix.shard_dim == 0
                    shard = shard_of[key] if split else None
                    found.append(
                        (key, shard, 0, matrix.num_shards, matrix.mode, value[ROW_SECOND_MOMENT].clone())
                    )
    return found


def _assemble_momentum(per_rank: list[list]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Full momentum of every logical matrix from every rank's :func:`_momentum_by_rank` (copies must agree),
    and the plan modes seen."""
    whole: dict[str, torch.Tensor] = {}
    shards: dict[str, dict[int, torch.Tensor]] = {}
    layout: dict[str, tuple[int, int]] = {}
    modes: set[str] = set()
    for found in per_rank:
        for key, shard, shard_dim, num_shards, mode, tensor in found:
            modes.add(mode)
            if shard is None:
                if key in whole:
                    assert torch.equal(whole[key], tensor), f"copies of the momentum of {key} differ"
                whole[key] = tensor
            else:
                shards.setdefault(key, {})[shard] = tensor
                layout[key] = (shard_dim, num_shards)
    for key, by_shard in shards.items():
        shard_dim, num_shards = layout[key]
        assert sorted(by_shard) == list(range(num_shards)), (
            f"{key}: shards {sorted(by_shard)} of {num_shards}"
        )
        whole[key] = torch.cat([by_shard[i] for i in range(num_shards)], dim=shard_dim)
    return whole, modes


def _listing(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _crashing_after(save):
    """``save``, followed by a crash: every rank's shards are on disk, the save never returns."""

    def crash_after_writing(*args, **kwargs):
        save(*args, **kwargs)
        raise OSError("simulated crash after the shards were written")

    return crash_after_writing


def _uninterrupted_run(root: str):
    """Train TOTAL_STEPS steps, saving after steps 1, 2, 3 (keep_last=2); a save after step 4 that crashes after
    writing its shards. Returns the losses, the momentum after step 3 and what rank 0 saw on disk."""
    from megatron_muon.training import checkpoint

    cfg, pg, chunks, optimizer, scheduler = _setup(SAVED_LAYOUT, SAVED_MODE)
    data, num_microbatches = _data(cfg, pg, skip_steps=0)
    root = Path(root)
    losses, seen, momentum = [], {}, None
    for step in range(1, TOTAL_STEPS + 1):
        losses.append(_train(cfg, pg, chunks, optimizer, scheduler, data, num_microbatches))
        if step <= RESUME_STEP:
            checkpoint.save_checkpoint(
                root,
                step,
                chunks,
                optimizer,
                scheduler,
                consumed_samples=step * GLOBAL_BATCH,
                config_yaml=CONFIG_YAML,
                keep_last=2,
            )
            seen[step] = (_listing(root), (root / checkpoint.LATEST_MARKER).read_text())
        if step == RESUME_STEP:
            momentum = _momentum_by_rank(optimizer)
        if step == RESUME_STEP + 1:
            real_save = checkpoint.dist_checkpointing.save
            checkpoint.dist_checkpointing.save = _crashing_after(real_save)
            try:
                checkpoint.save_checkpoint(
                    root,
                    step,
                    chunks,
                    optimizer,
                    scheduler,
                    consumed_samples=step * GLOBAL_BATCH,
                    config_yaml=CONFIG_YAML,
                    keep_last=2,
                )
                crashed = None
            except checkpoint.CheckpointError as error:
                crashed = str(error)
            finally:
                checkpoint.dist_checkpointing.save = real_save
            seen["crashed"] = (crashed, _listing(root), (root / checkpoint.LATEST_MARKER).read_text())
    return losses, momentum, seen


def _resumed_run(checkpoint_dir: str, layout: dict, tp_mode: str, steps: int, broken_dir: str | None = None):
    """Load ``checkpoint_dir`` at ``layout`` and train ``steps`` more steps. Returns the loaded progress, the
    momentum right after loading, the losses, and (with ``broken_dir``) what loading ``broken_dir``, a missing
    path, into an optimizer with other Muon matrices (fused QKV), and the weights only (``finetune``) did."""
    from megatron_muon.training.checkpoint import CheckpointError, load_checkpoint

    cfg, pg, chunks, optimizer, scheduler = _setup(layout, tp_mode)
    extra = {}
    if broken_dir is not None:
        for name, path in (("broken", broken_dir), ("missing", broken_dir + "-does-not-exist")):
            try:
                load_checkpoint(path, chunks, optimizer, scheduler)
                extra[name] = None
            except CheckpointError as error:
                extra[name] = str(error)
        fused_qkv = _build_optimizer(chunks, pg, tp_mode=tp_mode, bf16=False, split_qkv=False)
        try:
            load_checkpoint(checkpoint_dir, chunks, fused_qkv, None)
            extra["other_matrices"] = None
        except CheckpointError as error:
            extra["other_matrices"] = str(error)
        finetune = load_checkpoint(checkpoint_dir, chunks, optimizer, scheduler, finetune=True)
        extra["finetune"] = (finetune, len(_momentum_by_rank(optimizer)), scheduler.num_steps)
    progress = load_checkpoint(checkpoint_dir, chunks, optimizer, scheduler)
    momentum = _momentum_by_rank(optimizer)
    data, num_microbatches = _data(cfg, pg, skip_steps=progress["iteration"])
    losses = [_train(cfg, pg, chunks, optimizer, scheduler, data, num_microbatches) for _ in range(steps)]
    return progress, momentum, losses, extra


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    per_rank = run_distributed(_uninterrupted_run, 4, **SAVED_LAYOUT, args=(str(root),), timeout_s=300)
    losses, _, seen = per_rank[0]
    assert all(rank[0] == losses for rank in per_rank), "ranks report different losses"
    momentum, modes = _assemble_momentum([rank[1] for rank in per_rank])
    assert modes == {"distributed", "duplicated"}, modes  # what the reshard tests mean to load from
    return root, losses, momentum, seen


def test_resume_at_the_same_layout_continues_exactly(uninterrupted):
    root, losses, _, _ = uninterrupted
    per_rank = run_distributed(
        _resumed_run,
        4,
        **SAVED_LAYOUT,
        args=(str(root / f"iter_{RESUME_STEP:07d}"), SAVED_LAYOUT, SAVED_MODE, TOTAL_STEPS - RESUME_STEP),
        timeout_s=300,
    )
    progress, _, resumed, _ = per_rank[0]
    assert progress == {"iteration": RESUME_STEP, "consumed_samples": RESUME_STEP * GLOBAL_BATCH}
    worst = max(abs(a - b) for a, b in zip(resumed, losses[RESUME_STEP:], strict=True))
    assert worst <= 1e-6, (
        f"resumed losses {resumed} differ from the uninterrupted {losses[RESUME_STEP:]} by {worst:.2e}"
    )


RESHARD_LAYOUTS = {  # name: (world size, layout, Muon mode, plan modes expected to hold momentum)
    "tp1_pp2_dp2_owner": (4, dict(tp=1, pp=2, ep=1, etp=1), "owner", {"owner"}),
    "tp2_ep2_dp1_distributed": (
        2,
        dict(tp=2, pp=1, ep=2, etp=1),
        "distributed",
        {"distributed", "duplicated"},
    ),
}


@pytest.mark.parametrize("name", list(RESHARD_LAYOUTS))
def test_checkpoint_loads_at_another_layout_with_its_momentum(name, uninterrupted, tmp_path):
    root, losses, saved_momentum, _ = uninterrupted
    world, layout, tp_mode, expected_modes = RESHARD_LAYOUTS[name]
    source = root / f"iter_{RESUME_STEP:07d}"
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    shard_files = sorted(broken.glob("*.distcp"))
    assert shard_files, f"no shard files in {source}: {_listing(source)}"
    shard_files[-1].unlink()

    per_rank = run_distributed(
        _resumed_run,
        world,
        tp=layout["tp"],
        pp=layout["pp"],
        ep=layout["ep"],
        etp=layout["etp"],
        args=(str(root), layout, tp_mode, 2, str(broken)),
        timeout_s=300,  # the root: its marker names iter_0000003
    )
    progress, _, resumed, extra = per_rank[0]
    assert progress["iteration"] == RESUME_STEP

    # The Muon momentum was carried over, reassembled from another plan's pieces.
    loaded_momentum, modes = _assemble_momentum([rank[1] for rank in per_rank])
    assert modes == expected_modes, modes
    assert sorted(loaded_momentum) == sorted(saved_momentum)
    assert all(t.abs().max() > 0 for t in saved_momentum.values())
    for key, expected in saved_momentum.items():
        torch.testing.assert_close(loaded_momentum[key], expected, rtol=0, atol=1e-6, msg=key)

    # Step 4 (weights) and step 5 (after an update with the loaded optimizer state and schedule) match.
    worst = max(abs(a - b) for a, b in zip(resumed, losses[RESUME_STEP : RESUME_STEP + 2], strict=True))
    assert worst <= 1e-4, f"{name}: losses {resumed} vs {losses[RESUME_STEP : RESUME_STEP + 2]} ({worst:.2e})"

    # A damaged or missing checkpoint fails with one line that names it.
    assert extra["broken"] is not None and "\n" not in extra["broken"], extra
    assert str(broken) in extra["broken"] and shard_files[-1].name in extra["broken"], extra["broken"]
    assert extra["missing"] is not None and str(broken) + "-does-not-exist" in extra["missing"], extra

    # Momentum the checkpoint never saw (the fused QKV matrix; it saved q, k, v) is an error, before any load.
    assert extra["other_matrices"] is not None and "\n" not in extra["other_matrices"], extra
    assert str(root / f"iter_{RESUME_STEP:07d}") in extra["other_matrices"], extra["other_matrices"]
    fused_key = (
        r"missing, e\.g\. muon\.momentum\.decoder\.layers\.\d\.self_attention\.linear_qkv\.weight(?!/)"
    )
    assert re.search(fused_key, extra["other_matrices"]), extra["other_matrices"]

    # finetune: weights only; no momentum and the schedule at its start (the full load came after it).
    assert extra["finetune"] == ({"iteration": 0, "consumed_samples": 0}, 0, 0), extra["finetune"]


def test_keep_last_keeps_the_newest_two_and_latest_names_the_newest(uninterrupted):
    _, _, _, seen = uninterrupted
    files = ["latest_checkpointed_iteration.txt", "publication_log.txt"]
    assert seen[1] == (["iter_0000001", *files], "1\n")
    assert seen[2] == (["iter_0000001", "iter_0000002", *files], "2\n")
    assert seen[3] == (["iter_0000002", "iter_0000003", *files], "3\n")


def test_a_save_that_dies_midway_leaves_latest_on_the_previous_checkpoint(uninterrupted):
    from megatron_muon.training.checkpoint import CONFIG_FILENAME, find_latest

    root, _, _, seen = uninterrupted
    crashed, listing, marker = seen["crashed"]
    assert crashed is not None and "simulated crash" in crashed and "\n" not in crashed, crashed
    assert "the checkpoints published before are intact" in crashed, crashed
    assert marker == "3\n"
    assert "iter_0000004" not in listing and "iter_0000003" in listing and "iter_0000002" in listing, listing
    assert "iter_0000004.partial" not in listing, listing  # a save that fails (not a kill) frees its staging
    assert find_latest(root) == root / "iter_0000003"
    assert (root / "iter_0000003" / CONFIG_FILENAME).read_text() == CONFIG_YAML


def test_find_latest_of_an_empty_root_is_none(tmp_path):
    from megatron_muon.training.checkpoint import find_latest

    assert find_latest(tmp_path) is None


def _bf16_save_train_and_resume(root: str):
    """bf16 params at TP2 (world 2): train 2 steps, save, train steps 3-4; then a fresh model, optimizer and
    schedule load the checkpoint and train steps 3-4 again. Returns both pairs of losses."""
    from megatron_muon.training.checkpoint import load_checkpoint, save_checkpoint

    layout = dict(tp=2, pp=1, ep=1, etp=1)
    cfg, pg, chunks, optimizer, scheduler = _setup(layout, "auto", bf16=True)
    data, num_microbatches = _data(cfg, pg, skip_steps=0)
    for _ in range(2):
        _train(cfg, pg, chunks, optimizer, scheduler, data, num_microbatches)
    save_checkpoint(
        root,
        2,
        chunks,
        optimizer,
        scheduler,
        consumed_samples=2 * GLOBAL_BATCH,
        config_yaml=CONFIG_YAML,
        keep_last=1,
    )
    uninterrupted = [_train(cfg, pg, chunks, optimizer, scheduler, data, num_microbatches) for _ in range(2)]

    cfg, pg, chunks, optimizer, scheduler = _setup(layout, "auto", bf16=True)
    progress = load_checkpoint(root, chunks, optimizer, scheduler)
    data, num_microbatches = _data(cfg, pg, skip_steps=progress["iteration"])
    resumed = [_train(cfg, pg, chunks, optimizer, scheduler, data, num_microbatches) for _ in range(2)]
    return uninterrupted, resumed


def test_bf16_resume_restores_the_fp32_main_params(tmp_path):
    per_rank = run_distributed(
        _bf16_save_train_and_resume, 2, tp=2, etp=1, args=(str(tmp_path),), timeout_s=300
    )
    uninterrupted, resumed = per_rank[0]
    # Step 4 runs on weights updated from the fp32 main params: re-derived from the bf16 weights instead, they
    # would have lost their low bits.
    assert max(abs(a - b) for a, b in zip(uninterrupted, resumed, strict=True)) <= 1e-6, (
        uninterrupted,
        resumed,
    )


def _normuon_run(root: str, layout: dict, tp_mode: str, load: bool):
    """NorMuon: train 2 steps and save (or load that checkpoint), then one more step. Returns the row second
    moments at the checkpoint and the loss of the step after it."""
    from megatron_muon.training.checkpoint import load_checkpoint, save_checkpoint

    cfg, pg, chunks, optimizer, scheduler = _setup(layout, tp_mode, normuon=True)
    if load:
        load_checkpoint(root, chunks, optimizer, scheduler)
        data, num_microbatches = _data(cfg, pg, skip_steps=2)
    else:
        data, num_microbatches = _data(cfg, pg, skip_steps=0)
        for _ in range(2):
            _train(cfg, pg, chunks, optimizer, scheduler, data, num_microbatches)
        save_checkpoint(
            root,
            2,
            chunks,
            optimizer,
            scheduler,
            consumed_samples=2 * GLOBAL_BATCH,
            config_yaml=CONFIG_YAML,
            keep_last=1,
        )
    moments = _row_second_moments_by_rank(optimizer)
    return moments, _train(cfg, pg, chunks, optimizer, scheduler, data, num_microbatches)


def test_normuon_second_moments_reload_at_another_layout(tmp_path):
    """Saved by a TP2·EP2 run on shards (rows and columns split), loaded by a DP2 run that owns whole matrices."""
    saved = run_distributed(
        _normuon_run,
        2,
        tp=2,
        pp=1,
        ep=2,
        etp=1,
        args=(str(tmp_path), dict(tp=2, pp=1, ep=2, etp=1), "distributed", False),
        timeout_s=300,
    )
    loaded = run_distributed(
        _normuon_run,
        2,
        tp=1,
        pp=1,
        ep=1,
        etp=1,
        args=(str(tmp_path), dict(tp=1, pp=1, ep=1, etp=1), "owner", True),
        timeout_s=300,
    )
    saved_moments, saved_modes = _assemble_momentum([rank[0] for rank in saved])
    loaded_moments, loaded_modes = _assemble_momentum([rank[0] for rank in loaded])
    assert "distributed" in saved_modes and loaded_modes == {"owner"}, (saved_modes, loaded_modes)
    assert sorted(saved_moments) == sorted(loaded_moments) and saved_moments
    for key, expected in saved_moments.items():
        assert expected.abs().max() > 0, key
        torch.testing.assert_close(loaded_moments[key], expected, rtol=0, atol=1e-7, msg=key)
    assert abs(saved[0][1] - loaded[0][1]) <= 1e-4, (saved[0][1], loaded[0][1])


def _resume_with_changed_settings(root: str):
    """Save after one step; then a fresh optimizer with another AdamW LR and betas, Muon momentum and Nesterov, and
    a scheduler with another peak LR loads it. Returns what the loaded optimizer and scheduler hold."""
    from megatron.core.optimizer import OptimizerConfig

    from megatron_muon.optim.build import MuonConfig, build_optimizer
    from megatron_muon.optim.muon import Muon
    from megatron_muon.training.checkpoint import load_checkpoint, save_checkpoint

    layout = dict(tp=2, pp=1, ep=1, etp=1)
    cfg, pg, chunks, optimizer, scheduler = _setup(layout, "auto")
    data, num_microbatches = _data(cfg, pg, skip_steps=0)
    _train(cfg, pg, chunks, optimizer, scheduler, data, num_microbatches)
    save_checkpoint(
        root,
        1,
        chunks,
        optimizer,
        scheduler,
        consumed_samples=GLOBAL_BATCH,
        config_yaml=CONFIG_YAML,
        keep_last=1,
    )
    changed = build_optimizer(
        chunks,
        OptimizerConfig(
            optimizer="adam", lr=6e-3, min_lr=3e-4, weight_decay=0.01, adam_beta2=0.99, clip_grad=1.0
        ),
        MuonConfig(lr=0.02, min_lr=0.002, momentum=0.9, nesterov=False, compute_dtype="float32"),
        pg,
    )
    # As the trainer builds it (training/megatron_configs.py): the config's schedule wins on resume.
    changed_scheduler = _scheduler(
        changed, max_lr=6e-3, use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True
    )
    progress = load_checkpoint(root, chunks, changed, changed_scheduler)
    seen = {
        "progress": progress,
        "scheduler_max_lr": changed_scheduler.max_lr,
        "steps": changed_scheduler.num_steps,
    }
    for member in changed.chained_optimizers:
        for group in member.optimizer.param_groups:
            if not group["params"]:
                continue
            if isinstance(member.optimizer, Muon):
                seen.setdefault("muon", set()).add((group["momentum"], group["nesterov"]))
            else:
                seen.setdefault("adamw", set()).add((group["max_lr"], group["betas"]))
                state = member.optimizer.state[group["params"][0]]
                seen.setdefault("adamw_step", set()).add(float(state["step"]))
    return seen


def test_changed_optimizer_settings_take_effect_on_resume(tmp_path):
    """One rule for every setting: the resumed run's config is what runs; only the state comes from the checkpoint
    (megatron pairs saved param groups by identifiers that include the LR, and restores saved betas / momentum)."""
    seen = run_distributed(
        _resume_with_changed_settings, 2, tp=2, etp=1, args=(str(tmp_path),), timeout_s=300
    )[0]
    assert seen["progress"]["iteration"] == 1
    assert seen["muon"] == {(0.9, False)}, seen
    assert seen["adamw"] == {(6e-3, (0.9, 0.99))}, seen
    assert seen["scheduler_max_lr"] == 6e-3 and seen["steps"] == 1, seen
    assert seen["adamw_step"] == {1.0}, seen  # the state (step count) did come from the checkpoint
