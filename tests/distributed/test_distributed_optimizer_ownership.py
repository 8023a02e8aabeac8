"""``optimizer.distributed_optimizer``: which data-parallel rank owns (updates, keeps state for) each Muon parameter
is asserted equal to megatron's own assignment at start-up, with several DDP buckets per buffer (a small
``bucket_size``, as every real model has), and one real step — gradients from megatron's schedule and DDP's own
reduce-scatter, both overlaps on — updates every Muon parameter on every rank (none left to no owner)."""

from __future__ import annotations

import pytest
import torch

from megatron_muon.testing import run_distributed

pytestmark = pytest.mark.slow

MODEL = dict(
    num_layers=2,
    moe_layer_freq=[0, 1],
    hidden_size=64,
    ffn_hidden_size=128,
    moe_ffn_hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    num_moe_experts=4,
    vocab_size=256,
    seq_length=32,
)
BUCKET_SIZE = 8_192  # elements: several buckets per buffer of this model
MICRO_BATCH, MICROBATCHES = 2, 2


def _ownership_and_one_step(layout: dict):
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallelConfig

    from megatron_muon.config import ModelConfig
    from megatron_muon.optim import layer_wise
    from megatron_muon.optim.build import MuonConfig
    from megatron_muon.testing.small_model import build_small_model
    from megatron_muon.training.step import parameters_gathered, synthetic_batches, train_step

    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True,
        overlap_grad_reduce=True,
        overlap_param_gather=True,
        bucket_size=BUCKET_SIZE,
        grad_reduce_in_fp32=True,
    )
    small = build_small_model(
        ModelConfig(**MODEL),
        **layout,
        seed=7,
        wrap="distributed_optimizer",
        router="adamw",
        ddp_config=ddp_config,
    )
    cfg, pg, chunks = small.model, small.pg, small.chunks
    shard_aligned_buckets = sum(
        len(buffer.buckets)
        for chunk in chunks
        for buffer in [*chunk.buffers, *chunk.expert_parallel_buffers]
        if buffer.params and getattr(buffer.params[0], layer_wise.LAYER_WISE_ATTRIBUTE, False)
    )

    names = {id(p): name for chunk in chunks for name, p in chunk.named_parameters()}
    tagged = sorted(names[id(p)] for p in layer_wise.shard_assignment(chunks))
    owned = sorted(names[i] for i in layer_wise.owned_params(chunks, pg))  # asserts equality with megatron's

    # A rule that disagrees with megatron's for one parameter is refused, naming it.
    real = layer_wise.shard_assignment

    def skewed(model_chunks):
        assignment = real(model_chunks)
        first = min(assignment, key=lambda p: names[id(p)])
        shard, is_expert = assignment[first]
        size = (pg.expt_dp if is_expert else pg.dp_cp).size()
        assignment[first] = ((shard + 1) % size, is_expert)
        return assignment

    layer_wise.shard_assignment = skewed
    try:
        layer_wise.check_ownership_matches_megatron(chunks, pg)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    finally:
        layer_wise.shard_assignment = real

    optimizer = small.build_optimizer(
        MuonConfig(lr=0.05, weight_decay=0.0, compute_dtype="float32"),
        small.adam_config(lr=1e-3, weight_decay=0.0, clip_grad=1.0, overlap_param_gather=True),
    )
    before = {names[id(p)]: p.detach().clone() for p in layer_wise.shard_assignment(chunks)}
    data = synthetic_batches(
        vocab_size=cfg.vocab_size,
        seq_length=cfg.seq_length,
        micro_batch_size=MICRO_BATCH,
        num_microbatches=MICROBATCHES,
        data_parallel_rank=pg.dp.rank(),
        data_parallel_size=pg.dp.size(),
        seed=3,
    )
    result = train_step(
        chunks,
        optimizer,
        data,
        num_microbatches=MICROBATCHES,
        seq_length=cfg.seq_length,
        micro_batch_size=MICRO_BATCH,
        pg_collection=pg,
    )
    with parameters_gathered(chunks):  # overlap_param_gather: the all-gather waits for the next forward
        unchanged = sorted(
            name
            for name, p in ((names[id(p)], p) for p in layer_wise.shard_assignment(chunks))
            if torch.equal(p.detach(), before[name])
        )
    return dict(
        rank=dist.get_rank(),
        tp=pg.tp.rank(),
        expert_tp=pg.expt_tp.rank(),
        ep=pg.ep.rank(),
        dp=pg.dp_cp.size(),
        expt_dp=pg.expt_dp.size(),
        buckets=shard_aligned_buckets,
        tagged=tagged,
        owned=owned,
        refusal=refusal,
        skipped=bool(result["skipped"]),
        unchanged=unchanged,
    )


@pytest.mark.parametrize(
    "name, layout",
    [
        ("tp2_dp2", dict(tp=2, pp=1, ep=1, etp=1)),
        ("dp4_ep2", dict(tp=1, pp=1, ep=2, etp=1)),
        pytest.param(  # one expert-data-parallel rank: experts are not sharded
            "dp4_ep4", dict(tp=1, pp=1, ep=4, etp=1), marks=pytest.mark.extended
        ),
    ],
)
def test_ownership_matches_megatron_and_a_real_step_updates_every_muon_param(name, layout):
    per_rank = run_distributed(_ownership_and_one_step, 4, **layout, args=(layout,), timeout_s=300)
    for report in per_rank:
        assert report["buckets"] > 1, report["buckets"]  # several buckets, not one per buffer
        assert report["refusal"] is not None and "\n" not in report["refusal"], report["refusal"]
        assert "is owned by data-parallel shard" in report["refusal"] and "in megatron's" in report["refusal"]
        assert not report["skipped"] and report["unchanged"] == [], report["unchanged"]
    # Within each group of ranks that hold the same shard of the model, the owners partition the Muon
    # parameters: dense ones over the data-parallel group, experts over the expert-data-parallel group.
    for is_expert in (False, True):
        groups: dict[tuple, list[dict]] = {}
        for report in per_rank:
            key = (report["expert_tp"], report["ep"]) if is_expert else (report["tp"],)
            groups.setdefault(key, []).append(report)
        for key, members in groups.items():
            wanted = [n for n in members[0]["tagged"] if (".experts." in n) == is_expert]
            owned = [n for m in members for n in m["owned"] if (".experts." in n) == is_expert]
            assert sorted(owned) == sorted(wanted), (name, key, is_expert)
            size = members[0]["expt_dp" if is_expert else "dp"]
            if size > 1:  # really spread: no rank owns them all
                assert all(
                    len([n for n in m["owned"] if (".experts." in n) == is_expert]) < len(wanted)
                    for m in members
                )
