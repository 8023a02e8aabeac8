"""Benchmark one Muon optimizer step against megatron-core 0.19.2's own Muon and write the table into
docs/benchmarks.md.

Same MoE GPT, same parallel layout, same canonical weights and gradients (``megatron_muon.testing.canonical``),
world 4 on CPU with gloo. Contenders:

* ours: ``build_optimizer(..., MuonConfig(tp_mode=X))`` for X in auto, owner, duplicated, distributed, and auto
  with the GPU cost model ``CostModel()`` instead of ``CostModel.for_this_machine()``;
* megatron-core's Muon: ``get_megatron_optimizer(OptimizerConfig(optimizer="muon", muon_tp_mode=X, ...))`` for
  X in duplicated and distributed, each with and without its ``LayerWiseDistributedOptimizer``, and ``blockwise``
  (megatron's default; it orthogonalizes each TP shard on its own, so it is not the same update).

Settings are matched: lr, weight decay, momentum 0.95 with Nesterov, 5 Newton–Schulz steps with the same
polynomial (ours ``quintic`` = Keller Jordan's (3.4445, -4.7750, 2.0315) every step = Emerging-Optimizers'
``simple``; EO's ``quintic`` is a different, cycling 5-triple schedule), update scale √(fan_out/fan_in) (ours
``spectral`` = EO's ``unit_rms_norm``), fp32 Newton–Schulz (ours ``compute_dtype="float32"``, megatron
``muon_fp32_matmul_prec="highest"``; megatron's default ``"medium"`` makes EO cast the iterate to bf16 explicitly,
on CPU too), Q/K/V orthogonalized separately (both), and the MoE router weight in Muon (megatron routes every 2-D
non-embedding weight there, so ours runs with ``router="muon"``). One difference cannot be matched: megatron
orthogonalizes a SwiGLU ``linear_fc1`` as one fused [gate; up] matrix, ours splits gate and up (our layout
refuses a fused fc1 under TP, whose shards interleave gate and up rows), which costs ours ~20% more
Newton–Schulz FLOPs on fc1 for square gate/up blocks.

For each contender, on every rank: fill canonical weights, build the optimizer, then

1. agreement: fill canonical gradients into ``main_grad``, one ``optimizer.step()``, collect this rank's pieces of
   every Muon matrix; the parent assembles the full matrices and reports, per contender, the largest over
   matrices of ‖W − W_x‖_F / ‖W_x − W_0‖_F (relative to the weight change) for W_x = ours(auto), on the
   matrices both define alike (all but fc1), and W_x = a single-process reference (``ReferenceMuon``) with the
   contender's own matrices (fc1 fused for megatron), on all matrices;
2. memory: bytes of Muon momentum this rank keeps (ours: ``MatrixPlacement.state_bytes``; megatron: the
   tensors in its ``TensorParallelMuon.state``);
3. timing, after every contender is built (they share the model's parameters; the weights' values do not matter
   to the step time): ``--warmup`` + ``--steps`` rounds, each giving every contender one step — fill canonical
   gradients, ``barrier``, start the clock, ``optimizer.step()``, ``barrier``, stop. Round-robin, so that load
   from outside the benchmark hits all contenders alike. A step's time is the slowest rank's; the table gives
   the median over the timed rounds.

Megatron's ``LayerWiseDistributedOptimizer`` fails with fp32 parameters: it wraps its base optimizers in
megatron's mixed-precision wrappers only under bf16, and its step then calls ``prepare_grads`` on a raw
``TensorParallelMuon``. Each layer-wise contender is first run as shipped (the error is recorded in the table)
and then under :func:`_layer_wise_cpu_workarounds`: base optimizers wrapped in ``FP32Optimizer`` (what megatron's
own non-layer-wise path does), and gloo's all-gather taught the uneven sizes its parameter all-gather sends.

Usage::

    python tools/bench_muon_step.py --out docs/benchmarks.md

``--out`` rewrites only the text between ``<!-- bench_muon_step:start -->`` and ``<!-- bench_muon_step:end -->``
(appending the section when absent). ``--profile [NAME ...]`` prints a cProfile of rank 0's steps for the named
contenders (default: ours auto) to stderr; ``--contenders NAME ...`` runs a subset. Both layouts with the default
model take ~8 minutes on 2 cores. ``--wide-hidden-size H`` also runs every layout on a wider model (hidden H, dense
and expert FFN 4·H) in the same run; the section opens with ours auto ÷ megatron's best exact mode for each model
and layout side by side (``muon_step_report.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_muon.bench.matched_muon import megatron_muon_config, ours_muon_config, torch_optimizers
from megatron_muon.bench.muon_step_report import (
    END_MARKER,
    REFERENCE,
    START_MARKER,
    WORLD_SIZE,
    render_section,
)
from megatron_muon.bench.report import load_average, publish, rerun_command
from megatron_muon.testing import run_distributed

LAYOUTS = {
    # Dense: TP2 x DP2. Experts: expert-TP 1 x EP 1 x expert-DP 4.
    "tp2_dp2": dict(tp=2, pp=1, ep=1, etp=1),
    # Dense: TP2 x DP2. Experts: expert-TP 1 x EP 2 x expert-DP 2.
    "tp2_ep2": dict(tp=2, pp=1, ep=2, etp=1),
}
OURS_MODES = ("auto", "owner", "duplicated", "distributed")


@dataclass(frozen=True, slots=True)
class Settings:
    """Hyperparameters shared by every contender."""

    lr: float
    weight_decay: float
    momentum: float
    ns_steps: int
    steps: int
    warmup: int
    profile: tuple[str, ...]
    """Contenders to cProfile on rank 0 (three extra steps after the timed ones)."""


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    family: str
    """``ours`` or ``megatron``."""
    tp_mode: str
    layer_wise: bool = False
    exact: bool = True
    """Whether it computes the same update as a single-process Muon (blockwise does not)."""
    gpu_cost_model: bool = False
    """Ours only: give ``auto`` the GPU (H100) ``CostModel()`` instead of ``CostModel.for_this_machine()``, to
    show what the mode choice is worth on this machine."""


def contenders() -> list[Contender]:
    result = [Contender(name=f"ours {mode}", family="ours", tp_mode=mode) for mode in OURS_MODES]
    result.insert(
        1, Contender(name="ours auto, H100 cost model", family="ours", tp_mode="auto", gpu_cost_model=True)
    )
    for mode in ("duplicated", "distributed"):
        result.append(Contender(name=f"megatron {mode}", family="megatron", tp_mode=mode))
        result.append(
            Contender(name=f"megatron {mode} + layer-wise", family="megatron", tp_mode=mode, layer_wise=True)
        )
    result.append(Contender(name="megatron blockwise", family="megatron", tp_mode="blockwise", exact=False))
    return result


# --------------------------------------------------------------------------------------------------------------
# On each rank.
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _layer_wise_cpu_workarounds():
    """Make megatron's ``LayerWiseDistributedOptimizer`` run with fp32 params on gloo, while the block runs.

    Two benchmark-local patches, both undone on exit:

    1. fp32 params. Megatron-core 0.19.2 (optimizer/layer_wise_optimizer.py) wraps the base torch optimizers in
       ``Float16OptimizerWithFloat16Params`` under bf16 and leaves them raw otherwise, so ``ChainedOptimizer``
       fails on ``prepare_grads``. The constructor here first wraps them in ``FP32Optimizer`` (what megatron's
       non-layer-wise path does); its sharding narrows ``param_groups``, which ``FP32Optimizer`` forwards to the
       base optimizer, so the layer-wise sharding is unchanged.
    2. gloo. Its ``allgather_params`` all-gathers each rank's flattened shard, of a different size on every rank
       (NCCL accepts that; gloo raises "invalid tensor size"). ``torch.distributed.all_gather`` is wrapped so
       that uneven lists are padded to the largest size, gathered, and copied back — one extra copy per step.
    """
    from megatron.core.optimizer import FP32Optimizer, layer_wise_optimizer

    cls = layer_wise_optimizer.LayerWiseDistributedOptimizer
    original_init = cls.__init__
    original_all_gather = torch.distributed.all_gather

    def __init__(self, optimizers, config, pg_collection=None, init_state_fn_list=None, model_chunks=None):
        if not config.bf16:
            init_fns = init_state_fn_list or [None] * len(optimizers)
            optimizers = [
                FP32Optimizer(opt, config, fn) for opt, fn in zip(optimizers, init_fns, strict=True)
            ]
        original_init(self, optimizers, config, pg_collection, init_state_fn_list, model_chunks)

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        sizes = [t.numel() for t in tensor_list]
        if len(set(sizes)) <= 1 or async_op:
            return original_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        padded = [torch.zeros(max(sizes), dtype=tensor.dtype, device=tensor.device) for _ in sizes]
        source = torch.zeros(max(sizes), dtype=tensor.dtype, device=tensor.device)
        source[: tensor.numel()] = tensor.reshape(-1)
        original_all_gather(padded, source, group=group)
        for target, gathered in zip(tensor_list, padded, strict=True):
            target.copy_(gathered[: target.numel()].view_as(target))
        return None

    cls.__init__ = __init__
    torch.distributed.all_gather = all_gather
    try:
        yield
    finally:
        cls.__init__ = original_init
        torch.distributed.all_gather = original_all_gather


def _build_ours(chunks, contender: Contender, settings: Settings, pg):
    from megatron.core.optimizer import OptimizerConfig

    from megatron_muon.optim.build import build_optimizer
    from megatron_muon.optim.plan import CostModel

    return build_optimizer(
        chunks,
        OptimizerConfig(
            optimizer="adam",
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            clip_grad=0.0,
            bf16=False,
            fp16=False,
        ),
        ours_muon_config(
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            momentum=settings.momentum,
            ns_steps=settings.ns_steps,
            tp_mode=contender.tp_mode,
        ),
        pg,
        cost_model=CostModel() if contender.gpu_cost_model else None,
    )


def _build_megatron(chunks, contender: Contender, settings: Settings, pg):
    from megatron.core.optimizer import get_megatron_optimizer

    config = megatron_muon_config(
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        momentum=settings.momentum,
        ns_steps=settings.ns_steps,
        tp_mode=contender.tp_mode,
        layer_wise=contender.layer_wise,
        clip_grad=0.0,
        bf16=False,
    )
    return get_megatron_optimizer(config, chunks, pg_collection=pg)


def _muon_state_bytes(optimizer, family: str) -> int:
    total = 0
    for leaf in torch_optimizers(optimizer):
        if family == "ours" and hasattr(leaf, "placement"):
            total += leaf.placement.state_bytes(leaf)
        elif family == "megatron" and type(leaf).__name__ == "TensorParallelMuon":
            for state in leaf.state.values():
                total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total


def _ours_plan_facts(optimizer) -> dict:
    """Modes auto picked and the stage's total Muon state (each logical matrix once, fp32)."""
    modes: dict[str, int] = {}
    stage_bytes = 0
    loads: dict[int, float] = {}
    for leaf in torch_optimizers(optimizer):
        if hasattr(leaf, "placement"):
            plan = leaf.placement.plan
            for matrix in plan.matrices:
                modes[matrix.mode] = modes.get(matrix.mode, 0) + 1
                stage_bytes += matrix.shape[0] * matrix.shape[1] * 4
            for rank, flops in plan.loads.items():
                loads[rank] = loads.get(rank, 0.0) + flops
    return {
        "modes": modes,
        "stage_muon_state_bytes": stage_bytes,
        "ns_flops_per_rank": sorted(loads.values()),
    }


def _error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


def _timed_step(chunks, optimizer, salt: str, options, profiler=None) -> float:
    """Canonical gradients into ``main_grad`` (not timed), then ``optimizer.step()`` between two barriers
    (profiled too when a ``cProfile.Profile`` is given)."""
    from megatron_muon.testing.canonical import fill_canonical_

    fill_canonical_(chunks, salt=salt, grads=True, options=options)
    torch.distributed.barrier()
    if profiler is not None:
        profiler.enable()
    start = time.perf_counter()
    optimizer.step()
    torch.distributed.barrier()
    elapsed = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
    return elapsed


def _profile_steps(chunks, optimizer, steps: int, options) -> str:
    """cProfile of ``steps`` optimizer steps (rank 0 profiles; the others just step)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile() if torch.distributed.get_rank() == 0 else None
    for step in range(steps):
        _timed_step(chunks, optimizer, f"profile{step}", options, profiler)
    if profiler is None:
        return ""
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(40)
    stats.sort_stats("tottime").print_stats(25)
    return text.getvalue()


def _workarounds(contender: Contender):
    return _layer_wise_cpu_workarounds() if contender.layer_wise else contextlib.nullcontext()


def _bench_on_rank(layout: dict, model: dict, chosen: list[Contender], settings: Settings) -> dict:
    """On one rank: build every contender's optimizer on one model (agreement step and state bytes right after
    each build), then time them round-robin, one step each per round, so that load from outside this benchmark
    hits every contender alike. Returns name -> measurements of this rank."""
    from megatron_muon.config.schema import ModelConfig
    from megatron_muon.optim.layout import LayoutConfig
    from megatron_muon.testing.canonical import collect_pieces, fill_canonical_
    from megatron_muon.testing.small_model import build_small_model

    small = build_small_model(ModelConfig(**model), **layout, seed=0)
    pg, chunks = small.pg, small.chunks
    options = LayoutConfig(split_qkv=True, split_gate_up=True)
    builders = {"ours": _build_ours, "megatron": _build_megatron}

    def record_failure(result: dict, error: Exception) -> None:
        result["error"] = _error_text(error)
        result["traceback"] = traceback.format_exc()

    results: dict[str, dict] = {}
    optimizers: dict[str, object] = {}
    for contender in chosen:
        result: dict = {"error": None, "shipped_error": None, "times": []}
        results[contender.name] = result
        if contender.layer_wise:
            # As shipped: fails with fp32 params; record how.
            try:
                fill_canonical_(chunks, salt="weight", options=options)
                fill_canonical_(chunks, salt="grad0", grads=True, options=options)
                builders[contender.family](chunks, contender, settings, pg).step()
            except Exception as error:  # recorded in the table
                result["shipped_error"] = _error_text(error)
            gc.collect()
            torch.distributed.barrier()
        try:
            with _workarounds(contender):
                fill_canonical_(chunks, salt="weight", options=options)
                optimizer = builders[contender.family](chunks, contender, settings, pg)
                fill_canonical_(chunks, salt="grad0", grads=True, options=options)
                torch.distributed.barrier()
                optimizer.step()
            result["pieces"] = collect_pieces(chunks, options)
            result["state_bytes"] = _muon_state_bytes(optimizer, contender.family)
            if contender.family == "ours":
                result.update(_ours_plan_facts(optimizer))
            optimizers[contender.name] = optimizer
        except Exception as error:  # recorded in the table
            record_failure(result, error)
        torch.distributed.barrier()

    by_name = {c.name: c for c in chosen}
    for round_index in range(settings.warmup + settings.steps):
        for name in list(optimizers):
            try:
                with _workarounds(by_name[name]):
                    elapsed = _timed_step(chunks, optimizers[name], f"grad{round_index + 1}", options)
            except Exception as error:  # recorded in the table
                record_failure(results[name], error)
                del optimizers[name]
                torch.distributed.barrier()
                continue
            if round_index >= settings.warmup:
                results[name]["times"].append(elapsed)
    for name in settings.profile:
        if name in optimizers:
            with _workarounds(by_name[name]):
                results[name]["profile"] = _profile_steps(chunks, optimizers[name], 3, options)
    return results


# --------------------------------------------------------------------------------------------------------------
# In the parent.
# --------------------------------------------------------------------------------------------------------------


def _single_process_references(keys_and_shapes: dict[str, tuple[int, int]], settings: Settings):
    """Initial weights and one single-process Muon step, with fc1 split (ours) and fused (megatron's matrices)."""
    from megatron_muon.optim.reference import ReferenceMuon
    from megatron_muon.testing.canonical import canonical_tensor

    initial = {k: canonical_tensor(k, shape, salt="weight") for k, shape in keys_and_shapes.items()}
    grads = {k: canonical_tensor(k, shape, salt="grad0") for k, shape in keys_and_shapes.items()}
    hyper = dict(
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=True,
        weight_decay=settings.weight_decay,
        scale_mode="spectral",
        ns_steps=settings.ns_steps,
        coefficients="quintic",
        compute_dtype=torch.float32,
    )
    split = ReferenceMuon(initial, **hyper)
    split.step(grads)
    # Megatron's fc1 is the fused [gate; up]; its TP shards interleave the halves, a row permutation that
    # Newton-Schulz commutes with, so the fused single-process result is what megatron's exact modes must give.
    fused_keys = sorted(k[: -len("/gate")] for k in keys_and_shapes if k.endswith("/gate"))
    fused_initial = {k: torch.cat([initial[f"{k}/gate"], initial[f"{k}/up"]]) for k in fused_keys}
    fused = ReferenceMuon(fused_initial, **hyper)
    fused.step({k: torch.cat([grads[f"{k}/gate"], grads[f"{k}/up"]]) for k in fused_keys})
    megatron = dict(split.weights)
    for key, weight in fused.weights.items():
        megatron[f"{key}/gate"], megatron[f"{key}/up"] = weight.chunk(2)
    return initial, {"ours": split.weights, "megatron": megatron}


def _max_relative_difference(got, expected, initial, keys) -> float:
    """Largest over ``keys`` of ‖got − expected‖_F / ‖expected − initial‖_F."""
    return max(((got[k] - expected[k]).norm() / (expected[k] - initial[k]).norm()).item() for k in keys)


def _agreement(per_rank: list[dict], chosen: list[Contender], settings: Settings) -> dict[str, dict]:
    """Per contender: max relative difference after one step vs ours auto (matrices defined alike, i.e. all
    but fc1) and vs the single-process reference of its own matrices (all)."""
    from megatron_muon.testing.canonical import assemble

    assembled = {
        c.name: assemble([rank[c.name]["pieces"] for rank in per_rank])
        for c in chosen
        if all("pieces" in rank[c.name] for rank in per_rank)
    }
    if not assembled:
        return {}
    keys_and_shapes = {k: tuple(v.shape) for k, v in next(iter(assembled.values())).items()}
    initial, references = _single_process_references(keys_and_shapes, settings)
    stage_flops = _stage_newton_schulz_flops(keys_and_shapes, settings.ns_steps)
    common = [k for k in keys_and_shapes if not k.endswith(("/gate", "/up"))]
    result = {}
    for contender in chosen:
        got = assembled.get(contender.name)
        if got is None:
            continue
        if set(got) != set(keys_and_shapes):
            raise RuntimeError(
                f"{contender.name}: Muon matrices {sorted(set(got) ^ set(keys_and_shapes))[:4]} "
                "differ from the other contenders'"
            )
        entry = {
            "vs_reference": _max_relative_difference(
                got, references[contender.family], initial, keys_and_shapes
            )
        }
        if REFERENCE in assembled and contender.name != REFERENCE:
            entry["vs_ours"] = _max_relative_difference(got, assembled[REFERENCE], initial, common)
        result[contender.name] = entry
    result["stage_flops"] = stage_flops
    return result


def _stage_newton_schulz_flops(
    keys_and_shapes: dict[str, tuple[int, int]], ns_steps: int
) -> dict[str, float]:
    """Newton-Schulz FLOPs of one step over the stage's Muon matrices (router not collected), each matrix
    once: with fc1 split (ours) and fused (megatron)."""
    from megatron_muon.ops.newton_schulz import newton_schulz_flops

    ours = sum(newton_schulz_flops(rows, cols, ns_steps) for rows, cols in keys_and_shapes.values())
    megatron = 0
    for key, (rows, cols) in keys_and_shapes.items():
        if key.endswith("/up"):
            continue
        megatron += newton_schulz_flops(2 * rows if key.endswith("/gate") else rows, cols, ns_steps)
    return {"ours": ours, "megatron": megatron}


def measure_layout(layout_name: str, model: dict, chosen: list[Contender], settings: Settings) -> dict:
    layout = LAYOUTS[layout_name]
    load_before = load_average()
    started = time.perf_counter()
    per_rank = run_distributed(
        _bench_on_rank,
        WORLD_SIZE,
        tp=layout["tp"],
        pp=layout["pp"],
        ep=layout["ep"],
        etp=layout["etp"],
        args=(layout, model, chosen, settings),
        timeout_s=1800,
    )
    agreement = _agreement(per_rank, chosen, settings)
    rows = {}
    for contender in chosen:
        ranks = [rank[contender.name] for rank in per_rank]
        row = {
            "contender": asdict(contender),
            "error": next((r["error"] for r in ranks if r["error"]), None),
            "traceback": next((r.get("traceback") for r in ranks if r["error"]), None),
            "shipped_error": next((r["shipped_error"] for r in ranks if r["shipped_error"]), None),
            "agreement": agreement.get(contender.name, {}),
        }
        if row["error"] is None:
            slowest = [max(times) for times in zip(*(r["times"] for r in ranks), strict=True)]
            row["median_s"] = statistics.median(slowest)
            row["min_s"], row["max_s"] = min(slowest), max(slowest)
            row["state_bytes"] = [r["state_bytes"] for r in ranks]
            if contender.family == "ours":
                row["modes"] = ranks[0]["modes"]
                row["stage_muon_state_bytes"] = ranks[0]["stage_muon_state_bytes"]
                row["ns_flops_per_rank"] = ranks[0]["ns_flops_per_rank"]
        if ranks[0].get("profile"):
            row["profile"] = ranks[0]["profile"]
        rows[contender.name] = row
        print(
            f"[{layout_name}] {contender.name}: "
            + (f"{row['median_s'] * 1e3:.0f} ms" if row["error"] is None else row["error"])
            + "".join(f", {k} {v:.1e}" for k, v in row["agreement"].items()),
            file=sys.stderr,
            flush=True,
        )
    return {
        "rows": rows,
        "stage_flops": agreement.get("stage_flops"),
        "wall_s": time.perf_counter() - started,
        "load_before": load_before,
        "load_after": load_average(),
    }


def _model_kwargs(args) -> dict:
    return dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        num_moe_experts=args.num_moe_experts,
        vocab_size=args.vocab_size,
        moe_layer_freq=[0] + [1] * (args.num_layers - 1),
    )


def _models(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The default model and, with ``--wide-hidden-size H``, the same with hidden H and 4·H dense and expert FFNs
    (issue #22 item 5: "a wider one with hidden ≥ 384 and a 4× FFN")."""
    models = {"default": _model_kwargs(args)}
    if args.wide_hidden_size:
        wide = 4 * args.wide_hidden_size
        models[f"wide (hidden {args.wide_hidden_size}, 4× FFN)"] = dict(
            models["default"],
            hidden_size=args.wide_hidden_size,
            ffn_hidden_size=wide,
            moe_ffn_hidden_size=wide,
        )
    return models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument(
        "--contenders",
        nargs="+",
        default=None,
        help="subset of contender names (default: all); 'ours auto' is always run",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.95)
    parser.add_argument("--ns-steps", type=int, default=5)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--ffn-hidden-size", type=int, default=512)
    parser.add_argument("--moe-ffn-hidden-size", type=int, default=256)
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--num-query-groups", type=int, default=4)
    parser.add_argument("--num-moe-experts", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument(
        "--wide-hidden-size",
        type=int,
        default=0,
        help="also run a wide model: this hidden size, 4x FFN (dense and experts); 0: only the default model",
    )
    parser.add_argument(
        "--profile",
        nargs="*",
        default=None,
        metavar="CONTENDER",
        help="cProfile these contenders (default: ours auto) on rank 0 and print the stats",
    )
    parser.add_argument("--out", type=Path, help="markdown file whose section to rewrite")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps={args.steps} must be >= 1 and --warmup={args.warmup} >= 0")

    chosen = contenders()
    if args.contenders:
        unknown = set(args.contenders) - {c.name for c in chosen}
        if unknown:
            parser.error(f"unknown contenders {sorted(unknown)}; valid: {[c.name for c in chosen]}")
        chosen = [c for c in chosen if c.name in args.contenders or c.name == REFERENCE]
    settings = Settings(
        lr=args.lr,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        ns_steps=args.ns_steps,
        steps=args.steps,
        warmup=args.warmup,
        profile=() if args.profile is None else tuple(args.profile or [REFERENCE]),
    )
    command = rerun_command("bench_muon_step.py", argv)
    models = _models(args)
    measured = {
        (model_name, name): measure_layout(name, model, chosen, settings)
        for model_name, model in models.items()
        for name in args.layouts
    }
    for (_, layout_name), result in measured.items():
        for name, row in result["rows"].items():
            if row.get("traceback"):
                print(f"----- [{layout_name}] {name} failed -----\n{row['traceback']}", file=sys.stderr)
            if row.get("profile"):
                print(
                    f"----- [{layout_name}] {name}: cProfile of rank 0 -----\n{row['profile']}",
                    file=sys.stderr,
                )
    section = render_section(args, command.strip(), models, measured)
    publish(section, args.out, START_MARKER, END_MARKER)


if __name__ == "__main__":
    main()
