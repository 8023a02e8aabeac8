"""The GPU program, checked without a GPU: chosen ranks of a run's real layout built and trained for two steps on
a fake GPU in this CPU process (``megatron_muon/rehearsal/``), under torch's fake process group at the config's
world size. Per rank: host syncs in a steady-state step (with the code location of each), collectives handed CPU
tensors, device mismatches, the static GPU memory (parameters, gradient buffers, optimizer state). Nothing is
computed: fake tensors have shapes, dtypes and devices, no values.

    .venv/bin/python tools/rehearse_gpu.py launch/configs/moonlight_16b_a3b_64gpu.yaml --ranks stages
    .venv/bin/python tools/rehearse_gpu.py launch/configs/kimi_k2_1t.yaml --world-size 256 --ranks 0,255 \\
        --json rehearsal.json

``--ranks``: a comma-separated list of global ranks, or ``stages`` (the first rank of every pipeline stage; the
default). ``--distributed-optimizer``: ``both`` (default), ``on``, ``off`` or ``config``. ``--dtype bf16`` sets
``model.precision``. ``--max-syncs`` (default 1: the step's one read of loss, gradient norm and skip decision).
Exit status 1 when a rank fails, 2 on bad input. Where the rehearsal is narrower than a GPU run is printed with the
report (``rehearsal/rank.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_muon.config.schema import ParallelDims
    from megatron_muon.rehearsal.rank import RankReport


def _ranks(spec: str, dims: ParallelDims) -> list[int]:
    if spec == "stages":
        return [stage * dims.stage_size for stage in range(dims.pp)]
    try:
        ranks = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"--ranks {spec!r} is neither 'stages' nor a comma-separated list of ranks"
        ) from None
    bad = [r for r in ranks if not 0 <= r < dims.world_size]
    if not ranks or bad:
        raise ValueError(
            f"--ranks {spec!r}: rank {bad[0] if bad else '(none)'} is outside the world of {dims.world_size} ranks "
            f"(valid: 0..{dims.world_size - 1})"
        )
    return ranks


def main(argv: list[str] | None = None) -> int:
    """Rehearse the chosen ranks of ``argv``'s config on a fake GPU and print each report; the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="YAML config (launch/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.ep=16")
    parser.add_argument("--world-size", type=int, default=None, help="number of GPUs (default: the config's)")
    parser.add_argument("--ranks", default="stages", help="'stages' (default) or a list such as 0,255")
    parser.add_argument(
        "--dtype", choices=("bf16", "fp32"), default=None, help="model.precision for the rehearsal"
    )
    parser.add_argument(
        "--distributed-optimizer", choices=("both", "on", "off", "config"), default="both", dest="distributed"
    )
    parser.add_argument("--max-syncs", type=int, default=1, help="host syncs allowed per steady-state step")
    parser.add_argument("--json", default=None, help="write one record per rank and optimizer mode here")
    args = parser.parse_args(argv)

    from megatron_muon.config import ConfigError, load_config, validate
    from megatron_muon.logging_setup import silence_known_warnings

    overrides = list(args.overrides)
    if args.world_size is not None:
        overrides.append(f"parallel.world_size={args.world_size}")
    if args.dtype is not None:
        overrides.append(f"model.precision={args.dtype}")
    try:
        cfg = load_config(args.config, overrides)
        dims = validate(cfg)
        ranks = _ranks(args.ranks, dims)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.max_syncs < 0:
        print(f"error: --max-syncs {args.max_syncs} must be >= 0", file=sys.stderr)
        return 2
    silence_known_warnings(verbose=False)
    from megatron_muon.rehearsal.rank import rehearse_rank

    modes = {
        "both": [False, True],
        "on": [True],
        "off": [False],
        "config": [cfg.optimizer.distributed_optimizer],
    }[args.distributed]
    reports = []
    for rank in ranks:
        for distributed in modes:
            report = rehearse_rank(
                cfg, dims, rank, distributed_optimizer=distributed, max_syncs=args.max_syncs
            )
            reports.append(report)
            _print(report)
    if reports:
        print("narrowed (as a GPU run would not be): " + "; ".join(reports[0].narrowed))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([r.to_json() for r in reports], handle, indent=1)
        print(f"wrote {args.json}")
    failed = [r for r in reports if not r.ok]
    print(f"{len(reports) - len(failed)} of {len(reports)} rank rehearsals passed")
    return 1 if failed else 0


def _print(report: RankReport) -> None:
    where = " ".join(f"{k}{v}" for k, v in report.coordinates.items())
    status = "ok" if report.ok else "FAILED"
    print(
        f"rank {report.rank} ({where}) distributed_optimizer={str(report.distributed_optimizer).lower()}: {status} | "
        f"syncs/step {report.syncs_per_step} | static GPU memory {report.static_memory_gib:.2f} GiB | "
        f"{report.microbatches} microbatches | {report.seconds:.0f} s"
    )
    for site, count in report.sync_sites.items():
        print(f"    sync: {count}x {site}")
    first_only = {s: n for s, n in report.first_step_sync_sites.items() if s not in report.sync_sites}
    for site, count in first_only.items():
        print(f"    first step only: {count}x {site}")
    for error in report.errors:
        print(f"    error: {error}")
