"""MuonClip's QK-clip on multi-head latent attention (Kimi K2's rule): a head with a planted large logit (its
non-rotary query and key rows scaled up) is brought to τ by one step — its q_C and k_C rows scaled by √γ, its
rotary query rows q_R by γ — while the shared rotary key (``linear_kv_down_proj``), the values and every other
head keep their weights bit for bit; TP1 and TP2 clip the same way."""

from __future__ import annotations

import pytest
import torch

from megatron_muon.testing import run_distributed

pytestmark = pytest.mark.slow

MICRO_BATCH = 2
PLANTED_LAYER = 2  # global, 1-based
PLANT = 8.0  # head 0's q_C and k_C rows are multiplied by this: the non-rotary part of its logits by 64
THRESHOLD = 0.5  # the canonical weights' logits are ~0.04; the planted head's ~1.4 (compressed q) to ~5
QK, ROPE, V = 16, 8, 12
MLA = dict(
    num_layers=2,
    moe_layer_freq=[0, 1],
    multi_latent_attention=True,
    kv_lora_rank=32,
    qk_head_dim=QK,
    qk_pos_emb_head_dim=ROPE,
    v_head_dim=V,
    qk_layernorm=True,  # the latent norms sit before the up projections: the clip still acts
)


def _attention_weights(attention) -> dict[str, torch.Tensor]:
    q = attention.linear_q_proj if attention.config.q_lora_rank is None else attention.linear_q_up_proj
    return {
        "q": q.weight.detach().clone(),
        "kv_up": attention.linear_kv_up_proj.weight.detach().clone(),
        "kv_down": attention.linear_kv_down_proj.weight.detach().clone(),
    }


def _one_run(layout: dict, model: dict, clip: bool) -> dict:
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_muon.models.gpt_moe import (
        GptMoeConfig,
        build_gpt_moe_model_chunks,
        build_transformer_config,
        causal_attention_mask,
    )
    from megatron_muon.optim.build import MuonOptions, build_optimizer
    from megatron_muon.optim.qk_clip import QKClip
    from megatron_muon.testing.canonical import fill_canonical_
    from megatron_muon.training.step import synthetic_batches, train_step, wrap_in_ddp

    pg = ProcessGroupCollection.use_mpu_process_groups()
    cfg = GptMoeConfig(**model)
    config = build_transformer_config(cfg, **layout)
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    chunks = wrap_in_ddp(build_gpt_moe_model_chunks(cfg, config, pg), config, pg_collection=pg)
    fill_canonical_(chunks, salt="weight")
    attentions = {int(m.layer_number): m for m in chunks[0].modules() if hasattr(m, "linear_kv_up_proj")}
    planted = attentions[PLANTED_LAYER]
    if pg.tp.rank() == 0:  # global head 0 lives on TP rank 0: [q_C; q_R] and [k_C; v] rows per head
        weights = _attention_weights(planted)
        q = planted.linear_q_proj if cfg.q_lora_rank is None else planted.linear_q_up_proj
        with torch.no_grad():
            q.weight[:QK] *= PLANT
            planted.linear_kv_up_proj.weight[:QK] *= PLANT
    optimizer = build_optimizer(
        chunks,
        OptimizerConfig(optimizer="adam", lr=1e-5, weight_decay=0.0, clip_grad=0.0, bf16=False, fp16=False),
        MuonOptions(lr=1e-5, weight_decay=0.0, compute_dtype="float32"),
        pg,
    )
    qk_clip = QKClip(
        chunks,
        threshold=THRESHOLD,
        dp_cp_group=pg.dp_cp,
        mp_group=pg.mp,
        num_layers=cfg.num_layers,
        clip=clip,
    )
    stream = dict(
        vocab_size=cfg.vocab_size,
        seq_length=cfg.seq_length,
        micro_batch_size=MICRO_BATCH,
        num_microbatches=1,
        data_parallel_rank=0,
        data_parallel_size=1,
        seed=7,
    )
    batch = next(synthetic_batches(**stream))
    result = train_step(
        chunks,
        optimizer,
        synthetic_batches(**stream),
        num_microbatches=1,
        seq_length=cfg.seq_length,
        micro_batch_size=MICRO_BATCH,
        pg_collection=pg,
    )
    assert not result["skipped"]
    before = {n: a.core_attention.current_max_attn_logits.clone() for n, a in attentions.items()}
    per_layer = qk_clip.after_step()
    with torch.no_grad():  # the same batch again, in training mode so the hooks record
        chunks[0](batch["tokens"], batch["position_ids"], causal_attention_mask(cfg.seq_length))
    after = {n: a.core_attention.current_max_attn_logits.clone() for n, a in attentions.items()}
    weights = {n: _attention_weights(a) for n, a in attentions.items()}
    return dict(before=before, after=after, weights=weights, per_layer=per_layer)


def _qk_clip_runs_on_rank(layout: dict, variants: dict) -> dict:
    """Per model variant: the same step with QK-clip and with recording only, from the same weights and batch."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    tp_rank = ProcessGroupCollection.use_mpu_process_groups().tp.rank()
    return {
        name: dict(
            tp_rank=tp_rank, clipped=_one_run(layout, model, True), plain=_one_run(layout, model, False)
        )
        for name, model in variants.items()
    }


LAYOUTS = {  # name: (tp, model overrides); one process group per TP size, its variants run in turn
    "tp1_direct_q": (1, dict(q_lora_rank=None)),
    "tp2_direct_q": (2, dict(q_lora_rank=None)),
    "tp2_compressed_q": (2, dict(q_lora_rank=16)),
}


def _gather(per_rank: list[dict], run: str) -> dict:
    """Per-head logits in global head order and full weights (TP ranks hold consecutive heads / rows)."""
    first = per_rank[0][run]
    layers = first["before"].keys()
    return dict(
        before={n: torch.cat([r[run]["before"][n] for r in per_rank]) for n in layers},
        after={n: torch.cat([r[run]["after"][n] for r in per_rank]) for n in layers},
        weights={
            n: {w: torch.cat([r[run]["weights"][n][w] for r in per_rank]) for w in first["weights"][n]}
            for n in layers
        },
        per_layer=first["per_layer"],
    )


@pytest.fixture(scope="module")
def runs():
    results = {}
    for tp in sorted({tp for tp, _ in LAYOUTS.values()}):
        variants = {name: MLA | overrides for name, (size, overrides) in LAYOUTS.items() if size == tp}
        layout = dict(tp=tp, pp=1, ep=1, etp=1)
        per_rank = run_distributed(
            _qk_clip_runs_on_rank, tp, **layout, args=(layout, variants), timeout_s=300
        )
        for name in variants:
            by_rank = sorted((r[name] for r in per_rank), key=lambda r: r["tp_rank"])
            for run in ("clipped", "plain"):
                assert all(r[run]["per_layer"] == by_rank[0][run]["per_layer"] for r in by_rank)
                results[name, run] = _gather(by_rank, run)
    return results


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planted_mla_head_is_clipped_by_k2s_rule_and_nothing_else_changes(name, runs):
    clipped, plain = runs[name, "clipped"], runs[name, "plain"]
    before = plain["before"][PLANTED_LAYER]
    assert before[0] > 2 * THRESHOLD, f"the plant did not work: {before.tolist()}"
    others = [
        v
        for n, b in plain["before"].items()
        for h, v in enumerate(b.tolist())
        if (n, h) != (PLANTED_LAYER, 0)
    ]
    assert max(others) < THRESHOLD, f"a head other than the planted one is above τ: {others}"
    assert plain["per_layer"][PLANTED_LAYER] == pytest.approx(float(before[0]))

    after = clipped["after"][PLANTED_LAYER]
    assert THRESHOLD * 0.99 <= after[0] <= THRESHOLD * 1.001, after.tolist()
    assert plain["after"][PLANTED_LAYER][0] > 2 * THRESHOLD  # without the clip it stays

    gamma = THRESHOLD / float(before[0])
    for layer, weights in clipped["weights"].items():
        reference = plain["weights"][layer]
        assert torch.equal(weights["kv_down"], reference["kv_down"]), "the shared rotary key must not change"
        if layer != PLANTED_LAYER:
            assert all(torch.equal(weights[w], reference[w]) for w in weights), f"layer {layer} changed"
            continue
        q, q_ref = weights["q"], reference["q"]
        kv, kv_ref = weights["kv_up"], reference["kv_up"]
        assert torch.equal(q[QK + ROPE :], q_ref[QK + ROPE :]) and torch.equal(kv[QK + V :], kv_ref[QK + V :])
        torch.testing.assert_close(q[:QK], q_ref[:QK] * gamma**0.5, rtol=1e-4, atol=1e-7)  # q_C: √γ
        torch.testing.assert_close(
            q[QK : QK + ROPE], q_ref[QK : QK + ROPE] * gamma, rtol=1e-4, atol=1e-7
        )  # q_R
        torch.testing.assert_close(kv[:QK], kv_ref[:QK] * gamma**0.5, rtol=1e-4, atol=1e-7)  # k_C: √γ
        assert torch.equal(kv[QK : QK + V], kv_ref[QK : QK + V])  # head 0's values


def test_tp1_and_tp2_clip_mla_the_same_way(runs):
    one, two = runs["tp1_direct_q", "clipped"], runs["tp2_direct_q", "clipped"]
    for layer in one["weights"]:
        for w in one["weights"][layer]:
            torch.testing.assert_close(
                one["weights"][layer][w], two["weights"][layer][w], rtol=1e-5, atol=1e-7
            )
        torch.testing.assert_close(one["after"][layer], two["after"][layer], rtol=1e-4, atol=1e-6)
