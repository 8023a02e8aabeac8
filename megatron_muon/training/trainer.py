"""The pretraining loop (torchtitan's small ``Trainer.train()`` shape): build, load, loop over ``train_step``,
evaluate, save. Everything heavy is megatron's: schedules, DDP, optimizer wrappers, LR scheduler, datasets,
dist_checkpointing.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_muon.config import PretrainConfig, to_yaml, validate_tokenizer
from megatron_muon.config.param_count import count_parameters
from megatron_muon.data import build_gpt_datasets, build_microbatch_iterator, load_tokenizer, null_tokenizer
from megatron_muon.optim.build import chain_members
from megatron_muon.platform import device as platform_device
from megatron_muon.training import checkpoint as ckpt
from megatron_muon.training.metrics import (
    MetricsWriter,
    is_logging_rank,
    memory_mib,
    model_flops_per_token,
)
from megatron_muon.training.parts import build_training_parts
from megatron_muon.training.recorders import StepRecorders
from megatron_muon.training.resume import choose_resume_source, resume_setting_changes
from megatron_muon.training.step import (
    LOAD_BALANCING_LOSS,
    evaluate,
    parameters_gathered,
    train_step,
)

logger = logging.getLogger(__name__)


class StopTraining(RuntimeError):
    """Training cannot go on (too many skipped iterations); the last good checkpoint is left as it is."""


class _ExitRequest:
    """SIGTERM / SIGUSR1 (SLURM's ``--signal=USR1@N``) ask for a checkpoint and a clean exit at the next
    iteration boundary; ranks agree on it with one all-reduce."""

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Trainer:
    def __init__(self, cfg: PretrainConfig, dims, pg_collection) -> None:
        self.cfg, self.dims, self.pg = cfg, dims, pg_collection
        train = cfg.training
        self.tokenizer = load_tokenizer(cfg.data.tokenizer_path) if cfg.data.tokenizer_path else None
        if self.tokenizer is not None:
            validate_tokenizer(cfg, self.tokenizer.vocab_size)

        # On the device platform.device chose for this rank (the GPU builds in place; the CPU draws on the CPU).
        parts = build_training_parts(cfg, dims, pg_collection, platform_device.chosen_device())
        self.model, self.optimizer = parts.model, parts.optimizer
        self.qk_clip, self.expert_load, self.scheduler = parts.qk_clip, parts.expert_load, parts.scheduler

        self.iteration, self.consumed_samples = 0, 0
        self.recorders = StepRecorders(self.optimizer, self.qk_clip, self.expert_load)
        self._load()
        self.num_microbatches = train.num_microbatches(dims.dp)
        self._build_data()
        self.metrics = MetricsWriter(cfg.logging.tensorboard_dir, is_logging_rank(pg_collection))
        self.is_first_rank = dist.get_rank() == 0
        _, active = count_parameters(cfg.model)
        self.flops_per_token = model_flops_per_token(
            num_layers=cfg.model.num_layers,
            hidden_size=cfg.model.hidden_size,
            seq_length=cfg.model.seq_length,
            active_matrix_params=active,
        )

    # ---------------------------------------------------------------------------------------------- setup
    def _load(self) -> None:
        """Start from the checkpoint ``training/resume.py`` chooses (the run's own first), after repairing what a
        crash during a save may have left in ``save_dir``."""
        c = self.cfg.checkpoint
        if c.save_dir:
            for action in ckpt.recover_checkpoint_root(c.save_dir):
                self._log(f"checkpoint recovery: {action}")
        source = choose_resume_source(
            save_dir=c.save_dir, load_dir=c.load_dir, resume=c.resume, finetune=c.finetune, warn=self._log
        )
        self._log(source.reason)
        if source.path is None:
            return
        directory = ckpt.resolve_checkpoint_dir(source.path)
        if not source.finetune:
            saved_config = directory / ckpt.CONFIG_FILENAME
            if saved_config.is_file():
                for change in resume_setting_changes(saved_config.read_text(), to_yaml(self.cfg)):
                    self._log(f"setting changed since the checkpoint, takes effect: {change}")
            else:
                self._log(f"WARNING: {saved_config} is missing: changed settings cannot be reported")
        loaded = ckpt.load_checkpoint(
            directory,
            self.model,
            None if source.finetune else self.optimizer,
            None if source.finetune else self.scheduler,
            finetune=source.finetune,
            manifest_required=source.manifest_required,
        )
        self.iteration, self.consumed_samples = loaded["iteration"], loaded["consumed_samples"]
        if source.own:
            self._saved_iteration = self.iteration  # that checkpoint is this state: no need to save it again
        self._log(f"loaded checkpoint {directory} at iteration {self.iteration}")

    def _build_data(self) -> None:
        cfg, train = self.cfg, self.cfg.training
        # Every evaluation reads the same first eval_iters global batches of the validation split.
        evals = train.eval_iters if train.eval_interval else 0
        splits = build_gpt_datasets(
            tokenizer=self.tokenizer or null_tokenizer(cfg.model.vocab_size),
            seq_length=cfg.model.seq_length,
            train_samples=train.train_iters * train.global_batch_size,
            valid_samples=evals * train.global_batch_size,
            test_samples=0,
            data_paths=[entry.prefix for entry in cfg.data.blend],
            data_weights=[entry.weight for entry in cfg.data.blend] if len(cfg.data.blend) > 1 else None,
            split=cfg.data.split,
            seed=train.seed,
            mock=cfg.data.mock,
            model_vocab_size=cfg.model.vocab_size,
        )
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), self.dims.dp
        make = lambda dataset, consumed: build_microbatch_iterator(  # noqa: E731
            dataset,
            micro_batch_size=train.micro_batch_size,
            consumed_samples=consumed,
            data_parallel_rank=dp_rank,
            data_parallel_size=dp_size,
            num_workers=0,
        )
        self.train_data = self._per_chunk(make(splits.train, self.consumed_samples))
        self.valid_dataset, self._make_iterator = splits.valid, make

    def _per_chunk(self, iterator):
        """Interleaved pipelining wants one iterator per model chunk; they see the same microbatches."""
        if len(self.model) == 1:
            return iterator
        import itertools

        return list(itertools.tee(iterator, len(self.model)))

    # ----------------------------------------------------------------------------------------------- loop
    def train(self) -> int:
        cfg, train = self.cfg, self.cfg.training
        exit_request = _ExitRequest(train.exit_signal_handler)
        consecutive_skips, total_skips = 0, 0
        tokens_per_step = train.global_batch_size * cfg.model.seq_length
        self._log(f"training from iteration {self.iteration} to {train.train_iters}")
        while self.iteration < train.train_iters:
            start = time.perf_counter()
            result = train_step(
                self.model,
                self.optimizer,
                self.train_data,
                num_microbatches=self.num_microbatches,
                seq_length=cfg.model.seq_length,
                micro_batch_size=train.micro_batch_size,
                pg_collection=self.pg,
                read_with_step=self.recorders.read_with_step,
            )
            elapsed = time.perf_counter() - start
            ckpt.fault_point_on_one_rank("step", self.iteration + 1)  # tests: a crash inside this iteration
            self.iteration += 1
            self.consumed_samples += train.global_batch_size
            step_metrics = self._after_step(result)
            if result["skipped"]:
                consecutive_skips, total_skips = consecutive_skips + 1, total_skips + 1
                self._log(
                    f"iteration {self.iteration}: NaN/Inf loss or gradient (grad norm {result['grad_norm']}); "
                    f"update skipped ({consecutive_skips} in a row)"
                )
                if consecutive_skips >= train.max_consecutive_skips:
                    raise StopTraining(
                        f"{consecutive_skips} consecutive iterations had NaN/Inf gradients (limit "
                        f"training.max_consecutive_skips={train.max_consecutive_skips}); stopping without saving"
                    )
            else:
                consecutive_skips = 0
                self.scheduler.step(increment=1)  # the scheduler counts iterations here
            self._report(result, elapsed, tokens_per_step, total_skips, step_metrics)
            if train.eval_interval and self.iteration % train.eval_interval == 0:
                self._evaluate()
            save_now = cfg.checkpoint.save_interval and self.iteration % cfg.checkpoint.save_interval == 0
            if exit_request.agreed():
                self._save()
                self._log(f"exit requested by a signal: checkpoint saved at iteration {self.iteration}")
                return 0
            if save_now:
                self._save()
        if train.eval_interval and self.iteration % train.eval_interval != 0:
            self._evaluate()
        self._save()
        iteration, deferred = (
            self.recorders.flush()
        )  # the last step's deferred metrics (one read after the loop)
        if iteration is not None:
            self.metrics.scalars(iteration, deferred)
        self.metrics.close()
        return 0

    def _evaluate(self) -> None:
        train = self.cfg.training
        if self.valid_dataset is None:
            return
        # The same validation samples every time: a fresh iterator from the start of the split.
        iterator = self._per_chunk(self._make_iterator(self.valid_dataset, 0))
        loss = evaluate(
            self.model,
            iterator,
            num_microbatches=self.num_microbatches * train.eval_iters,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=train.micro_batch_size,
            pg_collection=self.pg,
        )
        perplexity = math.exp(min(loss, 50.0))
        self._log(
            f" validation at iteration {self.iteration} | lm loss {loss:.4f} | perplexity {perplexity:.2f}"
        )
        self.metrics.scalars(
            self.iteration, {"loss/validation": loss, "loss/validation_perplexity": perplexity}
        )

    def _save(self) -> None:
        c = self.cfg.checkpoint
        if not c.save_dir or getattr(self, "_saved_iteration", None) == self.iteration:
            return
        self._saved_iteration = self.iteration
        with parameters_gathered(self.model):  # overlap_param_gather: the last step's all-gather is still due
            path = ckpt.save_checkpoint(
                c.save_dir,
                self.iteration,
                self.model,
                self.optimizer,
                self.scheduler,
                consumed_samples=self.consumed_samples,
                config_yaml=to_yaml(self.cfg),
                keep_last=c.keep_last or 0,
            )
        self._log(f"saved checkpoint {path}")

    # ------------------------------------------------------------------------------------------- logging
    def _after_step(self, result: dict[str, Any]) -> dict[str, float]:
        """QK-clip and expert loads of this step (``recorders.py``); the previous step's deferred metrics written
        under that step's iteration."""
        metrics, (iteration, deferred) = self.recorders.after_step(result, self.iteration)
        if iteration is not None:
            self.metrics.scalars(iteration, deferred)  # muon/... and, on a GPU, time/optimizer_step_ms
        return metrics

    def _report(self, result, elapsed, tokens_per_step, total_skips, step_metrics) -> None:
        train = self.cfg.training
        tokens_per_s = tokens_per_step / elapsed
        peak = platform_device.peak_flops()  # None on the CPU
        mfu = None if peak is None else self.flops_per_token * tokens_per_s / (peak * dist.get_world_size())
        lrs = {}
        for member in chain_members(self.optimizer):
            kind = "muon" if hasattr(member.optimizer, "placement") else "adamw"
            for group in member.param_groups:
                if group["params"]:
                    lrs[kind] = group["lr"]
        values = {
            "loss/train": result["loss"],
            "loss/load_balancing": result[LOAD_BALANCING_LOSS],
            "optimizer/grad_norm": result["grad_norm"],
            "optimizer/skipped_iterations": total_skips,
            "throughput/tokens_per_s": tokens_per_s,
            "throughput/mfu": mfu,
            "time/iteration_ms": elapsed * 1e3,
            # On a GPU the optimizer time is read with the next step (deferred); on the CPU it is known now.
            "time/optimizer_step_ms": (
                None if result["optimizer_seconds"] is None else result["optimizer_seconds"] * 1e3
            ),
            "memory/rss_mib": memory_mib(),
            "memory/max_allocated_mib": platform_device.max_memory_allocated_mib(),  # None on the CPU
            **{f"optimizer/lr_{k}": v for k, v in lrs.items()},
            **step_metrics,
        }
        self.metrics.scalars(self.iteration, values)
        if self.iteration % self.cfg.logging.log_interval == 0 or self.iteration == 1:
            grad_norm = "nan" if result["grad_norm"] is None else f"{result['grad_norm']:.3f}"
            self._log(
                f" iteration {self.iteration:>6}/{train.train_iters} | consumed samples {self.consumed_samples:>9} | "
                f"consumed tokens {self.consumed_samples * self.cfg.model.seq_length:>11,} | "
                f"ms/iter {elapsed * 1e3:8.1f} | tokens/s {tokens_per_s:9.0f} | "
                f"lr muon {lrs.get('muon', 0.0):.3e} adamw {lrs.get('adamw', 0.0):.3e} | lm loss {result['loss']:.4f} | "
                f"grad norm {grad_norm} | MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                f"skipped {total_skips}"
            )
            self.metrics.flush()

    def _log(self, message: str) -> None:
        if dist.get_rank() == 0:
            print(message, flush=True)
