"""CPU/gloo stand-ins for megatron-core's CUDA assumptions (no-ops on CUDA machines)."""

from megatron_muon.platform.cpu import (
    SUPPORTED_MEGATRON_CORE_VERSION,
    apply_cpu_stand_ins,
    cpu_stand_ins_active,
    cpu_tensors_pose_as_cuda,
)

__all__ = [
    "SUPPORTED_MEGATRON_CORE_VERSION",
    "apply_cpu_stand_ins",
    "cpu_stand_ins_active",
    "cpu_tensors_pose_as_cuda",
]
