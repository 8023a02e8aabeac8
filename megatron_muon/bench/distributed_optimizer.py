"""Memory and traffic per rank of the optimizers with bf16 parameters: ours with ``optimizer.distributed_optimizer``
off and on, and megatron-core 0.19.2's Muon with its layer-wise distributed optimizer, in one run (world 4, CPU,
gloo), and the table in docs/benchmarks.md.

Every contender gets its own copy of the same MoE GPT (its DDP buffers differ), bf16 parameters with fp32 main
params and fp32 gradient reduction, canonical weights and gradients (``megatron_muon.testing.canonical``), the
same Muon settings (lr, weight decay, Nesterov momentum, five fp32 Newton–Schulz steps, √(fan_out/fan_in)
scale, Q/K/V and the router weight in Muon, as megatron routes them):

* ``ours``: ``build_optimizer`` with ``tp_mode=auto`` on megatron's DDP (``use_distributed_optimizer=False``: fp32
  grads all-reduced, every data-parallel replica keeps fp32 main params and AdamW state);
* ``ours + distributed optimizer``: the same with ``use_distributed_optimizer=True`` (``optim/layer_wise.py``);
* ``ours + FSDP``: ``parallel.fsdp`` (``training/fsdp.py``): fp32 parameter and gradient shards over the
  data-parallel ranks (experts over expert-DP), bf16 compute; Muon gathers each matrix's rows to one owner;
* ``megatron layer-wise``: ``get_megatron_optimizer(OptimizerConfig(optimizer="muon", muon_tp_mode="duplicated",
  use_layer_wise_distributed_optimizer=True))`` on DDP with megatron's own parameter tags and shard-aligned layout
  (its exact TP mode; megatron also fuses SwiGLU gate/up into one matrix, ours splits them).

Per rank, after one step: bytes of parameters, gradient buffers, fp32 main params (the optimizers' params that are
not model params) and optimizer state (every tensor in the torch optimizers' state but step counts). Per step: the
bytes each rank sends (``bench/traffic.py``: gradient sync by megatron's ``finalize_model_grads``, then
``optimizer.step()`` with its exchanges and parameter all-gather), and the optimizer step's time, median over
``--steps`` round-robin rounds. One step = canonical gradients into ``main_grad``, gradient sync, optimizer step.

Usage: ``python tools/bench_distributed_optimizer.py --out docs/benchmarks.md`` (rewrites the text between
``<!-- bench_distributed_optimizer:start -->`` and ``<!-- bench_distributed_optimizer:end -->``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_muon.bench.matched_muon import megatron_muon_config, ours_muon_config, torch_optimizers
from megatron_muon.bench.report import cpu_description, load_average, publish, rerun_command
from megatron_muon.testing import run_distributed

START_MARKER = "<!-- bench_distributed_optimizer:start -->"
END_MARKER = "<!-- bench_distributed_optimizer:end -->"
WORLD_SIZE = 4
LAYOUTS = {
    "tp2_dp2": (dict(tp=2, pp=1, ep=1, etp=1), "TP2·DP2 (experts ETP1·EP1·EDP4)"),
    "tp2_ep2": (dict(tp=2, pp=1, ep=2, etp=1), "TP2·EP2 (dense DP2; experts ETP1·EP2·EDP2)"),
}
CONTENDERS = ("ours", "ours + distributed optimizer", "ours + FSDP", "megatron layer-wise")
MEMORY_COLUMNS = ("params", "grads", "main params", "optimizer state")


@dataclass(frozen=True, slots=True)
class Settings:
    lr: float = 0.02
    weight_decay: float = 0.1
    momentum: float = 0.95
    ns_steps: int = 5
    steps: int = 5


def _build_model(model: dict, layout: dict, pg: Any, contender: str) -> list[Any]:
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer.layer_wise_optimizer import tag_params_for_buffer_routing

    from megatron_muon.config.schema import ModelConfig
    from megatron_muon.testing.small_model import build_small_model
    from megatron_muon.training.step import wrap_in_ddp

    wrap = {
        "ours": "ddp",
        "ours + distributed optimizer": "distributed_optimizer",
        "ours + FSDP": "fsdp",  # fp32 shards (the master weights), gathered in bf16 for compute
        "megatron layer-wise": "none",
    }[contender]
    small = build_small_model(
        ModelConfig(**model, precision="bf16"), **layout, seed=0, wrap=wrap, router="muon", pg=pg
    )
    if contender != "megatron layer-wise":
        return small.chunks
    tag_params_for_buffer_routing(small.chunks)  # megatron's rule: every 2-D non-embedding weight to Muon
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    return wrap_in_ddp(small.chunks, small.config, pg_collection=pg, ddp_config=ddp_config)


def _build_optimizer(chunks: list[Any], pg: Any, contender: str, settings: Settings) -> Any:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_muon.optim.build import build_optimizer

    muon = dict(
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        momentum=settings.momentum,
        ns_steps=settings.ns_steps,
    )
    if contender == "megatron layer-wise":  # its exact TP mode
        config = megatron_muon_config(**muon, tp_mode="duplicated", layer_wise=True, clip_grad=1.0, bf16=True)
        return get_megatron_optimizer(config, chunks, pg_collection=pg)
    return build_optimizer(
        chunks,
        OptimizerConfig(
            optimizer="adam",
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            clip_grad=1.0,
            bf16=True,
            fp16=False,
            use_distributed_optimizer=contender == "ours + distributed optimizer",
        ),
        ours_muon_config(**muon, tp_mode="auto"),
        pg,
    )


def _tensor_bytes(value: Any, skip: frozenset[str] = frozenset({"step"})) -> int:
    if torch.is_tensor(value):
        local = value.to_local() if hasattr(value, "to_local") else value  # FSDP state: this rank's rows
        return local.numel() * local.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for k, v in value.items() if k not in skip)
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _memory(chunks: list[Any], optimizer: Any) -> dict[str, int]:
    """Bytes of this rank's parameters, gradients (DDP's buffers, or FSDP's sharded gradients), fp32 main params
    and optimizer state; an FSDP parameter counts this rank's rows."""
    from megatron_muon.optim.layout import local_tensor

    params = [local_tensor(p) for chunk in chunks for p in chunk.parameters()]
    model_storage = {p.data_ptr() for p in params}
    inner = [o for o in torch_optimizers(optimizer) if isinstance(o, torch.optim.Optimizer)]
    main = {
        id(p): p
        for o in inner
        for g in o.param_groups
        for p in g["params"]
        if local_tensor(p).data_ptr() not in model_storage
    }
    grads = 0
    for chunk in chunks:
        ddp_buffers = getattr(chunk, "buffers", None)
        if isinstance(ddp_buffers, list):
            grads += sum(_tensor_bytes(b.grad_data) for b in ddp_buffers + chunk.expert_parallel_buffers)
        else:  # FSDP
            grads += sum(
                _tensor_bytes(local_tensor(p.grad)) for p in chunk.parameters() if p.grad is not None
            )
    return {
        "params": sum(p.numel() * p.element_size() for p in params),
        "grads": grads,
        "main params": sum(_tensor_bytes(local_tensor(p)) for p in main.values()),
        "optimizer state": sum(_tensor_bytes(state) for o in inner for state in o.state.values()),
    }


def _step(chunks: list[Any], optimizer: Any, salt: str, options: Any, pg: Any) -> tuple[float, Counter[str]]:
    """One step from canonical gradients: gradient sync, then the optimizer; (optimizer seconds, bytes sent)."""
    from megatron.core.distributed import finalize_model_grads

    from megatron_muon.bench.traffic import count_sent_bytes
    from megatron_muon.testing.canonical import fill_canonical_

    fill_canonical_(chunks, salt=salt, grads=True, options=options)
    torch.distributed.barrier()
    with count_sent_bytes() as sent:
        finalize_model_grads(chunks, pg_collection=pg)
        torch.distributed.barrier()
        start = time.perf_counter()
        optimizer.step()
        torch.distributed.barrier()
        elapsed = time.perf_counter() - start
    return elapsed, sent


def _on_rank(layout: dict, model: dict, settings: Settings) -> dict[str, dict]:
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_muon.optim.layout import LayoutConfig
    from megatron_muon.testing.canonical import fill_canonical_

    pg = ProcessGroupCollection.use_mpu_process_groups()
    options = LayoutConfig(split_qkv=True, split_gate_up=True)
    runs: dict[str, tuple[list[Any], Any]] = {}
    results: dict[str, dict] = {}
    for contender in CONTENDERS:
        chunks = _build_model(model, layout, pg, contender)
        fill_canonical_(chunks, salt="weight", options=options)
        optimizer = _build_optimizer(chunks, pg, contender, settings)
        _, sent = _step(chunks, optimizer, "grad0", options, pg)  # allocates the state
        results[contender] = {"memory": _memory(chunks, optimizer), "sent": dict(sent), "times": []}
        runs[contender] = (chunks, optimizer)
    for round_index in range(settings.steps):  # round-robin: outside load hits every contender alike
        for contender, (chunks, optimizer) in runs.items():
            elapsed, _ = _step(chunks, optimizer, f"grad{round_index + 1}", options, pg)
            slowest = torch.tensor([elapsed], dtype=torch.float64)
            torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
            results[contender]["times"].append(float(slowest))
    return results


def measure_layout(name: str, model: dict, settings: Settings) -> list[dict[str, dict]]:
    layout, _ = LAYOUTS[name]
    return run_distributed(_on_rank, WORLD_SIZE, **layout, args=(layout, model, settings), timeout_s=1800)


def _mib(count: float) -> str:
    return f"{count / 2**20:.2f}"


def render_layout(name: str, per_rank: list[dict[str, dict]]) -> list[str]:
    _, title = LAYOUTS[name]
    lines = [
        f"**{title}**: MiB per rank (max over the 4 ranks; mean in brackets where they differ); KiB sent per rank "
        "and step (max, mean in brackets; by collective: the busiest rank's); optimizer step (median, slowest rank):",
        "",
        "| | " + " | ".join(MEMORY_COLUMNS) + " | total | sent per step | by collective | step ms |",
        "|---|" + "---:|" * (len(MEMORY_COLUMNS) + 3) + "---|",
    ]
    for contender in CONTENDERS:
        rows = [rank[contender] for rank in per_rank]
        cells = []
        for column in (*MEMORY_COLUMNS, "total"):
            values = [sum(r["memory"].values()) if column == "total" else r["memory"][column] for r in rows]
            high, mean = max(values), statistics.fmean(values)
            cells.append(_mib(high) + ("" if high == min(values) else f" ({_mib(mean)})"))
        sent = [sum(r["sent"].values()) for r in rows]
        busiest = rows[sent.index(max(sent))]["sent"]
        by_kind = ", ".join(f"{kind} {value / 1024:.0f}" for kind, value in sorted(busiest.items()) if value)
        step_ms = statistics.median(rows[0]["times"]) * 1e3
        lines.append(
            f"| {contender} | "
            + " | ".join(cells)
            + f" | {max(sent) / 1024:.0f} ({statistics.fmean(sent) / 1024:.0f}) | {by_kind} | {step_ms:.0f} |"
        )
    return lines


def render_section(command: str, model: dict, measured: dict[str, list[dict[str, dict]]]) -> str:
    import importlib.metadata

    lines = [
        START_MARKER,
        "## Distributed optimizer and FSDP: memory and traffic per rank (issues #12, #26)",
        "",
        f"Measured with `{command}` ({cpu_description()}; load average {load_average()} at the end; "
        f"megatron-core {importlib.metadata.version('megatron-core')}, torch {torch.__version__}). Model: "
        + ", ".join(f"{k}={v}" for k, v in model.items())
        + "; bf16 parameters, fp32 main params and gradient reduction. What each column counts and how bytes are "
        "charged: `megatron_muon/bench/distributed_optimizer.py`, `megatron_muon/bench/traffic.py`. `ours + FSDP` "
        "(`parallel.fsdp`) keeps fp32 shards of the parameters (they are the main params, so that column is 0) and "
        "of the gradients; its traffic here is the optimizer's only: FSDP's own collectives run inside forward and "
        "backward, which this benchmark does not run (per step and rank they send (DP-1)/DP of the local "
        "parameters twice in bf16, the all-gathers of forward and backward, and once in fp32, the gradient "
        "reduce-scatter: about 8 bytes per local parameter, as DDP's fp32 all-reduce does).",
        "",
    ]
    for name, per_rank in measured.items():
        lines += render_layout(name, per_rank) + [""]
    lines.append(END_MARKER)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender (median reported)")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-moe-experts", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--out", type=Path, help="markdown file whose section to rewrite")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps={args.steps} must be >= 1")
    model = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=2 * args.hidden_size,
        moe_ffn_hidden_size=args.hidden_size,
        num_attention_heads=8,
        num_query_groups=4,
        num_moe_experts=args.num_moe_experts,
        vocab_size=args.vocab_size,
        moe_layer_freq=[0] + [1] * (args.num_layers - 1),
    )
    settings = Settings(steps=args.steps)
    measured = {name: measure_layout(name, model, settings) for name in args.layouts}
    publish(
        render_section(rerun_command("bench_distributed_optimizer.py", argv), model, measured),
        args.out,
        START_MARKER,
        END_MARKER,
    )


if __name__ == "__main__":
    main()
