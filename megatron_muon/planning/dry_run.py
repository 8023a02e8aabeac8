"""What ``python -m megatron_muon.pretrain CONFIG --dry-run`` prints about the model and the optimizer at the
config's layout: exact parameters per rank (formula), the first rank built on meta (count, Muon / AdamW routing,
logical matrices at their true shapes), our memory per GPU item by item with the distributed optimizer off and on
(the config's ``optimizer.distributed_optimizer`` marked) and the predicted optimizer step of every mode
(``report.py``)."""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_muon.config.schema import ParallelDims, PretrainConfig


def dry_run_lines(cfg: PretrainConfig, dims: ParallelDims, gpu: str = "h100") -> list[str]:
    """The dry run's report for ``cfg`` at ``dims`` on ``gpu`` (a key of ``GPU_PROFILES``), one printed line each
    (module docstring); the meta build and the plan are replaced by one line where the model cannot be built."""
    from megatron_muon.config import ConfigError
    from megatron_muon.planning.rank_params import parameters_of_stage

    lines = []
    for pp_rank in range(dims.pp):
        p = parameters_of_stage(cfg.model, dims, pp_rank)
        lines.append(
            f"parameters per rank, stage {pp_rank}: {p.total:,} ({p.dense:,} dense incl. {p.embedding_and_output:,} "
            f"embedding/output and {p.replicated:,} replicated over TP; {p.expert:,} routed experts)"
        )
    try:
        from megatron_muon.planning.meta_build import build_rank_on_meta
        from megatron_muon.planning.report import itemized_memory_lines, plan_at_scale, render_table

        built = build_rank_on_meta(cfg, dims, 0)
        local = parameters_of_stage(cfg.model, dims, 0, transformer_impl="local")
        matrices = Counter(
            (_matrix_kind(piece.key), piece.shape, piece.num_shards)
            for _, pieces, _ in built.muon_pieces
            for piece in pieces
        )
        lines.append(
            f"rank 0 built on meta ({built.coordinates}): {built.parameter_count:,} parameters "
            f"({'=' if built.parameter_count == local.total else '!='} the formula for the local spec it is built "
            f"with); {built.routing.summary()}"
        )
        configured = parameters_of_stage(cfg.model, dims, 0)
        if configured.total != local.total:
            lines.append(
                f"  ({cfg.model.transformer_impl} holds {configured.total - local.total:+,} parameters per rank: "
                "it keeps MLA's down projections whole on every TP rank, the local spec splits them)"
            )
        lines.append(
            f"rank 0 holds {sum(matrices.values())} logical-matrix pieces (matrix, full shape, shards):"
        )
        lines += [
            f"  {count} x {part} {shape} /{shards}"
            for (part, shape, shards), count in sorted(matrices.items())
        ]
        report = plan_at_scale(cfg, dims, gpu, with_matrices=False)
        configured_mode = (
            "ours + FSDP"
            if cfg.parallel.fsdp
            else "ours + distributed optimizer"
            if cfg.optimizer.distributed_optimizer
            else "ours"
        )
        lines += itemized_memory_lines(report, configured_mode)
        lines.append(render_table(report))
    except (ConfigError, ValueError) as error:
        lines.append(f"meta build and optimizer plan: not available: {str(error).splitlines()[0]}")
    return lines


def _matrix_kind(key: str) -> str:
    """A logical-matrix key without its layer number and expert id: ``mlp.experts.local_experts.linear_fc1.weight/up``."""
    kind = re.sub(r"^.*?layers\.\d+\.", "", key)
    return re.sub(r"local_experts\.\d+\.", "local_experts.", kind)
