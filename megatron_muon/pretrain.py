"""Entry point: ``python -m megatron_muon.pretrain CONFIG [key=value ...] [--dry-run] [--check [--facts FILE]]``.

Started once per process by ``launch/pretrain_muon.sh`` (torchrun locally, srun under SLURM), which set
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. The configuration is loaded and validated before any
process group starts, against this machine too (a GPU-only option without a GPU is a one-line error);
``--dry-run`` prints the resolved configuration and the plan and exits. The device is
``megatron_muon.platform.device``'s decision: LOCAL_RANK's GPU with NCCL, or the CPU with gloo.

``--check`` is the launcher's one check before it starts any training process (:func:`check_launch`): the
config at the launch's world size, an explicit ``checkpoint.resume`` path, what this machine can run, the data
files and the tokenizer; exit status 0, 2 (one line ``error: ...`` on stderr) or 4 (only the default Shakespeare
data is missing: the launcher prepares it); ``--facts FILE`` receives what the launch needs as ``key=value``
lines. With ``--dry-run`` the resume path and the data are notes, not errors, and the plan is printed after.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

EXIT_BAD_INPUT = 2
"""Exit status of a config, a path or a machine that cannot run (one line on stderr)."""
EXIT_SHAKESPEARE_MISSING = 4
"""``--check``'s exit status when the only problem is the default Shakespeare data being missing."""


def _error(message: object) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


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
    parser.add_argument(
        "--check",
        action="store_true",
        help="the launcher's check before any training process starts (see above), then exit",
    )
    parser.add_argument(
        "--facts", metavar="FILE", help="with --check: write what the launch needs as key=value lines"
    )
    args = parser.parse_args(argv)
    if args.facts and not args.check:
        parser.error("--facts goes with --check")
    if args.check:
        return check_launch(args.config, args.overrides, dry_run=args.dry_run, facts_path=args.facts)
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


def check_launch(config: str, overrides: list[str], *, dry_run: bool, facts_path: str | None) -> int:
    """What ``launch/pretrain_muon.sh`` checks in one process before it starts any training process; returns the
    exit status (module docstring). The facts: ``world_size`` (``parallel.world_size``, else SLURM's task count),
    ``device`` (cpu | cuda), ``gpus``, ``train_iters``, ``save_dir`` and ``shakespeare_missing`` (0 | 1)."""
    from megatron_muon.config import ConfigError, load_config, validate, validate_tokenizer
    from megatron_muon.platform.device import choose_device
    from megatron_muon.training.resume import explicit_resume_problem

    try:
        cfg = load_config(config, overrides)
        world_size = cfg.parallel.world_size or int(os.environ.get("SLURM_NTASKS") or 0)
        if not world_size:
            return _error(
                "parallel.world_size is not set and there is no SLURM allocation to take it from; "
                "set parallel.world_size=N"
            )
        dims = validate(cfg, world_size)
        resume_problem = explicit_resume_problem(
            save_dir=cfg.checkpoint.save_dir, resume=cfg.checkpoint.resume
        )
        if resume_problem is not None and not dry_run:
            return _error(resume_problem)
        if resume_problem is not None:
            print(f"note: {resume_problem} (a real launch stops here)")
        device = choose_device(local_rank=0)  # honours MEGATRON_MUON_DEVICE
        # What this machine cannot run (a GPU-only option without a GPU), and the model builder.
        if not dry_run:
            from megatron_muon.training.megatron_configs import check_buildable

            check_buildable(cfg, dims, device)
    except ValueError as error:  # ConfigError, and the device choice's one-line errors
        return _error(error)

    missing = _missing_data(cfg)
    shakespeare = os.path.abspath("data/shakespeare")
    is_shakespeare = not cfg.data.mock and all(
        os.path.abspath(path) == os.path.join(shakespeare, leaf)
        for path, leaf in [(entry.prefix, "shakespeare_text_document") for entry in cfg.data.blend]
        + [(cfg.data.tokenizer_path, "tokenizer")]
    )
    if facts_path:
        import torch

        facts = {
            "world_size": world_size,
            "device": device.type,
            "gpus": torch.cuda.device_count(),
            "train_iters": cfg.training.train_iters,
            "save_dir": cfg.checkpoint.save_dir or "",
            "shakespeare_missing": int(bool(missing) and is_shakespeare),
        }
        with open(facts_path, "w") as facts_file:
            facts_file.writelines(f"{key}={value}\n" for key, value in facts.items())
    if missing and dry_run and not is_shakespeare:
        print(f"note: {'; '.join(missing)} (a real launch stops here)")
    elif missing and not is_shakespeare:
        return _error("; ".join(missing))
    elif missing and not dry_run:
        return EXIT_SHAKESPEARE_MISSING
    if not missing and cfg.data.tokenizer_path:
        from megatron_muon.data import load_tokenizer

        try:
            validate_tokenizer(cfg, load_tokenizer(cfg.data.tokenizer_path).vocab_size)
        except (ConfigError, FileNotFoundError) as error:
            return _error(error)
    if dry_run:  # the resolved config and its arithmetic
        print(_dry_run(cfg, dims))
    return 0


def _missing_data(cfg) -> list[str]:
    """One line per data file or tokenizer the config names that does not exist (none with mock data)."""
    missing = []
    if cfg.data.mock:
        return missing
    for index, entry in enumerate(cfg.data.blend):
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(entry.prefix + suffix):
                missing.append(
                    f"data.blend[{index}].prefix={entry.prefix!r}: {entry.prefix}{suffix} does not exist"
                )
                break
    if cfg.data.tokenizer_path and not os.path.exists(cfg.data.tokenizer_path):
        missing.append(f"data.tokenizer_path={cfg.data.tokenizer_path!r} does not exist")
    return missing


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
