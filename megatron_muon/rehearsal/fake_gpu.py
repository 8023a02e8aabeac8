"""A GPU that is not there: torch's fake CUDA tensors plus the few ``torch.cuda`` calls that need a driver.

:func:`fake_cuda_device` makes this CPU process look like a machine with GPUs to our code and to megatron-core:
``torch.cuda.is_available()`` is True, device queries answer for a fake GPU, streams and events are no-ops, the
CUDA RNG is a CPU generator, and :class:`GpuRehearsalMode` (a ``FakeTensorMode``) turns every tensor created on
``device="cuda"`` into a ``FakeTensor`` on ``cuda:0`` with shapes, dtypes and devices but no storage. These are
*hardware* stand-ins only: megatron's own logic runs as it would on a GPU (the CPU stand-ins of ``platform/cpu.py``
are not installed; the logic workarounds of ``platform/megatron_fixes.py`` are, as on every device).

While the mode is active it records what a GPU program must not do silently:

* **host syncs**: a read of a device value on the host (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, a
  blocking copy to the CPU, ``torch.cuda.synchronize()``), each with the code location that asked for it. A fake
  tensor has no value, so the read answers a stand-in: 1.0 for a floating value (a finite norm, a positive token
  count), 0 for an integer and False for a boolean (no flag set, "no NaN found");
* **collectives fed a CPU tensor** (on a GPU their group runs NCCL, which takes CUDA tensors only);
* a CPU tensor meeting a CUDA one in an op raises ``FakeTensorDeviceMismatchError`` (torch's own check).

Nothing here has values: use it for devices, shapes, syncs and collectives, never for numbers.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

__all__ = ["FAKE_GPU_NAME", "GpuRehearsalMode", "HostSync", "fake_cuda_device"]

FAKE_GPU_NAME = "fake GPU (rehearsal: no values, no storage)"

_ATEN = torch.ops.aten
_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_PACKAGE_DIR = os.path.dirname(os.path.dirname(_THIS_FILE))


@dataclass(frozen=True, slots=True)
class HostSync:
    """One device→host synchronization: what asked for it and where."""

    kind: str
    """``read`` (item / float / bool / tolist), ``copy`` (blocking device→host copy) or ``synchronize``."""
    site: str
    """``path:line in function`` of the first frame outside torch (the code that asked)."""
    owner: str
    """``ours`` (megatron_muon), ``megatron-core`` or ``other``."""


def _caller_frame() -> Any:
    """The innermost Python frame outside torch and this module."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if filename != _THIS_FILE and not filename.startswith(_TORCH_DIR):
            return frame
        frame = frame.f_back
    return None


def _describe(frame: Any) -> tuple[str, str]:
    if frame is None:
        return "<unknown>", "other"
    filename = os.path.abspath(frame.f_code.co_filename)
    repository = os.path.dirname(_PACKAGE_DIR)
    if (
        filename.startswith(repository) and "site-packages" not in filename
    ):  # the package, its tools and tests
        owner, shown = "ours", os.path.relpath(filename, repository)
    elif f"{os.sep}megatron{os.sep}core{os.sep}" in filename:
        owner, shown = (
            "megatron-core",
            "megatron/core/" + filename.split(f"{os.sep}megatron{os.sep}core{os.sep}", 1)[1],
        )
    else:
        owner, shown = "other", filename
    return f"{shown}:{frame.f_lineno} in {frame.f_code.co_name}", owner


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


_C10D = torch.ops.c10d
_COALESCED_COLLECTIVES = {
    _C10D.allreduce_coalesced_.default,
    _C10D.allgather_coalesced_.default,
    _C10D.allgather_into_tensor_coalesced_.default,
    _C10D.reduce_scatter_tensor_coalesced_.default,
}


def _fake_work() -> Any:
    from torch._C._distributed_c10d import FakeWork

    return FakeWork().boxed()


def _runs_on_the_host(args: Any, kwargs: dict[str, Any]) -> bool:
    """No fake tensor among the inputs and no device asked for other than the CPU."""
    if any(isinstance(t, FakeTensor) for t in _tensors(list(args) + list(kwargs.values()))):
        return False
    device = kwargs.get("device")
    return device is None or torch.device(device).type == "cpu"


# ignore[no-untyped-call]: torch's TorchDispatchMode.__init_subclass__ has no annotations.
class GpuRehearsalMode(FakeTensorMode):  # type: ignore[no-untyped-call]
    """``FakeTensorMode`` that records host syncs and CPU tensors in collectives instead of failing on the first.

    ``syncs`` holds every sync since the last :meth:`reset_records` (a ``.tolist()`` of n values counts once);
    ``collective_errors`` one line per collective that was handed a tensor not on CUDA."""

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)
        self.syncs: list[HostSync] = []
        self.total_syncs = 0
        """Syncs since the mode started (never reset: events compare against it)."""
        self.collective_errors: list[str] = []
        self._last_read_key: tuple[int, int] | None = None

    @property
    def avoid_device_init(self) -> bool:
        """Never touch the (absent) CUDA runtime, although ``torch.cuda.is_available()`` says True here: the fake
        mode otherwise moves constants to the device and initializes it."""
        return True

    def reset_records(self) -> None:
        """Forget the syncs and collective errors recorded so far (``total_syncs`` keeps counting)."""
        self.syncs, self.collective_errors, self._last_read_key = [], [], None

    def record_sync(self, kind: str, frame: Any = None) -> None:
        """Record a host sync of ``kind`` at ``frame`` (default: the innermost frame outside torch and here)."""
        frame = frame if frame is not None else _caller_frame()
        site, owner = _describe(frame)
        self.syncs.append(HostSync(kind=kind, site=site, owner=owner))
        self.total_syncs += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func.namespace in ("c10d", "_c10d_functional"):
            self._check_collective(func, args, kwargs)
            if (
                func in _COALESCED_COLLECTIVES
            ):  # no fake implementation in torch: in place, they return a work
                return _fake_work()
        elif _runs_on_the_host(args, kwargs):
            # Host tensors stay real: token counts, masks and RNG states the program builds on the CPU keep their
            # values, as on a GPU machine; only what lives on the (fake) GPU is fake.
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func is _ATEN._local_scalar_dense.default:
            return self._read_value(args[0])
        self._last_read_key = None
        if func is _ATEN._to_copy.default:
            source = args[0]
            target = kwargs.get("device")
            if (
                target is not None
                and torch.device(target).type == "cpu"
                and source.device.type == "cuda"
                and not kwargs.get("non_blocking", False)
            ):
                self.record_sync("copy")
        elif func is _ATEN.copy_.default:
            target, source = args[0], args[1]
            if (
                target.device.type == "cpu"
                and source.device.type == "cuda"
                and not kwargs.get("non_blocking")
            ):
                self.record_sync("copy")
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _read_value(self, tensor: torch.Tensor) -> Any:
        frame = _caller_frame()
        key = (id(frame), frame.f_lasti if frame is not None else -1)
        if tensor.device.type == "cuda" and key != self._last_read_key:  # a tolist() of n values: one sync
            self.record_sync("read", frame)
        self._last_read_key = key
        if tensor.dtype == torch.bool:
            return False
        return 1.0 if tensor.dtype.is_floating_point else 0

    def _check_collective(self, func: Any, args: Any, kwargs: Any) -> None:
        for tensor in _tensors(list(args) + list(kwargs.values())):
            if tensor.device.type != "cuda":
                site, _ = _describe(_caller_frame())
                self.collective_errors.append(
                    f"{func.name()} was handed a {tensor.device.type} tensor {tuple(tensor.shape)} at {site} "
                    "(NCCL takes CUDA tensors only)"
                )
                return

    def sync_summary(self) -> dict[str, int]:
        """``owner: kind at site`` → count of the syncs recorded since :meth:`reset_records`."""
        return dict(Counter(f"{s.owner}: {s.kind} at {s.site}" for s in self.syncs))


class _NoOpStream:
    """``torch.cuda.Stream`` of a fake GPU: work is in program order, nothing to wait for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    def wait_stream(self, stream: Any) -> None:
        del stream

    def wait_event(self, event: Any) -> None:
        del event

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _NoOpEvent()

    def synchronize(self) -> None:
        _record_synchronize()

    def query(self) -> bool:
        return True

    @staticmethod
    def priority_range() -> tuple[int, int]:
        return (0, 0)

    def __enter__(self) -> _NoOpStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _NoOpEvent:
    """``torch.cuda.Event`` of a fake GPU. Waiting for an event (``synchronize``, ``elapsed_time``) is a host sync
    unless the host has synced since the event was recorded (then it has completed: a real GPU answers at once);
    the elapsed time is 0 (nothing ran)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs
        self._syncs_at_record = -1

    def record(self, stream: Any = None) -> None:
        del stream
        self._syncs_at_record = _active_mode.total_syncs if _active_mode is not None else -1

    def wait(self, stream: Any = None) -> None:
        del stream

    def query(self) -> bool:
        return True

    def _wait_on_host(self) -> None:
        if _active_mode is not None and _active_mode.total_syncs <= self._syncs_at_record:
            _active_mode.record_sync("synchronize")

    def synchronize(self) -> None:
        self._wait_on_host()

    def elapsed_time(self, end: _NoOpEvent) -> float:
        end._wait_on_host()
        return 0.0


_MISSING = object()
_active_mode: GpuRehearsalMode | None = None


def _record_synchronize(*args: Any, **kwargs: Any) -> None:
    del args, kwargs
    if _active_mode is not None:
        _active_mode.record_sync("synchronize")


@contextlib.contextmanager
def fake_cuda_device(device_count: int = 8) -> Iterator[GpuRehearsalMode]:
    """Inside: ``torch.cuda`` reports ``device_count`` fake GPUs, tensors on ``"cuda"`` are fake, and the yielded
    mode records syncs. Everything patched is put back on exit."""
    global _active_mode
    rng = torch.Generator(device="cpu")  # the fake GPU's CUDA generator
    patches: dict[str, Any] = {
        "is_available": lambda: True,
        "is_initialized": lambda: True,
        "device_count": lambda: device_count,
        "current_device": lambda: 0,
        "set_device": lambda device: None,
        "get_device_name": lambda device=None: FAKE_GPU_NAME,
        "get_device_capability": lambda device=None: (9, 0),
        "synchronize": _record_synchronize,
        "Stream": _NoOpStream,
        "Event": _NoOpEvent,
        "current_stream": lambda device=None: _NoOpStream(),
        "default_stream": lambda device=None: _NoOpStream(),
        "stream": lambda stream: contextlib.nullcontext(),
        "get_rng_state": lambda device="cuda": rng.get_state(),
        "set_rng_state": lambda state, device="cuda": rng.set_state(state),
        "manual_seed": lambda seed: rng.manual_seed(int(seed)),
        "manual_seed_all": lambda seed: rng.manual_seed(int(seed)),
        "memory_allocated": lambda device=None: 0,
        "max_memory_allocated": lambda device=None: 0,
        "reset_peak_memory_stats": lambda device=None: None,
        "empty_cache": lambda: None,
        "is_current_stream_capturing": lambda: False,
    }
    saved = {name: torch.cuda.__dict__.get(name, _MISSING) for name in patches}
    from megatron.core.tensor_parallel import random as megatron_random

    # megatron-core 0.19.2: tensor_parallel/random.py reads and sets the CUDA generator through these two
    # functions (CUDA graph-safe generators, torch.cuda.default_generators): a CPU generator stands in for the GPU's.
    random_saved = (megatron_random._get_cuda_rng_state, megatron_random._set_cuda_rng_state)
    mode = GpuRehearsalMode()
    real_generator = torch.Generator

    def generator_on_fake_gpu(device: Any = "cpu") -> torch.Generator:
        """A CUDA generator of the fake GPU is a CPU generator (random ops on fake tensors draw nothing)."""
        return real_generator(device="cpu" if torch.device(device).type == "cuda" else device)

    try:
        torch.Generator = generator_on_fake_gpu  # type: ignore[misc,assignment]
        for name, value in patches.items():
            setattr(torch.cuda, name, value)
        megatron_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
            rng.get_state()
        )
        megatron_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: rng.set_state(
            new_state
        )
        _active_mode = mode
        # torch.compile'd megatron helpers (the router's expert bias) run eagerly: dynamo would compile them for a
        # device that is not there. What they compute is the same.
        with torch._dynamo.config.patch(disable=True), mode:
            yield mode
    finally:
        _active_mode = None
        torch.Generator = real_generator  # type: ignore[misc]
        megatron_random._get_cuda_rng_state, megatron_random._set_cuda_rng_state = random_saved
        for name, value in saved.items():
            if value is _MISSING:
                delattr(torch.cuda, name)
            else:
                setattr(torch.cuda, name, value)
