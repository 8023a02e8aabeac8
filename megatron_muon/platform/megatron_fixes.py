"""Workarounds for megatron-core 0.19.2 *logic* that every device needs, GPU and CPU alike.

These are not stand-ins for missing hardware: megatron itself refuses or mis-handles something our runs do, on any
machine. They are applied by ``platform.device.use_device`` on every device (and by the meta-device and fake-GPU
builds), never only where CUDA is missing. The hardware stand-ins, which only a machine without CUDA needs, are in
``platform/cpu.py``; ``tests/unit/test_platform_workarounds.py`` lists which applies where.

* ``# megatron-core 0.19.2: 3.`` ``transformer/torch_norm.py``: ``WrappedTorchNorm.__new__`` asserts
  ``not config.sequence_parallel``. The local layer spec (what runs without Transformer Engine, GPUs included) uses
  it for every norm, and sequence parallelism is required for MoE at TP > 1, so without this fix no local-spec
  MoE model at TP > 1 can be built on any device. Under sequence parallelism a norm sees a slice of the sequence and
  needs no communication in forward; its parameters are tagged ``sequence_parallel=True`` so that
  ``finalize_model_grads`` all-reduces their gradients over the tensor-parallel group (as the apex and TE norms do).

Megatron-core settings we change for the same reason (values, not patches) live where the config is built:
``training/megatron_configs.py`` (``batch_p2p_sync``) and ``training/parts.py`` (moving the built chunks to the GPU).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["LOGIC_FIXES", "SUPPORTED_MEGATRON_CORE_VERSION", "apply_megatron_fixes", "check_megatron_version"]

SUPPORTED_MEGATRON_CORE_VERSION = "0.19.2"

LOGIC_FIXES: dict[str, str] = {
    "megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__": "sequence-parallel torch norm (no. 3)",
}
"""Every patched megatron name, with what the patch is for (the tests check each is applied on every device)."""


def check_megatron_version() -> None:
    """RuntimeError naming the installed version unless it is the one these workarounds were written against."""
    import megatron.core

    version = getattr(megatron.core, "__version__", None)
    # megatron-core 0.19.2: megatron's package_info appends "+<git hash>" when its install directory lies inside a git
    # repository (a venv inside this project does), so compare the release part only.
    if version is None or version.split("+")[0] != SUPPORTED_MEGATRON_CORE_VERSION:
        raise RuntimeError(
            f"megatron.core.__version__={version!r}: the workarounds in megatron_muon.platform were written "
            f"against megatron-core {SUPPORTED_MEGATRON_CORE_VERSION}; re-check each patched place "
            "before changing SUPPORTED_MEGATRON_CORE_VERSION"
        )


def _mark(function: Callable[..., Any]) -> Callable[..., Any]:
    function.__megatron_muon_fix__ = True  # type: ignore[attr-defined]
    return function


def is_fixed(function: Any) -> bool:
    function = function.__func__ if isinstance(function, (staticmethod, classmethod)) else function
    return getattr(function, "__megatron_muon_fix__", False) is True


class _ConfigWithoutSequenceParallel:
    """A read-only view of a TransformerConfig with ``sequence_parallel=False``."""

    def __init__(self, config: Any) -> None:
        self._config = config

    sequence_parallel = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def _sequence_parallel_torch_norm_new(original_new: Callable[..., Any]) -> Callable[..., Any]:
    """``WrappedTorchNorm.__new__`` that allows sequence parallelism (module docstring)."""

    @functools.wraps(original_new)
    def new(cls: type, config: Any, hidden_size: int, *args: Any, **kwargs: Any) -> Any:
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        norm = original_new(cls, _ConfigWithoutSequenceParallel(config), hidden_size, *args, **kwargs)
        for parameter in norm.parameters():
            parameter.sequence_parallel = True
        return norm

    return _mark(new)


def apply_megatron_fixes() -> None:
    """Apply every logic workaround (idempotent), on any device. Raises RuntimeError naming the megatron version
    or the moved attribute, before patching anything, if megatron-core is not the version they were written for."""
    check_megatron_version()
    module = importlib.import_module("megatron.core.transformer.torch_norm")
    owner = getattr(module, "WrappedTorchNorm", None)
    if owner is None:
        raise RuntimeError(
            "megatron workaround target megatron.core.transformer.torch_norm.WrappedTorchNorm not found"
        )
    value = inspect.getattr_static(owner, "__new__")
    original = value.__func__ if isinstance(value, staticmethod) else value
    if not callable(original):
        raise RuntimeError("megatron workaround target WrappedTorchNorm.__new__ is not a function")
    if not is_fixed(original):
        owner.__new__ = staticmethod(_sequence_parallel_torch_norm_new(original))
