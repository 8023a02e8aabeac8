"""Training runs inside this process, one after another, on a world of one gloo process: what the muP tools
(``tools/coord_check.py``, ``tools/mup_sweep.py``) run their trials with.

A trial is a :class:`~megatron_muon.config.PretrainConfig` trained by our
:class:`~megatron_muon.training.trainer.Trainer`; its result is read back from the TensorBoard scalars the
trainer writes (``loss/train``, ``loss/validation``), so nothing here depends on log-line formats. Megatron's
parallel state is initialized once (TP = PP = EP = 1) and shared by the trials; each trial builds its own model,
optimizer and data.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_muon.config import PretrainConfig, load_config
from megatron_muon.config.param_count import count_parameters

__all__ = [
    "TrialResult",
    "run_trial",
    "single_process_world",
    "trial_config",
    "trial_flops",
    "width_overrides",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def single_process_world(num_threads: int | None = None) -> Iterator[object]:
    """A one-process world with megatron's parallel state (all sizes 1) on the device ``platform.device`` chooses
    (GPU 0 with NCCL, or the CPU with gloo); yields its ``ProcessGroupCollection``. ``num_threads``: torch threads
    on the CPU (default ``OMP_NUM_THREADS`` or 1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_muon.platform.device import choose_device, use_device

    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process")
    port = _free_port()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    device = use_device(choose_device(local_rank=0), num_threads=num_threads)
    dist.init_process_group(
        device.backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(hours=1),
    )
    parallel_state.initialize_model_parallel()
    try:
        yield ProcessGroupCollection.use_mpu_process_groups()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def width_overrides(cfg: PretrainConfig, hidden_size: int) -> list[str]:
    """Dotted overrides that widen (or narrow) ``cfg``'s model to ``hidden_size``: every hidden dim keeps its ratio to
    d_model (muP's assumption, ``mup.scaled_width_dims``); heads and query groups stay, so the head dim scales."""
    from megatron_muon.mup import scaled_width_dims

    model = cfg.model
    dims = scaled_width_dims(
        reference_hidden_size=model.hidden_size,
        hidden_size=hidden_size,
        dims={
            "ffn_hidden_size": model.ffn_hidden_size,
            "moe_ffn_hidden_size": model.moe_ffn_hidden_size,
            "moe_shared_expert_intermediate_size": model.moe_shared_expert_intermediate_size,
        },
    )
    return [f"model.hidden_size={hidden_size}"] + [f"model.{name}={value}" for name, value in dims.items()]


@dataclass(frozen=True, slots=True)
class TrialResult:
    """What one training run ended with."""

    train_loss: float
    """Training loss of the last step (nats per token); NaN if it diverged."""
    validation_loss: float
    """Validation loss after the last step (nats per token); inf if the run diverged or stopped."""
    status: str
    """ok | diverged (NaN/Inf loss or a stop for too many skipped steps)."""
    seconds: float
    """Wall time of the trial, building included."""


def trial_flops(cfg: PretrainConfig) -> float:
    """Training FLOPs of ``cfg``'s run (6 · active matrix parameters + attention, per token; ``metrics.py``)."""
    from megatron_muon.training.metrics import model_flops_per_token

    _, active = count_parameters(cfg.model)
    tokens = cfg.training.train_iters * cfg.training.global_batch_size * cfg.model.seq_length
    per_token = model_flops_per_token(
        num_layers=cfg.model.num_layers,
        hidden_size=cfg.model.hidden_size,
        seq_length=cfg.model.seq_length,
        active_matrix_params=active,
    )
    return per_token * tokens


def _last_scalar(event_dir: Path, tag: str) -> float | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    if tag not in accumulator.Tags().get("scalars", []):
        return None
    events = accumulator.Scalars(tag)
    return events[-1].value if events else None


def trial_config(config_path: str | Path, overrides: Sequence[str], tensorboard_dir: Path) -> PretrainConfig:
    """``config_path`` + ``overrides``, set up for an in-process trial: one process, no checkpoints, no signal
    handler (a killed sweep must not record a half-trained trial as finished), TensorBoard into
    ``tensorboard_dir``, one validation at the end."""
    cfg = load_config(
        config_path,
        [
            *overrides,
            "parallel.world_size=1",
            "parallel.tp=1",
            "parallel.pp=1",
            "parallel.ep=1",
            "parallel.etp=1",
            "parallel.vpp=null",
            "checkpoint.save_dir=null",
            "checkpoint.load_dir=null",
            "checkpoint.resume=none",
            "training.exit_signal_handler=false",
            f"logging.tensorboard_dir={tensorboard_dir}",
        ],
    )
    cfg.training.eval_interval = cfg.training.train_iters
    cfg.training.eval_iters = max(1, cfg.training.eval_iters)
    return cfg


def run_trial(cfg: PretrainConfig, pg_collection) -> TrialResult:
    """Train ``cfg`` (made by :func:`trial_config`) with our ``Trainer`` in this process; read back its losses."""
    import time

    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from megatron_muon.config import validate
    from megatron_muon.training.trainer import StopTraining, Trainer

    dims = validate(cfg, world_size=1)
    start = time.perf_counter()
    event_dir = Path(cfg.logging.tensorboard_dir)
    status = "ok"
    try:
        Trainer(cfg, dims, pg_collection).train()
    except StopTraining:
        status = "diverged"
    finally:
        get_moe_metrics_tracker().clear()  # the tracker is global; a stopped trial must not leak into the next
    seconds = time.perf_counter() - start
    train_loss = _last_scalar(event_dir, "loss/train")
    validation_loss = _last_scalar(event_dir, "loss/validation") if status == "ok" else None
    if validation_loss is None or not math.isfinite(validation_loss):
        status, validation_loss = "diverged", math.inf
    return TrialResult(
        train_loss=math.nan if train_loss is None else train_loss,
        validation_loss=validation_loss,
        status=status,
        seconds=seconds,
    )
