"""CPU/gloo stand-ins for the places where megatron-core 0.19.2 assumes CUDA hardware.

Megatron-core runs on CPU with gloo except for a handful of CUDA assumptions (numbered in
docs/architecture.md; each patch below is tagged ``# megatron-core 0.19.2:``). These are *hardware* stand-ins:
a GPU machine needs none of them. :func:`apply_cpu_stand_ins` patches exactly those places (nothing of them when
CUDA is available, unless forced) and always applies the *logic* workarounds that every device needs
(``platform/megatron_fixes.py``: the sequence-parallel torch norm, no. 3).

How narrow each patch is:

* Most assumptions are calls such as ``torch.cuda.current_device()``, ``torch.cuda.Stream()`` or
  ``torch.zeros(..., device="cuda")`` made *inside* a megatron module. For those we replace the
  module's own ``torch`` global with :data:`TORCH_WITH_CPU_AS_CUDA`, a view of torch in which
  ``torch.cuda`` means "the CPU" (allocation device, no-op streams/events, a CPU generator for the
  CUDA RNG) and the tensor factories read ``device="cuda"`` as the CPU. Only the listed megatron
  modules see it; torch itself, user code and every other library keep the real ``torch.cuda``.
* A few assumptions are method calls on tensors (``param.type() == "torch.cuda.FloatTensor"``,
  ``weight.data.cuda()``) that no module global can reach. For those we wrap the one megatron
  function that makes them so that, *while it runs*, a CPU tensor reports its CUDA type name and
  ``.cuda()`` keeps it on the CPU (:func:`cpu_tensors_pose_as_cuda`). That is a global patch of
  ``torch.Tensor`` limited to the duration of the call; it is unavoidable because ``Tensor.type``
  and ``Tensor.cuda`` are methods of the tensor class, not names the megatron module looks up.
* Two megatron functions are replaced by CPU versions with the same signature (the RNG-state
  accessors and the dispatcher's device-to-host helper), and two tensor-parallel collectives learn the uneven
  splits gloo lacks.

Every patched name is checked before patching: a megatron-core that moved or renamed one fails
with a ``RuntimeError`` naming it instead of silently running without the stand-in.

Semantics on CPU worth knowing:

* The tensor-parallel RNG tracker keeps its named states on a dedicated CPU generator that stands in
  for the CUDA default generator. Ops on CPU tensors draw from the CPU default generator, so dropout
  inside ``get_cuda_rng_tracker().fork()`` is *not* decorrelated across tensor-parallel ranks on CPU.
  Weight init with ``use_cpu_initialization=True`` does not use the tracker at all (it draws the full
  matrix from the CPU default generator and keeps this rank's slice), which is what makes TP=1 and
  TP=2 runs start from the same weights.
* dist_checkpointing's fully-parallel *load* must be given ``exchange_algo="gather_object"`` on CPU;
  its other exchange algorithms move tensors with ``.cuda()``. Scripts that save a checkpoint need an
  ``if __name__ == "__main__":`` guard (the saver starts a multiprocessing Manager).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_muon.platform.megatron_fixes import (
    SUPPORTED_MEGATRON_CORE_VERSION,
    apply_megatron_fixes,
    check_megatron_version,
)

__all__ = [
    "SUPPORTED_MEGATRON_CORE_VERSION",
    "TORCH_WITH_CPU_AS_CUDA",
    "apply_cpu_stand_ins",
    "cpu_stand_ins_active",
    "cpu_tensors_pose_as_cuda",
]

_CPU = torch.device("cpu")

_stand_ins_active = False


# ---------------------------------------------------------------------------------------------------
# What `torch.cuda` means inside a patched megatron module.
# ---------------------------------------------------------------------------------------------------


class _InOrderStream:
    """Stands in for ``torch.cuda.Stream``: CPU kernels run in program order, so there is nothing to
    wait for and nothing to record."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        del device, priority, kwargs

    @staticmethod
    def priority_range() -> tuple[int, int]:
        return (0, 0)

    def wait_stream(self, stream: Any) -> None:
        del stream

    def wait_event(self, event: Any) -> None:
        del event

    def record_event(self, event: _CompletedEvent | None = None) -> _CompletedEvent:
        return event if event is not None else _CompletedEvent()

    def synchronize(self) -> None:
        return None  # CPU work is in order: nothing to wait for

    def query(self) -> bool:
        return True


class _CompletedEvent:
    """Stands in for ``torch.cuda.Event``: on CPU every recorded point has already happened.
    Timing (``elapsed_time``) is deliberately absent: it would have to invent a number."""

    def __init__(
        self,
        enable_timing: bool = False,
        blocking: bool = False,
        interprocess: bool = False,
        external: bool = False,
    ) -> None:
        del enable_timing, blocking, interprocess, external

    def record(self, stream: Any = None) -> None:
        del stream

    def wait(self, stream: Any = None) -> None:
        del stream

    def synchronize(self) -> None:
        return None  # CPU work is in order: nothing to wait for

    def query(self) -> bool:
        return True


_THE_STREAM = _InOrderStream()

# megatron-core 0.19.2: stands in for the CUDA default generator, whose state megatron's RNG tracker
# reads, forks and restores (tensor_parallel/random.py). Separate from the CPU default generator, as on a GPU.
_CUDA_GENERATOR_STAND_IN = torch.Generator(device="cpu")


class _CudaMeaningCpu(types.ModuleType):
    """``torch.cuda`` as seen by a patched megatron module: the CPU is the current device.

    Names not defined here (``is_available``, ``nvtx``, ``amp``, ...) are the real ``torch.cuda``'s:
    they already behave correctly on a machine without CUDA.
    """

    Stream = _InOrderStream
    Event = _CompletedEvent

    def __init__(self) -> None:
        super().__init__("torch.cuda", "torch.cuda as seen by megatron on a CPU machine")

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def current_stream(device: Any = None) -> _InOrderStream:
        del device
        return _THE_STREAM

    @staticmethod
    def default_stream(device: Any = None) -> _InOrderStream:
        del device
        return _THE_STREAM

    @staticmethod
    def stream(stream: Any) -> contextlib.AbstractContextManager[None]:
        del stream
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(device: Any = None) -> None:
        del device

    @staticmethod
    def set_device(device: Any) -> None:
        """The CPU is the only device (dist_checkpointing's persistent async worker selects one)."""
        del device

    @staticmethod
    def device_count() -> int:
        """One device, the CPU (read only as ``rank % device_count()`` before ``set_device``)."""
        return 1

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        del device
        return _CUDA_GENERATOR_STAND_IN.get_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        del device
        _CUDA_GENERATOR_STAND_IN.set_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        _CUDA_GENERATOR_STAND_IN.manual_seed(int(seed))

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        _CUDA_GENERATOR_STAND_IN.manual_seed(int(seed))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _cpu_if_cuda(device: Any) -> Any:
    """``"cuda"``, ``"cuda:N"`` and ``torch.device("cuda", N)`` mean the CPU; anything else is kept."""
    if isinstance(device, str) and device.split(":", 1)[0] == "cuda":
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _factory_reading_cuda_as_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def create(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        return factory(*args, **kwargs)

    return create


class _TorchWithCpuAsCuda(types.ModuleType):
    """``torch`` as seen by a patched megatron module. Everything is the real torch except
    ``torch.cuda`` (:class:`_CudaMeaningCpu`) and the factories megatron calls with a hard-coded
    ``device="cuda"``."""

    def __init__(self) -> None:
        super().__init__("torch", "torch as seen by megatron on a CPU machine")
        self.cuda = _CudaMeaningCpu()
        for name in ("tensor", "zeros", "ones", "empty", "full", "empty_like"):
            setattr(self, name, _factory_reading_cuda_as_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


TORCH_WITH_CPU_AS_CUDA = _TorchWithCpuAsCuda()


# Megatron modules whose `torch` global becomes TORCH_WITH_CPU_AS_CUDA, with what each needs.
_MODULES_SEEING_CPU_AS_CUDA: dict[str, str] = {
    # megatron-core 0.19.2: 1. torch.cuda.current_device() as the allocation device.
    "megatron.core.tensor_parallel.layers": "current_device() for sequence-parallel gather buffers",
    "megatron.core.tensor_parallel.mappings": "current_device() for all-gather / reduce-scatter outputs",
    "megatron.core.utils": "current_device() in GlobalMemoryBuffer (sequence-parallel all-gather)",
    "megatron.core.transformer.moe.router": "current_device() for aux-loss and routing buffers",
    "megatron.core.transformer.attention": "current_device() for attention buffers",
    "megatron.core.transformer.dot_product_attention": "current_device() for the softmax offset",
    "megatron.core.transformer.transformer_layer": "current_device() for static inputs / masks",
    "megatron.core.models.gpt.gpt_model": "current_device() for the sequence-length offset",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "current_device() for inv_freq",
    # megatron-core 0.19.2: 2. The tensor-parallel RNG tracker's CUDA RNG state (see also the replaced
    # accessors below).
    "megatron.core.tensor_parallel.random": "cuda get_rng_state / manual_seed on a CPU generator",
    # megatron-core 0.19.2: 4. Streams and events used for overlap.
    "megatron.core.distributed.distributed_data_parallel": "Stream for the grad-sync stream",
    "megatron.core.distributed.param_and_grad_buffer": "current_stream / stream / Event, device='cuda'",
    "megatron.core.transformer.moe.token_dispatcher": "the alltoall dispatcher's device-to-host Stream",
    # megatron-core 0.19.2: 5. Hard-coded device="cuda" and torch.cuda.synchronize().
    "megatron.core.pipeline_parallel.schedules": 'device="cuda" for total_num_tokens',
    "megatron.core.pipeline_parallel.p2p_communication": "current_device() shapes, synchronize()",
    "megatron.core.optimizer.optimizer": "device='cuda' for _scale / found_inf / flags",
    "megatron.core.optimizer.distrib_optimizer": "current_device() for gather buffers",
    "megatron.core.optimizer.layer_wise_optimizer": "device='cuda' for the has_grad_norm_group flag",
    "megatron.core.optimizer.grad_scaler": "device='cuda' for the loss scale",
    "megatron.core.optimizer.clip_grads": "device='cuda' for the total norm and zero count",
    # megatron-core 0.19.2: 8. dist_checkpointing.
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "current_device() in finalize",
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "synchronize() in the preload",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "synchronize() before the write",
    "megatron.core.dist_checkpointing.strategies.async_utils": "current_device() / synchronize()",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict": "synchronize() in the preload",
}


# ---------------------------------------------------------------------------------------------------
# Tensor methods, during one megatron call.
# ---------------------------------------------------------------------------------------------------

_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


def _type_naming_cpu_tensors_as_cuda(
    self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any
) -> Any:
    if dtype is None and not kwargs and self.device.type == "cpu":
        name = _ORIGINAL_TENSOR_TYPE(self)  # e.g. "torch.FloatTensor"
        return name.replace("torch.", "torch.cuda.", 1)
    return _ORIGINAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _cuda_keeping_cpu_tensors(
    self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any
) -> torch.Tensor:
    del device, non_blocking, kwargs
    return self


@contextlib.contextmanager
def cpu_tensors_pose_as_cuda() -> Iterator[None]:
    """While active, ``t.type()`` of a CPU tensor names the CUDA type (``"torch.cuda.FloatTensor"``)
    and ``t.cuda()`` returns ``t`` itself. Re-entrant; process-wide while active (other threads see it
    too), which is why it only wraps short, single-threaded setup calls: the megatron functions listed in
    :data:`_FUNCTIONS_SEEING_CPU_TENSORS_AS_CUDA`."""
    previous_type = torch.Tensor.__dict__.get("type")
    previous_cuda = torch.Tensor.__dict__.get("cuda")
    # setattr: torch's stubs declare these as (overloaded) methods, which mypy will not let us assign.
    setattr(torch.Tensor, "type", _type_naming_cpu_tensors_as_cuda)  # noqa: B010
    setattr(torch.Tensor, "cuda", _cuda_keeping_cpu_tensors)  # noqa: B010
    try:
        yield
    finally:
        for name, previous in (("type", previous_type), ("cuda", previous_cuda)):
            if previous is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, previous)


def _posing_cpu_tensors_as_cuda(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        with cpu_tensors_pose_as_cuda():
            return function(*args, **kwargs)

    call.__cpu_stand_in__ = True  # type: ignore[attr-defined]
    return call


# (module, attribute path) of megatron functions that run with cpu_tensors_pose_as_cuda().
_FUNCTIONS_SEEING_CPU_TENSORS_AS_CUDA: dict[tuple[str, str], str] = {
    # megatron-core 0.19.2: 6. optimizer/clip_grads.py asserts param.grad.type() ==
    #    'torch.cuda.FloatTensor'; optimizer.py
    #    calls it through its own imported name, so both names are wrapped.
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"): "grad type assert",
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"): "grad type assert",
    # megatron-core 0.19.2: 7. The element-sharded DistributedOptimizer sorts params by their CUDA type string.
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"): "param.type()",
    # megatron-core 0.19.2: its model-space checkpoint format gathers the state shards with .cuda() tensors.
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.get_parameter_state_dp_zero",
    ): ".cuda()",
    # megatron-core 0.19.2: bf16/fp16 mixed precision sorts params the same way.
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"): "param.type()",
    # megatron-core 0.19.2: 5. optimizer/grad_scaler.py moves a loaded loss scale with .cuda(current_device()).
    ("megatron.core.optimizer.grad_scaler", "DynamicGradScaler.load_state_dict"): ".cuda()",
    # megatron-core 0.19.2: models/common/language_module: with pipeline parallelism the tied embedding
    # copy on the last stage is moved with weight.data.cuda() before its first all-reduce.
    (
        "megatron.core.models.common.language_module.language_module",
        "LanguageModule.setup_embeddings_and_output_layer",
    ): "weight.data.cuda()",
}


# ---------------------------------------------------------------------------------------------------
# Replaced megatron functions.
# ---------------------------------------------------------------------------------------------------


def _get_cuda_rng_state_on_cpu(
    device: Any = "cuda", clone: bool = False, graph_safe: bool = False
) -> torch.Tensor:
    """CPU version of ``tensor_parallel.random._get_cuda_rng_state`` (same signature)."""
    del device, clone
    if graph_safe:
        raise RuntimeError("graph_safe=True (CUDA-graph-safe RNG, use_cudagraphable_rng) needs CUDA")
    return _CUDA_GENERATOR_STAND_IN.get_state()


def _set_cuda_rng_state_on_cpu(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """CPU version of ``tensor_parallel.random._set_cuda_rng_state`` (same signature)."""
    del device
    if graph_safe:
        raise RuntimeError("graph_safe=True (CUDA-graph-safe RNG, use_cudagraphable_rng) needs CUDA")
    _CUDA_GENERATOR_STAND_IN.set_state(new_state)


def _move_tensor_to_cpu_including_cpu_tensors(
    tensor: Any, as_numpy: bool = False, record_stream: bool = False
) -> Any:
    """CPU version of ``moe_utils.maybe_move_tensor_to_cpu`` as imported by the token dispatcher.

    The original converts only CUDA tensors (``tensor.is_cuda``), so on CPU the alltoall split sizes
    would stay tensors; ``tensor_parallel.mappings._AllToAll`` hands them to ``sum()`` and
    ``all_to_all_single(output_split_sizes=...)``, which need host integers (numpy here)."""
    del record_stream
    if torch.is_tensor(tensor):
        tensor = tensor.to(_CPU)
        if as_numpy:
            return tensor.numpy()
    return tensor


def _uneven_gather_along_first_dim_on_gloo(
    original: Callable[..., torch.Tensor],
) -> Callable[..., torch.Tensor]:
    """``tensor_parallel.mappings._gather_along_first_dim`` that also gathers uneven splits on gloo.

    # megatron-core 0.19.2: with ``output_split_sizes`` (the MoE dispatcher under expert-TP > 1, where each
    # rank routes a different number of tokens) megatron calls ``torch.distributed.all_gather`` with tensors of
    # different sizes, which gloo refuses ("invalid tensor size"). Here each rank pads its rows to the largest
    # split, the padded blocks are gathered with equal sizes, and the padding is dropped: the same result.
    """

    @functools.wraps(original)
    def gather(
        input_: torch.Tensor, group: Any, output_split_sizes: Any = None, use_global_buffer: bool = False
    ) -> torch.Tensor:
        if output_split_sizes is None or group is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(size) for size in output_split_sizes]
        largest = max(sizes)
        padded = input_.new_zeros((largest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        blocks = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(blocks, padded.contiguous(), group=group)
        return torch.cat([block[:size] for block, size in zip(blocks, sizes, strict=True)], dim=0)

    gather.__cpu_stand_in__ = True  # type: ignore[attr-defined]
    return gather


def _uneven_reduce_scatter_along_first_dim_on_gloo(
    original: Callable[..., torch.Tensor],
) -> Callable[..., torch.Tensor]:
    """``tensor_parallel.mappings._reduce_scatter_along_first_dim`` that also scatters uneven splits on gloo.

    # megatron-core 0.19.2: with ``input_split_sizes`` megatron calls ``torch.distributed.reduce_scatter`` with
    # a list of tensors of different sizes, which gloo does not implement. Here the whole tensor is all-reduced
    # (sum) and each rank keeps its own rows: the same values, at the cost of a larger message on CPU.
    """

    @functools.wraps(original)
    def reduce_scatter(
        input_: torch.Tensor, group: Any, input_split_sizes: Any = None, use_global_buffer: bool = False
    ) -> torch.Tensor:
        if input_split_sizes is None or group is None or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(size) for size in input_split_sizes]
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start : start + sizes[group.rank()]].clone()

    reduce_scatter.__cpu_stand_in__ = True  # type: ignore[attr-defined]
    return reduce_scatter


# ---------------------------------------------------------------------------------------------------
# Applying.
# ---------------------------------------------------------------------------------------------------


def cpu_stand_ins_active() -> bool:
    """True once :func:`apply_cpu_stand_ins` has patched megatron in this process."""
    return _stand_ins_active


def _import(module_name: str) -> types.ModuleType:
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise RuntimeError(f"CPU stand-in target module {module_name} cannot be imported: {error}") from error


def _resolve(module_name: str, attribute_path: str) -> tuple[Any, str, Any]:
    """Return (owner, name, static value) for ``module.attribute.path``; RuntimeError if missing."""
    owner: Any = _import(module_name)
    *parents, name = attribute_path.split(".")
    for parent in parents:
        if not hasattr(owner, parent):
            raise RuntimeError(
                f"CPU stand-in target {module_name}.{attribute_path} not found: "
                f"{module_name} has no {parent!r}"
            )
        owner = getattr(owner, parent)
    try:
        value = inspect.getattr_static(owner, name)
    except AttributeError:
        raise RuntimeError(f"CPU stand-in target {module_name}.{attribute_path} not found") from None
    return owner, name, value


def _is_stand_in(function: Any) -> bool:
    return getattr(function, "__cpu_stand_in__", False) is True


def _check_function(module_name: str, attribute_path: str, value: Any) -> None:
    function = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
    if not callable(function):
        raise RuntimeError(
            f"CPU stand-in target {module_name}.{attribute_path} is {type(value).__name__}, "
            "expected a function"
        )


def _plan() -> list[Callable[[], None]]:
    """Check every target and return the patches still to apply (nothing is applied if one is missing)."""
    patches: list[Callable[[], None]] = []

    for module_name in _MODULES_SEEING_CPU_AS_CUDA:
        module = _import(module_name)
        module_torch = getattr(module, "torch", None)
        if module_torch is TORCH_WITH_CPU_AS_CUDA:
            continue
        if module_torch is not torch:
            raise RuntimeError(
                f"CPU stand-in target {module_name}.torch is not the torch module (found {module_torch!r})"
            )
        patches.append(functools.partial(setattr, module, "torch", TORCH_WITH_CPU_AS_CUDA))

    for module_name, attribute_path in _FUNCTIONS_SEEING_CPU_TENSORS_AS_CUDA:
        owner, name, value = _resolve(module_name, attribute_path)
        _check_function(module_name, attribute_path, value)
        function = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        if _is_stand_in(function):
            continue
        wrapped = _posing_cpu_tensors_as_cuda(function)
        posing: object = type(value)(wrapped) if isinstance(value, (staticmethod, classmethod)) else wrapped
        patches.append(functools.partial(setattr, owner, name, posing))

    replacements: list[tuple[str, str, Callable[..., Any]]] = [
        # megatron-core 0.19.2: 2. tensor_parallel/random.py: the tracker reads and sets the CUDA generator's state through these.
        ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", _get_cuda_rng_state_on_cpu),
        ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", _set_cuda_rng_state_on_cpu),
        # megatron-core 0.19.2: 4. transformer/moe/token_dispatcher.py: alltoall split sizes must become numpy on CPU too.
        (
            "megatron.core.transformer.moe.token_dispatcher",
            "maybe_move_tensor_to_cpu",
            _move_tensor_to_cpu_including_cpu_tensors,
        ),
    ]
    for module_name, attribute_path, replacement in replacements:
        owner, name, value = _resolve(module_name, attribute_path)
        _check_function(module_name, attribute_path, value)
        if value is not replacement:
            patches.append(functools.partial(setattr, owner, name, replacement))

    # megatron-core 0.19.2: 9. tensor_parallel/mappings.py: uneven all-gather / reduce-scatter (expert-TP > 1) on gloo.
    for attribute_path, wrapper in (
        ("_gather_along_first_dim", _uneven_gather_along_first_dim_on_gloo),
        ("_reduce_scatter_along_first_dim", _uneven_reduce_scatter_along_first_dim_on_gloo),
    ):
        owner, name, value = _resolve("megatron.core.tensor_parallel.mappings", attribute_path)
        _check_function("megatron.core.tensor_parallel.mappings", attribute_path, value)
        if not _is_stand_in(value):
            patches.append(functools.partial(setattr, owner, name, wrapper(value)))

    return patches


def apply_cpu_stand_ins(*, force: bool = False) -> bool:
    """Patch megatron-core so that it trains on CPU with gloo (the hardware stand-ins), and apply the logic
    workarounds every device needs (``platform/megatron_fixes.py``). Idempotent.

    Returns True when the stand-ins are active. Where CUDA is available only the logic workarounds are applied and
    False is returned, unless ``force`` (a process that runs CPU ranks on a machine that has a GPU: the
    multi-process test harness). Raises RuntimeError naming the megatron version or attribute if megatron-core is
    not the version these stand-ins were written for, before patching anything.
    """
    global _stand_ins_active
    apply_megatron_fixes()
    if torch.cuda.is_available() and not force:
        return False
    # Checked on every call (cheap): places already patched are recognized and left alone.
    check_megatron_version()
    for patch in _plan():
        patch()
    _stand_ins_active = True
    return True
