"""One rank of a run's real layout, trained for a few steps on a fake GPU in this CPU process.

:func:`rehearse_rank` builds the rank exactly as the trainer does (``training/parts.py``: megatron's model from our
specs, layout-independent initialization, megatron DDP, Muon + AdamW, QK-clip and expert-load recorders) under the
fake process group at the config's world size and on a fake GPU (``fake_gpu.py``), then runs training steps through
``training/step.py: train_step`` and ``training/recorders.py`` (forward and backward through megatron's pipeline
schedule, DDP's gradient reduction, the one host read, the Muon and AdamW updates, QK-clip). It reports what a GPU
would have been asked to do wrongly: host syncs in a steady-state step (the second; the first also pays one-time
setup reads), collectives handed CPU tensors, device mismatches (raised by torch, reported as errors).

Where the rehearsal is narrower than a GPU run (each is listed in the report's ``narrowed``):

* ``model.transformer_impl: local`` and FP8 off: Transformer Engine cannot be imported on a CPU machine (the
  project's GPU image has no TE either, so the local spec is what runs there).
* MoE dispatch with megatron's drop-and-pad (``moe_expert_capacity_factor=1``, padded to capacity): dropless routing
  sizes its tensors by the routed token counts, values a fake tensor does not have. Megatron's dropless all-to-all
  dispatcher reads the split sizes on the host once per MoE layer by design (on a side stream); that read is
  megatron's and is not counted here.
* The backward runs through ``backward.py`` (a Python walk of the autograd graph): torch's C++ engine asks the CUDA
  driver about every CUDA gradient's device.
* ``torch.compile``'d megatron helpers run eagerly; the number of microbatches per step is ``microbatches`` (default
  the pipeline size, at least 2) instead of the config's global batch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["RankReport", "rehearse_rank"]

NARROWED = (
    "transformer_impl=local, fp8 off (no Transformer Engine on a CPU machine)",
    "MoE dispatch: megatron's drop-and-pad (capacity 1.0) instead of dropless routing (fake tensors have no token "
    "counts); megatron's dropless dispatcher reads split sizes on the host once per MoE layer by design",
    "backward walked in Python (megatron_muon/rehearsal/backward.py): torch's C++ engine queries the CUDA driver",
    "torch.compile'd megatron helpers run eagerly",
)


@dataclass(slots=True)
class RankReport:
    """What one rank did on the fake GPU (``--json`` writes one per rank)."""

    rank: int
    distributed_optimizer: bool
    ok: bool = False
    coordinates: dict[str, int] = field(default_factory=dict)
    syncs_per_step: int = -1
    """Device→host syncs in the last (steady-state) step, ours and megatron's."""
    sync_sites: dict[str, int] = field(default_factory=dict)
    """``owner: kind at path:line in function`` → count, in the last step."""
    first_step_sync_sites: dict[str, int] = field(default_factory=dict)
    """The same for the first step (one-time setup reads included)."""
    errors: list[str] = field(default_factory=list)
    microbatches: int = 0
    static_memory_gib: float = 0.0
    """Parameters, gradient buffers and optimizer state this rank holds on its GPU (activations not counted)."""
    seconds: float = 0.0
    narrowed: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return dataclasses.asdict(self)


def _static_bytes(parts: Any) -> int:
    """Bytes of distinct CUDA storages reachable from the model, its DDP buffers and the optimizer state."""
    from megatron_muon.optim.build import chain_members
    from megatron_muon.optim.layout import local_tensor

    tensors: list[torch.Tensor] = []
    for chunk in parts.model:
        # FSDP (parallel.fsdp): each rank's rows of the parameters and their gradients; megatron's DDP: its
        # parameter and gradient buffers (a list attribute, not nn.Module.buffers).
        tensors += [local_tensor(p) for p in chunk.parameters()]
        tensors += [local_tensor(p.grad) for p in chunk.parameters() if p.grad is not None]
        ddp_buffers = getattr(chunk, "buffers", [])
        ddp_buffers = [] if callable(ddp_buffers) else ddp_buffers
        for buffer in [*ddp_buffers, *getattr(chunk, "expert_parallel_buffers", [])]:
            tensors += [
                t
                for t in (getattr(buffer, "param_data", None), getattr(buffer, "grad_data", None))
                if t is not None
            ]
    for member in chain_members(parts.optimizer):
        inner = getattr(member, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            for value in state.values():
                values = value.values() if isinstance(value, dict) else [value]
                tensors += [local_tensor(v) for v in values if isinstance(v, torch.Tensor)]
        for group in getattr(member, "shard_fp32_from_float16_groups", []) or []:
            tensors += list(group)
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor.device.type != "cuda":
            continue
        storage = tensor.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def _fsdp_gradients_missing(model: list[Any]) -> list[str]:
    """An error for fully sharded parameters left without a gradient by the step's backward (FSDP2's
    reduce-scatter hooks not run); [] otherwise, and for megatron DDP chunks (their gradients are in buffers)."""
    from megatron_muon.optim.layout import fsdp_shard

    missing = [
        name
        for chunk in model
        for name, param in chunk.named_parameters()
        if param.requires_grad and fsdp_shard(param) is not None and param.grad is None
    ]
    if not missing:
        return []
    return [f"FSDP: {len(missing)} parameters got no gradient in the backward (first: {missing[0]})"]


def _rehearsal_config(cfg: Any, *, distributed_optimizer: bool, microbatches: int, dp: int) -> Any:
    """The config the rank is built from: the run's, with the narrowings of the module docstring."""
    model = dataclasses.replace(cfg.model, transformer_impl="local", fp8=None)
    optimizer = dataclasses.replace(cfg.optimizer, distributed_optimizer=distributed_optimizer)
    training = dataclasses.replace(
        cfg.training, global_batch_size=cfg.training.micro_batch_size * dp * microbatches
    )
    return dataclasses.replace(cfg, model=model, optimizer=optimizer, training=training)


def rehearse_rank(
    cfg: Any,
    dims: Any,
    rank: int,
    *,
    distributed_optimizer: bool,
    steps: int = 2,
    microbatches: int | None = None,
    max_syncs: int = 1,
) -> RankReport:
    """Build global ``rank`` of ``dims`` for ``cfg`` on a fake GPU and train ``steps`` steps (module docstring).

    ``ok`` is False on any error (device mismatch, unsupported op, ...), on a collective handed a CPU tensor, or
    on more than ``max_syncs`` host syncs in the last step."""
    from megatron_muon.planning.at_scale import rank_coordinates
    from megatron_muon.planning.meta_build import fake_world
    from megatron_muon.platform.device import Device, use_device
    from megatron_muon.rehearsal.backward import python_autograd
    from megatron_muon.rehearsal.fake_gpu import fake_cuda_device
    from megatron_muon.rehearsal.peers import peers_answer_object_gathers
    from megatron_muon.training.parts import build_training_parts
    from megatron_muon.training.recorders import StepRecorders
    from megatron_muon.training.step import synthetic_batches, train_step

    if not 0 <= rank < dims.world_size:
        raise ValueError(
            f"rank={rank} is outside the world of {dims.world_size} ranks (valid: 0..{dims.world_size - 1})"
        )
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    from megatron_muon.platform import cpu_stand_ins_active

    if cpu_stand_ins_active():
        raise RuntimeError(
            "the CPU stand-ins are installed in this process (megatron would allocate on the CPU): rehearse the GPU "
            "program in a fresh process"
        )
    microbatches = microbatches or max(2, dims.pp)
    report = RankReport(rank=rank, distributed_optimizer=distributed_optimizer, microbatches=microbatches)
    report.narrowed = list(NARROWED)
    cfg = _rehearsal_config(
        cfg, distributed_optimizer=distributed_optimizer, microbatches=microbatches, dp=dims.dp
    )
    coordinates = rank_coordinates(dims)
    report.coordinates = {k: v for k, v in coordinates[rank].items() if k != "grid"}
    experts_per_rank = cfg.model.num_moe_experts // dims.ep if cfg.model.num_moe_experts else 0
    # megatron warns on every RNG fork that the (fake) CUDA draws moved the CPU generator: they draw nothing.
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
    start = time.perf_counter()
    gpu = Device(type="cuda", index=0, backend="cpu:gloo,cuda:nccl")

    def drop_and_pad(config: Any) -> None:
        if config.num_moe_experts:
            config.moe_expert_capacity_factor = 1.0
            config.moe_pad_expert_input_to_capacity = True

    try:
        with (
            peers_answer_object_gathers(coordinates, experts_per_rank),
            fake_world(dims, rank) as pg_collection,
            fake_cuda_device(device_count=min(8, dims.world_size)) as mode,
        ):
            use_device(gpu)
            parts = build_training_parts(cfg, dims, pg_collection, gpu, transformer_config_hook=drop_and_pad)
            recorders = StepRecorders(parts.optimizer, parts.qk_clip, parts.expert_load)
            report.static_memory_gib = _static_bytes(parts) / 2**30
            train = cfg.training
            batches = synthetic_batches(
                vocab_size=cfg.model.vocab_size,
                seq_length=cfg.model.seq_length,
                micro_batch_size=train.micro_batch_size,
                num_microbatches=microbatches,
                data_parallel_rank=report.coordinates["dp"],
                data_parallel_size=dims.dp,
            )
            data: Any = [batches] * len(parts.model) if len(parts.model) > 1 else batches
            for step in range(steps):
                mode.reset_records()
                with python_autograd(parts.model):
                    result = train_step(
                        parts.model,
                        parts.optimizer,
                        data,
                        num_microbatches=microbatches,
                        seq_length=cfg.model.seq_length,
                        micro_batch_size=train.micro_batch_size,
                        pg_collection=pg_collection,
                        read_with_step=recorders.read_with_step,
                    )
                    recorders.after_step(result, step + 1)
                report.errors += _fsdp_gradients_missing(parts.model)
                if step == 0:
                    report.first_step_sync_sites = mode.sync_summary()
                report.errors += mode.collective_errors
            report.sync_sites = mode.sync_summary()
            report.syncs_per_step = len(mode.syncs)
    except Exception as error:  # the report says what broke, with where
        frames = [
            f for f in traceback.extract_tb(error.__traceback__) if "site-packages/torch" not in f.filename
        ]
        where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        report.errors.append(
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}{where}"
        )
    finally:
        from megatron_muon.platform import device as platform_device

        platform_device._chosen = None
    if report.syncs_per_step > max_syncs:
        report.errors.append(
            f"{report.syncs_per_step} host syncs in a steady-state step (allowed: {max_syncs}): "
            + "; ".join(f"{n}x {site}" for site, n in report.sync_sites.items())
        )
    report.ok = not report.errors
    report.seconds = time.perf_counter() - start
    return report
