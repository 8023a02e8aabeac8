"""Train the tiny MoE GPT with Muon + AdamW on several processes, through megatron-core's own schedule and DDP.

    .venv/bin/python examples/train_tiny_moe.py                      # 4 CPU processes, TP2 · PP2 · EP2
    .venv/bin/python examples/train_tiny_moe.py --tp 1 --pp 1 --ep 1 --world 4 --steps 50   # DP4

The arithmetic of the default run: global batch 16 sequences × 64 tokens = 1,024 tokens per step;
world 4 = TP2 × PP2 × DP1 (experts: EP2 × expert-TP1 × expert-DP1); micro batch 2 → 8 microbatches per step
through the 1F1B pipeline schedule. The data is synthetic (arithmetic token sequences, learnable): the loss starts
at ln(vocab 256) ≈ 5.55 nats and must fall well below it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch


def _train(args):
    from megatron.core import parallel_state

    from megatron_muon.config import ModelConfig
    from megatron_muon.optim.options import MuonConfig
    from megatron_muon.testing.small_model import build_small_model
    from megatron_muon.training.step import synthetic_batches, train_step

    cfg = ModelConfig(seq_length=args.seq_length, hidden_size=args.hidden_size, num_moe_experts=args.experts)
    # Seeded, in megatron's DDP; Muon for the hidden matrices, AdamW for the rest.
    small = build_small_model(cfg, tp=args.tp, pp=args.pp, ep=args.ep, etp=1, seed=args.seed)
    pg, chunks = small.pg, small.chunks
    optimizer = small.build_optimizer(
        MuonConfig(lr=args.muon_lr, weight_decay=0.1, tp_mode=args.tp_mode, compute_dtype="float32"),
        small.adam_config(lr=args.adam_lr, weight_decay=0.1, clip_grad=1.0),
    )
    dp_size = parallel_state.get_data_parallel_world_size()
    num_microbatches = args.global_batch // (args.micro_batch * dp_size)
    data = synthetic_batches(
        vocab_size=cfg.vocab_size,
        seq_length=cfg.seq_length,
        micro_batch_size=args.micro_batch,
        num_microbatches=num_microbatches,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=dp_size,
        seed=args.seed,
    )
    first = torch.distributed.get_rank() == 0
    losses = []
    for iteration in range(1, args.steps + 1):
        start = time.perf_counter()
        result = train_step(
            chunks,
            optimizer,
            data,
            num_microbatches=num_microbatches,
            seq_length=cfg.seq_length,
            micro_batch_size=args.micro_batch,
            pg_collection=pg,
        )
        elapsed = time.perf_counter() - start
        losses.append(result["loss"])
        if first and (iteration % args.log_interval == 0 or iteration == 1):
            tokens = args.global_batch * cfg.seq_length
            print(
                f" iteration {iteration:>5}/{args.steps} | consumed tokens {iteration * tokens:>9,} | "
                f"ms/iter {elapsed * 1e3:8.1f} | tokens/s {tokens / elapsed:9.0f} | lm loss {result['loss']:.4f} | "
                f"load balancing loss {result['load_balancing_loss']:.4f} | grad norm {result['grad_norm']:.3f}",
                flush=True,
            )
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=4, help="number of processes (default 4)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--muon-lr", type=float, default=0.02)
    parser.add_argument("--adam-lr", type=float, default=3e-3)
    parser.add_argument("--tp-mode", default="auto", choices=["auto", "owner", "duplicated", "distributed"])
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if args.world % (args.tp * args.pp):
        parser.error(f"--world={args.world} is not divisible by tp*pp={args.tp * args.pp}")
    dp = args.world // (args.tp * args.pp)
    if args.global_batch % (args.micro_batch * dp):
        parser.error(
            f"--global-batch={args.global_batch} is not divisible by micro batch x DP = {args.micro_batch * dp}"
        )

    from megatron_muon.testing import run_distributed

    print(
        f"training the tiny MoE with Muon on {args.world} processes: TP{args.tp} PP{args.pp} EP{args.ep} DP{dp}"
    )
    per_rank = run_distributed(
        _train, args.world, tp=args.tp, pp=args.pp, ep=args.ep, etp=1, args=(args,), timeout_s=3600
    )
    losses = per_rank[0]
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    print(f"loss {start:.3f} -> {end:.3f} nats (uniform over the vocabulary: {math.log(256):.3f})")
    return 0 if end < start - 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
