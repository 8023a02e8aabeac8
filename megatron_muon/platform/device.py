"""Where this process computes: the one place that decides between a GPU and the CPU.

With CUDA, each rank takes the GPU of its ``LOCAL_RANK`` (set by torchrun, or by the launcher from SLURM), builds
its model there (``use_cpu_initialization=False``: megatron initializes on the GPU, drawing tensor-parallel
weights from its CUDA RNG tracker) and joins a ``cpu:gloo,cuda:nccl`` process group: NCCL carries every CUDA
tensor (gradients, activations, Muon's exchanges), gloo the few CPU scalars the loop agrees on (the exit flag,
expert-load counts). Without CUDA it is the CPU path: gloo, CPU initialization, and megatron-core's CUDA
assumptions replaced by the CPU stand-ins of :mod:`megatron_muon.platform.cpu`.

``MEGATRON_MUON_DEVICE`` overrides the choice: ``cpu`` takes the CPU path even where CUDA is available (the
multi-process test harness and the launcher tests set it, so their gloo CPU ranks run as designed on a GPU
machine), ``cuda`` insists on a GPU (a one-line error without one), ``auto`` or unset is the rule above.

The rest of the code asks this module (:func:`chosen_device`, :func:`max_memory_allocated_mib`,
:func:`peak_flops`) instead of looking at ``torch.cuda`` itself.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from megatron_muon.platform.cpu import apply_cpu_stand_ins
from megatron_muon.platform.gloo import share_one_gloo_device
from megatron_muon.platform.megatron_fixes import apply_megatron_fixes

if TYPE_CHECKING:
    from megatron_muon.config.schema import PretrainConfig

__all__ = [
    "DEVICE_ENV",
    "PEAK_BF16_FLOPS",
    "Device",
    "chosen_device",
    "choose_device",
    "max_memory_allocated_mib",
    "peak_flops",
    "require_device_for",
    "start_this_rank",
    "use_device",
]

DeviceType = Literal["cuda", "cpu"]

DEVICE_ENV = "MEGATRON_MUON_DEVICE"
"""Environment variable that overrides the device choice: ``auto`` (the default), ``cpu`` or ``cuda``."""
DEVICE_CHOICES = ("auto", "cpu", "cuda")

CUDA_BACKEND = "cpu:gloo,cuda:nccl"
"""NCCL for CUDA tensors, gloo for CPU tensors, in one process group (and in every group megatron derives)."""
CPU_BACKEND = "gloo"

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12}
"""Dense bf16 peak FLOP/s of the GPUs we know, for MFU (vendor datasheets, without sparsity), by name part."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Device:
    """This process's device and the process-group backend that goes with it."""

    type: DeviceType
    """cuda | cpu."""
    index: int | None = None
    """The GPU (this rank's ``LOCAL_RANK``); None on the CPU."""
    backend: str = CPU_BACKEND
    """``torch.distributed`` backend: ``cpu:gloo,cuda:nccl`` with CUDA, ``gloo`` without."""

    @property
    def torch_device(self) -> torch.device:
        """This device as a ``torch.device``: ``cuda:<index>`` or ``cpu``."""
        if self.type != "cuda":
            return torch.device("cpu")
        return torch.device("cuda") if self.index is None else torch.device("cuda", self.index)

    @property
    def use_cpu_initialization(self) -> bool:
        """Megatron's ``TransformerConfig.use_cpu_initialization``: on the CPU every rank draws full matrices and keeps
        its slice; on a GPU the model is built in place (no full CPU copy of a large model)."""
        return self.type == "cpu"

    def describe(self) -> str:
        """One line for logs and errors: ``GPU 0 (cpu:gloo,cuda:nccl)`` or ``CPU (gloo)``."""
        return f"GPU {self.index} ({self.backend})" if self.type == "cuda" else f"CPU ({self.backend})"


_chosen: Device | None = None


def choose_device(local_rank: int | None = None) -> Device:
    """The device this machine offers this rank: ``LOCAL_RANK``'s GPU when CUDA is available, else the CPU;
    ``MEGATRON_MUON_DEVICE=cpu`` takes the CPU, ``=cuda`` a GPU, whatever CUDA says.

    ``local_rank`` None reads ``LOCAL_RANK`` (default 0). A local rank without a GPU, ``MEGATRON_MUON_DEVICE=cuda``
    without CUDA, or a value of it other than auto/cpu/cuda is a one-line ``ValueError``."""
    wanted = os.environ.get(DEVICE_ENV, "").strip().lower() or "auto"
    if wanted not in DEVICE_CHOICES:
        raise ValueError(
            f"{DEVICE_ENV}={os.environ[DEVICE_ENV]!r} is not a device choice; valid: {', '.join(DEVICE_CHOICES)}"
        )
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return Device(type="cpu", backend=CPU_BACKEND)
    if not torch.cuda.is_available():
        raise ValueError(f"{DEVICE_ENV}=cuda but torch.cuda.is_available() is False on this machine")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if not 0 <= local_rank < count:
        raise ValueError(
            f"LOCAL_RANK={local_rank} has no GPU: this node has {count} (start at most {count} processes per node)"
        )
    return Device(type="cuda", index=local_rank, backend=CUDA_BACKEND)


def use_device(device: Device, *, num_threads: int | None = None) -> Device:
    """Make ``device`` this process's device (before any model or process group exists); returns it.

    Everywhere: megatron-core's logic workarounds (``megatron_fixes.py``) and one gloo device for all gloo groups
    (``gloo.py``). On a GPU: select it. On the CPU:
    ``num_threads`` torch threads (default ``OMP_NUM_THREADS``, else 1) and the CPU (hardware) stand-ins, forced
    even where CUDA is available (a CPU chosen by ``MEGATRON_MUON_DEVICE=cpu`` on a GPU machine computes on the CPU
    all the same). The point of choice for everything that trains or converts (the meta-device planner, which never
    trains, installs its own stand-ins).
    """
    global _chosen
    apply_megatron_fixes()  # megatron logic every device needs (platform/megatron_fixes.py)
    share_one_gloo_device()  # megatron's gloo groups (all of them on the CPU) on one gloo device (platform/gloo.py)
    if device.type == "cuda":
        torch.cuda.set_device(device.index)
    else:
        torch.set_num_threads(max(1, num_threads or int(os.environ.get("OMP_NUM_THREADS") or "1")))
        apply_cpu_stand_ins(force=True)
    _chosen = device
    return device


def start_this_rank(*, timeout: datetime.timedelta) -> Device:
    """Choose and use this rank's device, then join the default process group (``RANK`` / ``WORLD_SIZE`` /
    ``MASTER_ADDR`` / ``MASTER_PORT`` from the launcher) with the backend that goes with it."""
    import torch.distributed as dist

    device = use_device(choose_device())
    dist.init_process_group(device.backend, timeout=timeout)
    return device


def chosen_device() -> Device:
    """The device :func:`use_device` made current; before that (a test harness that set up its own world), the one
    :func:`choose_device` would choose."""
    return _chosen if _chosen is not None else choose_device()


def max_memory_allocated_mib() -> float | None:
    """Peak memory allocated by tensors on this rank's GPU since the start, in MiB; None on the CPU."""
    device = chosen_device()
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device.index) / 2**20


def peak_flops() -> float | None:
    """Dense bf16 peak FLOP/s of this rank's GPU (:data:`PEAK_BF16_FLOPS`); None on the CPU or an unknown GPU."""
    device = chosen_device()
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device.index)
    return next((flops for part, flops in PEAK_BF16_FLOPS.items() if part in name), None)


def require_device_for(cfg: PretrainConfig, device: Device) -> None:
    """Raise a one-line ``ConfigError`` if ``cfg`` (a ``PretrainConfig``) asks for something ``device`` cannot run:
    Transformer Engine or FP8 GEMMs without a GPU (or without Transformer Engine), FP8 Newton–Schulz where
    ``torch._scaled_mm`` has no e4m3 kernel. Called before any process group starts."""
    from megatron_muon.config import ConfigError

    model = cfg.model
    no_gpu = (  # the machine's reason first; the override where the machine has a GPU
        "torch.cuda.is_available() is False" if not torch.cuda.is_available() else f"{DEVICE_ENV}=cpu"
    )
    if model.transformer_impl == "transformer_engine":
        if device.type != "cuda":
            raise ConfigError(f"model.transformer_impl='transformer_engine' needs a CUDA GPU ({no_gpu})")
        try:
            import transformer_engine.pytorch  # noqa: F401
        except ImportError as error:
            raise ConfigError(
                f"model.transformer_impl='transformer_engine' needs Transformer Engine, not importable here ({error})"
            ) from None
    if model.fp8 is not None and device.type != "cuda":
        raise ConfigError(
            f"model.fp8={model.fp8!r} (FP8 GEMMs through Transformer Engine) needs a CUDA GPU ({no_gpu})"
        )
    steps = cfg.optimizer.muon.ns_fp8_steps
    if steps:
        from megatron_muon.ops.newton_schulz_fp8 import fp8_unavailable_reason

        reason = fp8_unavailable_reason(device.torch_device)
        if reason is not None:
            raise ConfigError(
                f"optimizer.muon.ns_fp8_steps={steps} cannot run on {device.describe()}: {reason}"
            )
