"""MuonClip's QK-clip on the tiny MoE GPT: a head with a planted large logit (scaled-up W_q and W_k rows) is
brought to at most τ by one step, heads under τ keep their weights bit for bit (except the key they share with a
clipped head under GQA), and TP1 and TP2 give the same result."""

from __future__ import annotations

import pytest
import torch

from megatron_muon.testing import run_distributed

pytestmark = pytest.mark.slow

MICRO_BATCH = 2
PLANTED_LAYER = 2  # global, 1-based
PLANT = 6.0  # the planted head's query and key rows are multiplied by this: its logits by 36
THRESHOLD = 1.0  # the canonical weights' logits are ~0.1; the planted head's ~3.3


def _qkv_layout(module) -> tuple[int, int, int]:
    return (
        module.num_attention_heads_per_partition,
        module.num_query_groups_per_partition,
        module.hidden_size_per_attention_head,
    )


def _qk_clip_step_on_rank(layout: dict, model: dict, clip: bool):
    """Plant a large logit in head 0 of layer 2, take one training step with QK-clip (or only recording), and
    measure each head's largest logit on the same batch again. Returns this rank's heads and weights."""
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
    attentions = {
        int(m.layer_number): m
        for m in chunks[0].modules()
        if hasattr(m, "linear_qkv") and hasattr(m, "core_attention")
    }
    heads, groups, d = _qkv_layout(attentions[PLANTED_LAYER])
    if pg.tp.rank() == 0:  # global head 0 and its key (group 0) live on TP rank 0
        weight = attentions[PLANTED_LAYER].linear_qkv.weight
        per_group = heads // groups
        with torch.no_grad():
            weight[:d] *= PLANT
            weight[per_group * d : (per_group + 1) * d] *= PLANT
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
    data = synthetic_batches(**stream)
    batch = next(synthetic_batches(**stream))  # the step's micro batch again, for the forward after it
    result = train_step(
        chunks,
        optimizer,
        data,
        num_microbatches=1,
        seq_length=cfg.seq_length,
        micro_batch_size=MICRO_BATCH,
        pg_collection=pg,
    )
    assert not result["skipped"]
    before = {n: a.core_attention.current_max_attn_logits.clone() for n, a in attentions.items()}
    per_layer = qk_clip.after_step()
    # The same batch again, forward only, in training mode so the hooks record.
    with torch.no_grad():
        chunks[0](
            batch["tokens"],
            batch["position_ids"],
            causal_attention_mask(cfg.seq_length),
        )
    after = {n: a.core_attention.current_max_attn_logits.clone() for n, a in attentions.items()}
    weights = {n: a.linear_qkv.weight.detach().clone() for n, a in attentions.items()}
    return dict(
        tp_rank=pg.tp.rank(),
        before=before,
        after=after,
        weights=weights,
        per_layer=per_layer,
        layout=(heads, groups, d),
    )


LAYOUTS = {  # name: (tp, model)
    "tp1_gqa": (1, dict(num_attention_heads=4, num_query_groups=2)),
    "tp2_gqa": (2, dict(num_attention_heads=4, num_query_groups=2)),
    "tp2_mha": (2, dict(num_attention_heads=4, num_query_groups=4)),
}


def _run(name: str, clip: bool) -> dict:
    """Per-head logits (before, after) of every layer in global head order, and each layer's full qkv rows
    grouped as ``[groups, rows per group, hidden]`` (TP ranks hold consecutive groups)."""
    tp, heads = LAYOUTS[name]
    model = dict(num_layers=2, moe_layer_freq=[0, 1], **heads)
    per_rank = run_distributed(
        _qk_clip_step_on_rank,
        tp,
        tp=tp,
        pp=1,
        ep=1,
        etp=1,
        args=(dict(tp=tp, pp=1, ep=1, etp=1), model, clip),
        timeout_s=300,
    )
    per_rank.sort(key=lambda r: r["tp_rank"])
    assert all(r["per_layer"] == per_rank[0]["per_layer"] for r in per_rank), "ranks report different maxima"
    _, groups, d = per_rank[0]["layout"]
    layers = per_rank[0]["before"].keys()
    return dict(
        before={n: torch.cat([r["before"][n] for r in per_rank]) for n in layers},
        after={n: torch.cat([r["after"][n] for r in per_rank]) for n in layers},
        weights={
            n: torch.cat([r["weights"][n].view(groups, -1, r["weights"][n].shape[-1]) for r in per_rank])
            for n in layers
        },
        per_layer=per_rank[0]["per_layer"],
        head_dim=d,
    )


@pytest.fixture(scope="module")
def runs():
    return {(name, clip): _run(name, clip) for name in LAYOUTS for clip in (True, False)}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planted_logit_is_clipped_and_other_heads_keep_their_weights(name, runs):
    clipped, plain = runs[name, True], runs[name, False]
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

    # One step with QK-clip brings the planted head to τ (the step itself moves weights by ~1e-5).
    after = clipped["after"][PLANTED_LAYER]
    assert after[0] <= THRESHOLD * 1.001, after.tolist()
    assert after[0] >= THRESHOLD * 0.99, f"clipped far below τ: {after.tolist()}"
    assert plain["after"][PLANTED_LAYER][0] > 2 * THRESHOLD  # without the clip it stays

    d = clipped["head_dim"]
    for layer, weights in clipped["weights"].items():
        reference = plain["weights"][layer]
        if layer != PLANTED_LAYER:
            assert torch.equal(weights, reference), f"layer {layer} changed although no head was above τ"
            continue
        groups, rows, _ = weights.shape
        per_group = rows // d - 2
        # Groups without the planted head: bit-identical. Its own group: the planted head's query and the
        # shared key are scaled; the other query heads of the group (GQA) and the values are not.
        assert torch.equal(weights[1:], reference[1:])
        q0, k0 = slice(0, d), slice(per_group * d, (per_group + 1) * d)
        untouched = torch.cat([weights[0, d : per_group * d], weights[0, (per_group + 1) * d :]])
        assert torch.equal(
            untouched, torch.cat([reference[0, d : per_group * d], reference[0, (per_group + 1) * d :]])
        )
        gamma = THRESHOLD / float(before[0])
        torch.testing.assert_close(weights[0, q0], reference[0, q0] * gamma**0.5, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(weights[0, k0], reference[0, k0] * gamma**0.5, rtol=1e-4, atol=1e-7)


def test_tp1_and_tp2_clip_the_same_way(runs):
    one, two = runs["tp1_gqa", True], runs["tp2_gqa", True]
    for layer in one["weights"]:
        torch.testing.assert_close(one["weights"][layer], two["weights"][layer], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(one["after"][layer], two["after"][layer], rtol=1e-4, atol=1e-6)
