"""Entry point: ``python -m megatron_muon.pretrain CONFIG [key=value ...] [--dry-run]``.

Started once per process by ``launch/pretrain_muon.sh`` (torchrun locally, srun under SLURM), which set
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. The configuration is loaded and validated before any
process group starts, against this machine too (a GPU-only option without a GPU is a one-line error);
``--dry-run`` prints the resolved configuration and the plan and exits. The device is
``megatron_muon.platform.device``'s decision: LOCAL_RANK's GPU with NCCL, or the CPU with gloo.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys


def _dry_run(cfg, dims) -> str:
    from megatron_muon.config import to_yaml
    from megatron_muon.config.cli import describe
    from megatron_muon.planning.dry_run import dry_run_lines

    lines = [to_yaml(cfg).rstrip(), "---", describe(cfg, dims), *dry_run_lines(cfg, dims)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_muon.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML config (launch/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.train_iters=20")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and plan, then exit"
    )
    args = parser.parse_args(argv)
    if not args.dry_run:
        from megatron_muon.training.lifetime import die_with_parent

        die_with_parent()  # under the launcher's guard: SIGKILL when torchrun dies, however it dies

    from megatron_muon.config import ConfigError, load_config, validate
    from megatron_muon.logging_setup import silence_known_warnings

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides)
        dims = validate(cfg, world_size if not args.dry_run or cfg.parallel.world_size is None else None)
    except (ConfigError, FileNotFoundError) as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(_dry_run(cfg, dims))
        return 0
    silence_known_warnings(verbose=cfg.logging.verbose)  # before megatron-core is imported
    from megatron_muon.platform.device import choose_device
    from megatron_muon.training.megatron_configs import check_buildable

    try:
        check_buildable(cfg, dims, choose_device())
    except (ConfigError, ValueError) as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        return 2
    return _run(cfg, dims)


def _run(cfg, dims) -> int:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_muon.platform.device import start_this_rank
    from megatron_muon.training.checkpoint import CheckpointError
    from megatron_muon.training.trainer import StopTraining, Trainer

    start_this_rank(timeout=datetime.timedelta(minutes=30))
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=dims.etp,
    )
    try:
        trainer = Trainer(cfg, dims, ProcessGroupCollection.use_mpu_process_groups())
        return trainer.train()
    except (StopTraining, CheckpointError, ValueError, FileNotFoundError) as error:
        if dist.get_rank() == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 3
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
