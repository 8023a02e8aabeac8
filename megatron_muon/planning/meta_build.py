"""Any rank of a large layout, built on the ``meta`` device in one CPU process.

The world is torch's fake process group (collectives return at once and move nothing; megatron's parallel state
only needs the groups' sizes and ranks), and the model is megatron's own ``GPTModel`` from
``models.gpt_moe.build_gpt_moe_model_chunks`` built under ``torch.device("meta")``: parameters have their true
per-rank shapes and megatron's TP/EP attributes but no storage, so a 16 B-parameter model costs nothing.

What is normalised for the build (none of it changes a parameter's shape, name or parallel attributes):

* ``transformer_impl`` is ``local``: Transformer Engine cannot be imported on a CPU machine. TE's layers have the
  same weights; TE fuses the pre-attention norm into ``linear_qkv`` (same count) and holds a layer's experts as
  ``weight0 … weight{n-1}`` of one grouped module, which ``optim/layout.py`` keys exactly like the local experts.
* ``fp8`` off (a GEMM recipe the builder refuses) and ``precision`` fp32 (the planner counts bytes from the
  configured precision itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from megatron_muon.optim.layout import LayoutConfig, MatrixPiece, megatron_param_pieces
from megatron_muon.optim.param_groups import ParamRouting, route_parameters

if TYPE_CHECKING:
    from megatron_muon.config.schema import ModelConfig, ParallelDims, PretrainConfig

__all__ = ["MetaRank", "build_rank_on_meta", "fake_world", "megatron_allocates_on_meta"]

_META = torch.device("meta")


@contextlib.contextmanager
def fake_world(dims: ParallelDims, rank: int) -> Iterator[Any]:
    """Megatron's parallel state for ``rank`` of ``dims`` (a ``ParallelDims``) over torch's fake process group;
    yields megatron's ``ProcessGroupCollection``. Refuses to run inside a process that already has a real group."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not 0 <= rank < dims.world_size:
        raise ValueError(
            f"rank={rank} is outside the world of {dims.world_size} ranks (valid: 0..{dims.world_size - 1})"
        )
    if dist.is_initialized():
        raise RuntimeError(
            "a process group is already initialized in this process; the meta build needs its own"
        )
    dist.init_process_group("fake", rank=rank, world_size=dims.world_size, store=FakeStore())
    try:
        # megatron-core 0.19.2: initialize_model_parallel builds gloo groups by default, which the fake backend
        # cannot create.
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=dims.tp,
            pipeline_model_parallel_size=dims.pp,
            virtual_pipeline_model_parallel_size=dims.vpp,
            context_parallel_size=dims.cp,
            expert_model_parallel_size=dims.ep,
            expert_tensor_parallel_size=dims.etp,
            create_gloo_process_groups=False,
        )
        yield ProcessGroupCollection.use_mpu_process_groups()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


class _CudaMeaningMeta(types.ModuleType):
    """``torch.cuda`` as a megatron module sees it during a meta build: the current device is ``meta``."""

    def __init__(self, base: types.ModuleType) -> None:
        super().__init__("torch.cuda")
        self._base = base

    @staticmethod
    def current_device() -> torch.device:
        return _META

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


class _TorchWithMetaAsCuda(types.ModuleType):
    def __init__(self, base: types.ModuleType) -> None:
        super().__init__("torch")
        self._base = base
        self.cuda = _CudaMeaningMeta(base.cuda)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


@contextlib.contextmanager
def megatron_allocates_on_meta() -> Iterator[None]:
    """Inside: tensors without an explicit device are created on ``meta``, and megatron-core's
    ``torch.cuda.current_device()`` (its allocation device for routers, buffers and rotary tables) is ``meta``.

    Every loaded ``megatron.core`` module's ``torch`` global (the real torch, or the CPU stand-ins' view of it) is
    wrapped for the duration and restored after, so nothing outside the build sees the change."""
    # megatron-core 0.19.2: layers allocate on torch.cuda.current_device() even with use_cpu_initialization
    # (router weight and expert-bias buffers, rotary inv_freq), so the device decision is made where they look.
    saved: dict[str, types.ModuleType] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("megatron.core") or module is None:
            continue
        their_torch = getattr(module, "torch", None)
        if getattr(their_torch, "__name__", "") == "torch" and hasattr(their_torch, "cuda"):
            # torch itself or a module view of it (the CPU stand-ins' ``_TorchWithCpuAsCuda``).
            saved[name] = cast(types.ModuleType, their_torch)
    try:
        for name, their_torch in saved.items():
            setattr(sys.modules[name], "torch", _TorchWithMetaAsCuda(their_torch))  # noqa: B010
        with torch.device(_META):
            yield
    finally:
        for name, their_torch in saved.items():
            setattr(sys.modules[name], "torch", their_torch)  # noqa: B010


@dataclass(slots=True)
class MetaRank:
    """One rank of the layout, built on meta."""

    rank: int
    coordinates: dict[str, int]
    """This rank's position: pp, tp, cp, dp, ep, etp, edp (megatron's parallel_state)."""
    chunks: list[torch.nn.Module]
    routing: ParamRouting
    muon_pieces: list[tuple[str, list[MatrixPiece], bool]] = field(default_factory=list)
    """(parameter name, its logical-matrix pieces, is expert) for every Muon parameter, in routing order."""

    @property
    def parameter_count(self) -> int:
        """Elements of every parameter of this rank's model chunks."""
        return sum(p.numel() for chunk in self.chunks for p in chunk.parameters())

    @property
    def muon_elements(self) -> int:
        """Elements of the parameters routed to Muon."""
        return sum(r.param.numel() for r in self.routing.muon)

    @property
    def adamw_elements(self) -> int:
        """Elements of the parameters routed to AdamW."""
        return sum(r.param.numel() for r in self.routing.adamw)

    def expert_elements(self, optimizer: str) -> int:
        """Elements of the expert-parallel parameters routed to ``optimizer`` (muon | adamw)."""
        routed = self.routing.muon if optimizer == "muon" else self.routing.adamw
        return sum(r.param.numel() for r in routed if not getattr(r.param, "allreduce", True))


def _buildable(model: ModelConfig) -> ModelConfig:
    """The model section with the shape-neutral settings the local-spec builder needs (module docstring); raises
    ``ConfigError`` for what it does not build, before any process group exists."""
    from megatron_muon.models.gpt_moe import require_buildable

    model = dataclasses.replace(model, transformer_impl="local", fp8=None, precision="fp32")
    require_buildable(model)
    return model


def build_rank_on_meta(cfg: PretrainConfig, dims: ParallelDims, rank: int) -> MetaRank:
    """The model chunks of global ``rank`` of ``dims`` for the pretraining config ``cfg``, on meta, with Muon /
    AdamW routing and the logical-matrix pieces of every Muon parameter at their true shapes.

    Raises ``ConfigError`` / ``ValueError`` (one line) for a model the builder cannot construct."""
    from megatron.core import parallel_state

    from megatron_muon.models.gpt_moe import build_gpt_moe_model_chunks, build_transformer_config
    from megatron_muon.platform import apply_cpu_stand_ins, chosen_device

    model = _buildable(cfg.model)
    # Every device: megatron's torch norm learns sequence parallelism (platform/megatron_fixes.py); a process on the
    # CPU (no CUDA, or MEGATRON_MUON_DEVICE=cpu) also needs the hardware stand-ins (TransformerLayer builds CUDA
    # streams).
    apply_cpu_stand_ins(force=chosen_device().type == "cpu")
    muon = cfg.optimizer.muon
    options = LayoutConfig(
        split_qkv=muon.split_qkv, qkv_per_head=muon.qkv_per_head, split_gate_up=muon.split_gate_up
    )
    with fake_world(dims, rank) as pg_collection:
        coordinates = {
            "pp": parallel_state.get_pipeline_model_parallel_rank(),
            "tp": parallel_state.get_tensor_model_parallel_rank(),
            "cp": parallel_state.get_context_parallel_rank(),
            "dp": parallel_state.get_data_parallel_rank(),
            "ep": parallel_state.get_expert_model_parallel_rank(),
            "etp": parallel_state.get_expert_tensor_parallel_rank(),
            "edp": parallel_state.get_expert_data_parallel_rank(),
        }
        with megatron_allocates_on_meta():
            config = build_transformer_config(
                model, tp=dims.tp, pp=dims.pp, ep=dims.ep, etp=dims.etp, vpp=dims.vpp
            )
            config.perform_initialization = False  # nothing to draw on meta
            config.sequence_parallel = dims.sequence_parallel
            chunks = build_gpt_moe_model_chunks(model, config, pg_collection)
        routing = route_parameters(chunks, router=muon.router)
        pieces: list[tuple[str, list[MatrixPiece], bool]] = []
        for routed in routing.muon:
            chunk_config = chunks[routed.chunk].config
            found = megatron_param_pieces(
                routed.name,
                routed.param,
                routed.module,
                chunk_config,
                routing.module_paths[routed.chunk],
                options,
            )
            pieces.append((routed.name, found, not getattr(routed.param, "allreduce", True)))
    stray = [
        n
        for chunk in chunks
        for n, t in [*chunk.named_parameters(), *chunk.named_buffers()]
        if t.device != _META
    ]
    if stray:
        raise RuntimeError(
            f"the meta build allocated real memory for {stray[:3]} (megatron-core moved a device choice)"
        )
    return MetaRank(rank=rank, coordinates=coordinates, chunks=chunks, routing=routing, muon_pieces=pieces)
