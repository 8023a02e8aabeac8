"""The config command line: load a YAML file with dotted overrides, validate it and print the run's arithmetic
(or the resolved YAML):

    python -m megatron_muon.config launch/configs/tiny_cpu.yaml model.hidden_size=256 --print
"""

from __future__ import annotations

import argparse
import sys
import typing

from megatron_muon.config.checks import validate
from megatron_muon.config.errors import ConfigError
from megatron_muon.config.loading import load_config, to_yaml
from megatron_muon.config.param_count import count_parameters
from megatron_muon.config.schema import ParallelDims, PretrainConfig

__all__ = ["describe", "main"]


def describe(cfg: PretrainConfig, dims: ParallelDims) -> str:
    """The run's arithmetic, a few lines: layout, batch, tokens and parameters."""
    train, model = cfg.training, cfg.model
    total, active = count_parameters(model)
    tokens_per_step = train.global_batch_size * model.seq_length
    accumulation = train.num_microbatches(dims.dp)
    return "\n".join(
        [
            dims.describe(),
            f"batch: {train.micro_batch_size} micro x {accumulation} accumulation x {dims.dp} DP = "
            f"{train.global_batch_size} sequences x {model.seq_length} tokens = {tokens_per_step:,} tokens/step",
            f"tokens: {train.train_iters:,} steps x {tokens_per_step:,} = {train.train_iters * tokens_per_step:,}",
            f"parameters: {total:,} total, {active:,} active per token",
        ]
    )


def main(argv: typing.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_muon.config",
        description="Load, validate and print a pretraining config (YAML + dotted overrides).",
    )
    parser.add_argument("config", help="YAML file, or 'none' for the defaults")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.hidden_size=128")
    parser.add_argument("--print", action="store_true", help="print the resolved YAML instead of the summary")
    parser.add_argument("--world-size", type=int, default=None, help="default: parallel.world_size")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(None if args.config == "none" else args.config, args.overrides)
        if args.print and args.world_size is None and cfg.parallel.world_size is None:
            print("note: not validated (world size unknown; pass --world-size)", file=sys.stderr)
        else:
            dims = validate(cfg, args.world_size)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if args.print:
        print(to_yaml(cfg), end="")
    else:
        print(describe(cfg, dims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
