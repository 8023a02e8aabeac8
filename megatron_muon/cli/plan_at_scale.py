"""The optimizer at cluster scale, predicted on one CPU process: per rank, the logical matrices, our plan (mode
and owner per matrix), memory (distributed optimizer off / on), Newton–Schulz FLOPs, bytes per collective and the
optimizer-step time on a named GPU, for ours and megatron-core's Muon modes. Nothing is measured.

    .venv/bin/python tools/plan_at_scale.py launch/configs/moonlight_16b_a3b_64gpu.yaml --world-size 512 \\
        --gpu h100 --json plan.json

Overrides (``key=value``) are the launcher's. ``--world-size`` replaces ``parallel.world_size``. The code and the
formulas live in ``megatron_muon/planning/`` (``cost.py`` states every formula).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    """Plan ``argv``'s config at its layout and print the table (and write the JSON); the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="YAML config (launch/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.ep=16")
    parser.add_argument("--world-size", type=int, default=None, help="number of GPUs (default: the config's)")
    parser.add_argument("--gpu", default="h100", help="h100 | h200 | b200 | cpu (default h100)")
    parser.add_argument(
        "--json", default=None, help="write the full report (every rank class and matrix) here"
    )
    args = parser.parse_args(argv)

    from megatron_muon.config import ConfigError, load_config, validate
    from megatron_muon.optim.plan import GPU_PROFILES

    if args.gpu not in GPU_PROFILES:
        print(f"error: --gpu {args.gpu!r} is unknown; valid: {sorted(GPU_PROFILES)}", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    if args.world_size is not None:
        overrides.append(f"parallel.world_size={args.world_size}")
    try:
        cfg = load_config(args.config, overrides)
        dims = validate(cfg)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from megatron_muon.planning.report import plan_at_scale, render_table

    try:
        report = plan_at_scale(cfg, dims, args.gpu, with_matrices=args.json is not None)
    except (ConfigError, ValueError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    print(render_table(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
