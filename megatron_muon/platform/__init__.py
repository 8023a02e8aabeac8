"""Where this process computes (``device.py``: a GPU per rank with NCCL, or the CPU with gloo), megatron-core's logic
workarounds every device needs (``megatron_fixes.py``) and the CPU/gloo stand-ins for its CUDA hardware assumptions
(``cpu.py``, installed by ``device.use_device`` on CPU machines only)."""

from megatron_muon.platform.cpu import (
    apply_cpu_stand_ins,
    cpu_stand_ins_active,
    cpu_tensors_pose_as_cuda,
)
from megatron_muon.platform.device import (
    Device,
    choose_device,
    chosen_device,
    max_memory_allocated_mib,
    peak_flops,
    require_device_for,
    start_this_rank,
    use_device,
)
from megatron_muon.platform.megatron_fixes import SUPPORTED_MEGATRON_CORE_VERSION, apply_megatron_fixes

__all__ = [
    "SUPPORTED_MEGATRON_CORE_VERSION",
    "Device",
    "apply_cpu_stand_ins",
    "apply_megatron_fixes",
    "chosen_device",
    "choose_device",
    "cpu_stand_ins_active",
    "cpu_tensors_pose_as_cuda",
    "max_memory_allocated_mib",
    "peak_flops",
    "require_device_for",
    "start_this_rank",
    "use_device",
]
