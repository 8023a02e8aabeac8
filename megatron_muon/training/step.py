"""One training step through megatron-core's own parts: DDP, the pipeline schedule, finalize_model_grads
and a megatron optimizer (anything with the ``MegatronOptimizer`` interface: ``zero_grad``, ``step``,
``scale_loss``).

Process groups come in as a ``ProcessGroupCollection`` (e.g.
``ProcessGroupCollection.use_mpu_process_groups()`` once megatron's parallel state is initialized).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.pipeline_parallel.utils import get_pp_last_rank, is_pp_last_stage
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_model_config

from megatron_muon.models.gpt_moe import causal_attention_mask
from megatron_muon.optim.layer_wise import shard_aligned_layout
from megatron_muon.training.grad_norm import grad_norm_squared
from megatron_muon.training.host_values import read_on_host

__all__ = [
    "LOAD_BALANCING_LOSS",
    "OptimizerTimer",
    "evaluate",
    "parameters_gathered",
    "synthetic_batches",
    "train_step",
    "wrap_in_ddp",
]

# Key of the load-balancing loss in train_step's result (whichever kind the router computes).
LOAD_BALANCING_LOSS = "load_balancing_loss"

# Names under which megatron's router records each kind of load-balancing loss (divided by its coefficient).
_TRACKED_LOAD_BALANCING_LOSS = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}


def wrap_in_ddp(
    model_chunks: list[torch.nn.Module],
    config: TransformerConfig,
    *,
    pg_collection: ProcessGroupCollection,
    ddp_config: DistributedDataParallelConfig | None = None,
) -> list[DistributedDataParallel]:
    """Wrap each model chunk in megatron's ``DistributedDataParallel`` and hook it into ``config``.

    Default ``ddp_config``: plain all-reduce of fp32 grads (``use_distributed_optimizer=False``), no
    overlap. With ``use_distributed_optimizer=True`` the buffers get megatron's shard-aligned layout for the
    parameters tagged by ``optim.layer_wise.tag_muon_params`` (call it first) and the byte-level one for the rest. Sets ``config.no_sync_func`` (one per chunk under interleaving) and
    ``config.finalize_model_grads_func``, which the schedule calls after the last backward.

    ``config.calculate_per_token_loss`` must already hold its final value: DDP reads it here to decide
    whether to pre-divide gradients by the data-parallel size.
    """
    if not model_chunks:
        raise ValueError("model_chunks is empty")
    if ddp_config is None:
        ddp_config = DistributedDataParallelConfig(
            use_distributed_optimizer=False,
            overlap_grad_reduce=False,
            grad_reduce_in_fp32=True,
        )
    later_stage = pg_collection.pp.rank() > 0
    wrapped = [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_config,
            module=chunk,
            # As megatron's training loop: only the first chunk's grads are bucketed.
            disable_bucketing=index > 0,
            pg_collection=pg_collection,
            # Distributed optimizer: megatron's layer-wise layout (whole Muon params per DP shard).
            full_param_layout=(
                shard_aligned_layout(chunk, ddp_config, pg_collection, unbucketed=index > 0 or later_stage)
                if ddp_config.use_distributed_optimizer
                else None
            ),
        )
        for index, chunk in enumerate(model_chunks)
    ]
    no_sync = [chunk.no_sync for chunk in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


@contextlib.contextmanager
def parameters_gathered(model_chunks: list[DistributedDataParallel]) -> Iterator[None]:
    """Every rank's parameters up to date inside the block (a checkpoint save): with ``overlap_param_gather``
    the all-gather of the last step's updates waits for the next forward; as megatron's training loop does
    around checkpoints, the forward pre-hooks are removed with a synchronous all-gather and put back after."""
    # FSDP chunks (no ddp_config) gather parameters per layer themselves and are never behind.
    overlapped = [
        c for c in model_chunks if getattr(c, "ddp_config", None) and c.ddp_config.overlap_param_gather
    ]
    for chunk in overlapped:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in overlapped:
            chunk.enable_forward_pre_hook()


def _arithmetic_sequences(
    generator: torch.Generator, count: int, length: int, vocab_size: int
) -> torch.Tensor:
    """``count`` sequences ``(start + stride * t) % vocab_size`` with random start and stride: a pattern a
    model can learn from two previous tokens, so the loss of a working trainer falls quickly."""
    start = torch.randint(0, vocab_size, (count, 1), generator=generator)
    stride = torch.randint(1, 8, (count, 1), generator=generator)
    positions = torch.arange(length).unsqueeze(0)
    return (start + stride * positions) % vocab_size


def synthetic_batches(
    *,
    vocab_size: int,
    seq_length: int,
    micro_batch_size: int,
    num_microbatches: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless deterministic microbatches for this data-parallel rank.

    Step ``k`` draws one *global* batch of ``micro_batch_size * num_microbatches * data_parallel_size``
    sequences from a generator seeded with ``(seed, k)``; this rank gets its contiguous slice, split into
    ``num_microbatches`` microbatches. The global batch therefore does not depend on how the ranks are
    laid out, so runs at different TP/PP/DP sizes see the same data. Every rank of a tensor- or
    pipeline-parallel group gets identical microbatches.

    Each microbatch: ``tokens``, ``labels`` (tokens shifted by one), ``position_ids`` (int64) and
    ``loss_mask`` (float32), all ``[micro_batch_size, seq_length]``.

    With interleaved pipelining pass one such iterator per model chunk.
    """
    for name, value in (
        ("vocab_size", vocab_size),
        ("seq_length", seq_length),
        ("micro_batch_size", micro_batch_size),
        ("num_microbatches", num_microbatches),
        ("data_parallel_size", data_parallel_size),
    ):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"data_parallel_rank={data_parallel_rank} is outside [0, {data_parallel_size})")

    local_batch = micro_batch_size * num_microbatches
    position_ids = torch.arange(seq_length).unsqueeze(0).expand(micro_batch_size, seq_length)
    step = 0
    while True:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        sequences = _arithmetic_sequences(
            generator, local_batch * data_parallel_size, seq_length + 1, vocab_size
        )
        local = sequences[data_parallel_rank * local_batch : (data_parallel_rank + 1) * local_batch]
        for microbatch in local.split(micro_batch_size):
            yield {
                "tokens": microbatch[:, :-1].contiguous(),
                "labels": microbatch[:, 1:].contiguous(),
                "position_ids": position_ids.clone(),
                "loss_mask": torch.ones(micro_batch_size, seq_length, dtype=torch.float32),
            }
        step += 1


def _summed_token_loss(
    loss_mask: torch.Tensor, per_token_loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron's per-token-loss convention: (loss summed over tokens, token count, reporting values).
    The schedule adds up the token counts and ``finalize_model_grads`` divides the gradients by the
    global total."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (per_token_loss.reshape(-1).float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def _device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters live (``megatron_muon.platform.device`` chose it when the model was built)."""
    return next(model.parameters()).device


def _forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: GPTModel):
    device = _device_of(model)
    batch = {name: tensor.to(device, non_blocking=True) for name, tensor in next(data_iterator).items()}
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=causal_attention_mask(batch["tokens"].shape[1], device=batch["tokens"].device),
        labels=batch["labels"],
    )
    return output, partial(_summed_token_loss, batch["loss_mask"])


def _load_balancing_loss(
    config: TransformerConfig, num_microbatches: int, pg_collection: ProcessGroupCollection
) -> torch.Tensor | None:
    """Mean over MoE layers and microbatches of the load-balancing loss the router computes (switch
    ``aux_loss`` or per-sequence ``seq_aux_loss``, before its coefficient), as megatron's tracker reduces it:
    summed over pipeline stages, averaged over data parallel. None when there is none (``none``, a zero
    coefficient, or no MoE layer); every rank agrees, as they share the config."""
    name = _TRACKED_LOAD_BALANCING_LOSS.get(config.moe_router_load_balancing_type)
    if name is None or not config.num_moe_experts or not config.moe_aux_loss_coeff:
        return None
    totals: dict[str, torch.Tensor] = {}
    get_moe_metrics_tracker().report(
        loss_scale=1.0 / num_microbatches,
        iteration=0,
        force_initialize=True,  # stages without MoE layers still join the pipeline all-reduce
        track_names=[name],
        num_layers=config.num_layers,
        moe_layer_freq=config.moe_layer_freq,
        total_loss_dict=totals,
        pg_collection=pg_collection,
    )
    return totals[name].detach()  # read on the host with the step's other values


def _forward_backward(
    model_chunks,
    data_iterator,
    *,
    num_microbatches,
    seq_length,
    micro_batch_size,
    pg_collection,
    forward_only: bool,
) -> torch.Tensor:
    """megatron's schedule over ``num_microbatches``; returns ``[loss summed over tokens, token count]`` of the
    global batch (float64, on the model's device, not read on the host), identical on every rank."""
    config = get_model_config(model_chunks[0])
    forward_backward = get_forward_backward_func(
        pp_size=pg_collection.pp.size(), vp_size=config.virtual_pipeline_model_parallel_size
    )
    reported = forward_backward(
        forward_step_func=_forward_step,
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        p2p_communicator=P2PCommunicator(pp_group=pg_collection.pp, config=config),
        pg_collection=pg_collection,
    )
    # [summed loss, token count]: nonzero only on the last pipeline stage, which holds the losses.
    # On the model's device: NCCL reduces CUDA tensors only.
    loss_and_tokens = torch.zeros(2, dtype=torch.float64, device=_device_of(model_chunks[0]))
    if is_pp_last_stage(pg_collection.pp):
        for microbatch in reported:
            loss_and_tokens += microbatch["lm loss"].to(loss_and_tokens.device, torch.float64)
        torch.distributed.all_reduce(loss_and_tokens, group=pg_collection.dp_cp)
    torch.distributed.broadcast(
        loss_and_tokens, src=get_pp_last_rank(pg_collection.pp), group=pg_collection.pp
    )
    return loss_and_tokens


def _mean_loss(loss_sum: float, tokens: float) -> float:
    if tokens <= 0:
        raise RuntimeError(f"the global batch held {tokens} loss tokens; loss_mask masks every token")
    return loss_sum / tokens


class OptimizerTimer:
    """Wall time of the optimizer step without a host sync of its own: on a GPU two CUDA events around it, read
    (:meth:`seconds`) only after a later sync point, when the end event has completed; on the CPU the host
    clock (CPU work is in order)."""

    def __init__(self, device: torch.device) -> None:
        self._events = None
        if device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._start, self._stop = time.perf_counter(), None

    def stop(self) -> None:
        if self._events is not None:
            self._events[1].record()
        self._stop = time.perf_counter()

    @property
    def on_host(self) -> bool:
        """True when :meth:`seconds` needs no device (the CPU)."""
        return self._events is None

    def seconds(self) -> float:
        if self._stop is None:
            raise RuntimeError("OptimizerTimer.seconds() before stop()")
        if self._events is not None:
            return self._events[0].elapsed_time(self._events[1]) / 1e3
        return self._stop - self._start


@contextlib.contextmanager
def _grads_prepared(optimizer: MegatronOptimizer, grad_norm: float) -> Iterator[None]:
    """Inside, ``optimizer.prepare_grads()`` does nothing (the step already prepared the gradients) and
    ``optimizer.get_grad_norm()`` returns ``grad_norm``.

    # megatron-core 0.19.2: ``ChainedOptimizer.step`` (and a lone ``MixedPrecisionOptimizer.step``) prepares the
    # gradients again (the main-grad copy, and fp16's loss scaler unscaling and updating a second time) and computes
    # the norm itself for clipping (a second norm pass and all-reduce, and a host read); the step already did both,
    # the norm read with the loss in its one transfer. The step only reaches here when no inf/nan was found.
    """
    optimizer.prepare_grads = lambda: False  # type: ignore[method-assign]
    optimizer.get_grad_norm = lambda: grad_norm  # type: ignore[method-assign]
    try:
        yield
    finally:
        del optimizer.prepare_grads
        del optimizer.get_grad_norm


def train_step(
    model_chunks: list[DistributedDataParallel],
    optimizer: MegatronOptimizer,
    data_iterator: Iterator[dict[str, torch.Tensor]] | list[Iterator[dict[str, torch.Tensor]]],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    pg_collection: ProcessGroupCollection,
    read_with_step: Callable[[], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Forward/backward over ``num_microbatches`` with megatron's schedule, then the optimizer step (skipped
    when the gradient norm is NaN/Inf), with **one** device→host read: the loss, the token count, the load-balancing
    loss, the gradient norm and whatever ``read_with_step()`` returns (called after the backward, before the
    update: device tensors of the trainer's recorders, and the previous step's deferred metrics) travel in one
    transfer (``training/host_values.py``).

    ``model_chunks`` are the DDP-wrapped chunks from :func:`wrap_in_ddp`; ``data_iterator`` yields
    :func:`synthetic_batches`-style dicts (a list of iterators, one per chunk, under interleaving).

    Returns, identical on every rank (but the optimizer time, which is this rank's own):
        loss: mean cross-entropy per token over the global batch (nats), from the last pipeline stage.
        load_balancing_loss: megatron's load-balancing loss of the configured kind (aux_loss or
            seq_aux_loss, without its coefficient), mean over MoE layers and microbatches; None when the
            router computes none. Its gradient (times the coefficient) is already in the step.
        grad_norm: global gradient norm (megatron's, computed once and used for clipping).
        skipped: True if the update was skipped (NaN/Inf gradients).
        optimizer_seconds: wall time of this rank's optimizer step on the CPU; None on a GPU, where
            ``optimizer_timer`` holds CUDA events to read after the next sync point.
        optimizer_timer: the :class:`OptimizerTimer`.
        read: ``read_with_step()``'s values, read on the host.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches} must be >= 1")
    config = get_model_config(model_chunks[0])
    if not config.calculate_per_token_loss:
        raise ValueError("train_step reports per-token losses and needs config.calculate_per_token_loss=True")
    # As megatron's training loop: the schedule scales the loss, and the MoE aux-loss gradient, by this.
    config.grad_scale_func = optimizer.scale_loss
    device = _device_of(model_chunks[0])

    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss_and_tokens = _forward_backward(
        model_chunks,
        data_iterator,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        pg_collection=pg_collection,
        forward_only=False,
    )
    # The recorders' device values (collectives of their own) before the optimizer's timer starts.
    extra = dict(read_with_step()) if read_with_step is not None else {}
    timer = OptimizerTimer(device)
    found_inf = optimizer.prepare_grads()  # a host bool; only fp16's loss scaler reads the device for it
    own = {
        "loss_and_tokens": loss_and_tokens,
        "grad_norm_squared": grad_norm_squared(optimizer, device),
        LOAD_BALANCING_LOSS: _load_balancing_loss(config, num_microbatches, pg_collection),
    }
    clash = sorted(set(own) & set(extra))
    if clash:
        raise ValueError(f"read_with_step() returned the step's own names {clash}")
    host = read_on_host({**own, **extra})  # the step's one device->host transfer
    loss_sum, tokens = host["loss_and_tokens"]
    grad_norm = math.sqrt(host["grad_norm_squared"]) if math.isfinite(host["grad_norm_squared"]) else math.nan
    if found_inf or not math.isfinite(grad_norm):
        optimizer.zero_grad()
        update_successful = False
    else:
        with _grads_prepared(optimizer, grad_norm):
            update_successful, _, _num_zeros = optimizer.step()
    timer.stop()
    return {
        "loss": _mean_loss(loss_sum, tokens),
        LOAD_BALANCING_LOSS: host[LOAD_BALANCING_LOSS],
        "grad_norm": grad_norm,
        "skipped": not update_successful,
        "optimizer_seconds": timer.seconds() if timer.on_host else None,
        "optimizer_timer": timer,
        "read": {name: host[name] for name in extra},
    }


@torch.no_grad()
def evaluate(
    model_chunks,
    data_iterator,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    pg_collection,
) -> float:
    """Mean cross-entropy per token (nats) over ``num_microbatches`` microbatches per data-parallel rank,
    forward only; identical on every rank."""
    for chunk in model_chunks:
        chunk.eval()
    try:
        loss_and_tokens = _forward_backward(
            model_chunks,
            data_iterator,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            pg_collection=pg_collection,
            forward_only=True,
        )
    finally:
        for chunk in model_chunks:
            chunk.train()
        get_moe_metrics_tracker().clear()  # the forward recorded aux losses that belong to no training step
    loss_sum, tokens = loss_and_tokens.tolist()
    return _mean_loss(loss_sum, tokens)
