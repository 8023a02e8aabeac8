"""The QK-clip tests' experiment (MuonClip on the tiny MoE GPT, standard and latent attention): plant a large logit
in head 0 of one layer, take one training step with QK-clip and one with recording only, from the same weights and
batch, and measure every head's largest logit on that batch again.

One ``run_distributed`` per TP size runs all the model variants of that size in turn (a start of the ranks costs
seconds); the caller says how its attention is found, planted and read with a :class:`PlantedHead` of
module-level functions (they travel to the ranks by pickle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

import torch

from megatron_muon.testing.multiprocess import run_distributed

__all__ = ["PlantedHead", "run_planted"]


class _Layout(TypedDict):
    """The model-parallel sizes of one run (keywords of ``build_transformer_config`` and ``run_distributed``)."""

    tp: int
    pp: int
    ep: int
    etp: int


@dataclass(frozen=True, slots=True)
class PlantedHead:
    """What differs between attention kinds."""

    is_attention: Callable[[torch.nn.Module], bool]
    """Whether a module of the model is a self-attention of the kind under test."""
    plant: Callable[[torch.nn.Module], None]
    """Scale up head 0's query and key rows of this attention (called under ``no_grad`` on TP rank 0, which holds
    global head 0)."""
    weights: Callable[[torch.nn.Module], dict[str, torch.Tensor]]
    """Copies of this rank's weights to compare, each concatenated over TP ranks along dim 0."""
    threshold: float
    """QK-clip's τ."""
    planted_layer: int = 2
    """Global, 1-based."""
    micro_batch: int = 2


def _one_step(layout: _Layout, model: dict[str, Any], head: PlantedHead, clip: bool) -> dict[str, Any]:
    from megatron_muon.config.schema import ModelConfig
    from megatron_muon.models.gpt_moe import causal_attention_mask
    from megatron_muon.optim.options import MuonConfig
    from megatron_muon.optim.qk_clip import QKClip
    from megatron_muon.testing.canonical import fill_canonical_
    from megatron_muon.testing.small_model import build_small_model
    from megatron_muon.training.step import synthetic_batches, train_step

    small = build_small_model(ModelConfig(**model), **layout, seed=1234)
    cfg, pg, chunks = small.model, small.pg, small.chunks
    fill_canonical_(chunks, salt="weight")
    attentions = {int(m.layer_number): m for m in chunks[0].modules() if head.is_attention(m)}
    if pg.tp.rank() == 0:
        with torch.no_grad():
            head.plant(attentions[head.planted_layer])
    optimizer = small.build_optimizer(
        MuonConfig(lr=1e-5, weight_decay=0.0, compute_dtype="float32"),
        small.adam_config(lr=1e-5, weight_decay=0.0, clip_grad=0.0),
    )
    qk_clip = QKClip(
        chunks,
        threshold=head.threshold,
        dp_cp_group=pg.dp_cp,
        mp_group=pg.mp,
        num_layers=cfg.num_layers,
        clip=clip,
    )
    stream = dict(
        vocab_size=cfg.vocab_size,
        seq_length=cfg.seq_length,
        micro_batch_size=head.micro_batch,
        num_microbatches=1,
        data_parallel_rank=0,
        data_parallel_size=1,
        seed=7,
    )
    batch = next(synthetic_batches(**stream))  # the step's micro batch again, for the forward after it
    result = train_step(
        chunks,
        optimizer,
        synthetic_batches(**stream),
        num_microbatches=1,
        seq_length=cfg.seq_length,
        micro_batch_size=head.micro_batch,
        pg_collection=pg,
    )
    assert not result["skipped"]
    before = {n: a.core_attention.current_max_attn_logits.clone() for n, a in attentions.items()}
    per_layer = qk_clip.after_step()
    with torch.no_grad():  # the same batch again, in training mode so the hooks record
        chunks[0](batch["tokens"], batch["position_ids"], causal_attention_mask(cfg.seq_length))
    after = {n: a.core_attention.current_max_attn_logits.clone() for n, a in attentions.items()}
    weights = {n: head.weights(a) for n, a in attentions.items()}
    return dict(before=before, after=after, weights=weights, per_layer=per_layer)


def _clipped_and_plain_on_rank(
    layout: _Layout, variants: dict[str, dict[str, Any]], head: PlantedHead
) -> dict[str, dict[str, Any]]:
    """Per model variant: the step with QK-clip and with recording only."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    tp_rank = ProcessGroupCollection.use_mpu_process_groups().tp.rank()
    return {
        name: dict(
            tp_rank=tp_rank,
            clipped=_one_step(layout, model, head, True),
            plain=_one_step(layout, model, head, False),
        )
        for name, model in variants.items()
    }


def _gather(by_rank: list[dict[str, Any]], run: str) -> dict[str, Any]:
    """Per-head logits in global head order and full weights (TP ranks hold consecutive heads / rows)."""
    first = by_rank[0][run]
    layers = first["before"].keys()
    return dict(
        before={n: torch.cat([r[run]["before"][n] for r in by_rank]) for n in layers},
        after={n: torch.cat([r[run]["after"][n] for r in by_rank]) for n in layers},
        weights={
            n: {w: torch.cat([r[run]["weights"][n][w] for r in by_rank]) for w in first["weights"][n]}
            for n in layers
        },
        per_layer=first["per_layer"],
    )


def run_planted(
    layouts: dict[str, tuple[int, dict[str, Any]]], head: PlantedHead
) -> dict[tuple[str, str], Any]:
    """``layouts``: name -> (TP size, model config). Returns, per (name, ``"clipped"`` or ``"plain"``): ``before``
    and ``after`` (per layer, every head's largest logit in global head order), ``weights`` (per layer, the full
    ``head.weights``) and ``per_layer`` (QK-clip's maxima, which every rank must report alike)."""
    results: dict[tuple[str, str], Any] = {}
    for tp in sorted({tp for tp, _ in layouts.values()}):
        variants = {name: model for name, (size, model) in layouts.items() if size == tp}
        layout = _Layout(tp=tp, pp=1, ep=1, etp=1)
        per_rank = run_distributed(
            _clipped_and_plain_on_rank, tp, **layout, args=(layout, variants, head), timeout_s=300
        )
        for name in variants:
            by_rank = sorted((r[name] for r in per_rank), key=lambda r: r["tp_rank"])
            for run in ("clipped", "plain"):
                maxima = [r[run]["per_layer"] for r in by_rank]
                assert all(m == maxima[0] for m in maxima), (
                    f"{name}, {run}: ranks report different maxima {maxima}"
                )
                results[name, run] = _gather(by_rank, run)
    return results
