"""Fully sharded data parallelism (``parallel.fsdp: true``): megatron-core's torch-FSDP2 recipe, made to serve
expert parallelism and megatron's per-token loss.

Parameters, gradients and optimizer state are sharded over the data-parallel ranks: each ``TransformerLayer`` and
the embedding are one ``fully_shard`` unit (megatron's ``TorchFullyShardedDataParallel`` choice), the experts of
an MoE layer one more unit sharded over the *expert*-data-parallel ranks, and the root module holds the rest. A
parameter becomes a ``DTensor`` whose local rows ``[start, stop)`` (``torch.chunk`` over dim 0) are this rank's;
before each unit's forward and backward FSDP all-gathers it, after its backward it reduce-scatters the gradient.
The optimizers update the local rows only; Muon gathers each matrix's rows to its one owner
(``optim/layout.py: fsdp_part_pieces``, ``optim/plan.py``), so Newton–Schulz still sees the whole matrix.

Why not megatron's wrapper as is: in megatron-core 0.19.2 ``TorchFullyShardedDataParallel`` shards every
parameter over one data-parallel mesh (experts of different EP ranks would be sharded as if they were replicas),
takes no mixed-precision policy, and its ``scale_gradients`` / ``zero_grad_buffer`` do nothing, so
``calculate_per_token_loss`` (our loss) would leave gradients unnormalized. Megatron-FSDP (``distributed/fsdp``)
is built around CUDA streams and NCCL buffers and does not run on the CPU ranks every feature is tested on.
This class is a ``TorchFullyShardedDataParallel`` with its own ``__init__`` (so megatron's ``unwrap_model`` and
type checks treat it as torch FSDP2) and megatron's data-parallel interface (``no_sync``, ``finish_grad_sync``,
``scale_gradients``, ``zero_grad_buffer``), so megatron's schedules and ``finalize_model_grads`` drive it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.distributed.data_parallel_base import _BaseDataParallel
from megatron.core.distributed.torch_fully_sharded_data_parallel import TorchFullyShardedDataParallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from megatron_muon.optim.layout import local_tensor

__all__ = ["FullyShardedChunk", "wrap_in_fsdp"]

_EXPERT_MODULES = ("SequentialMLP", "TEGroupedMLP", "GroupedMLP")
"""megatron's containers of one MoE layer's local experts (``MoELayer.experts``)."""


# ignore[misc]: megatron-core has no type information, so mypy sees its base class as Any.
class FullyShardedChunk(TorchFullyShardedDataParallel):  # type: ignore[misc]
    """One model chunk under FSDP2, with megatron's data-parallel interface.

    Args:
        config: megatron's ``TransformerConfig``.
        module: the unwrapped chunk (its parameters become ``DTensor`` shards in place).
        dp_group: the data-parallel (× context-parallel) group that shards dense parameters.
        expert_dp_group: the expert-data-parallel group that shards each MoE layer's local experts.
        param_dtype: the dtype parameters are gathered in for compute (None: as stored); gradients are
            reduce-scattered in fp32.
    """

    def __init__(
        self,
        config: TransformerConfig,
        module: torch.nn.Module,
        *,
        dp_group: Any,
        expert_dp_group: Any,
        param_dtype: torch.dtype | None = None,
    ) -> None:
        # megatron's base only (not its FSDP2 wrapping); the subclass makes megatron's unwrap_model and checks see
        # a torch-FSDP2 chunk.
        _BaseDataParallel.__init__(self, config=config, module=module)
        # What megatron's finalize_model_grads reads of a chunk: not Megatron-FSDP, so it gathers a DTensor
        # gradient it reduces over TP (the sequence-parallel norms) and shards it back.
        self.ddp_config = DistributedDataParallelConfig()
        device_type = next(module.parameters()).device.type
        dense_mesh = DeviceMesh.from_group(dp_group, device_type)
        same_ranks = dist.get_process_group_ranks(expert_dp_group) == dist.get_process_group_ranks(dp_group)
        # Without expert parallelism the experts shard over the same ranks: one mesh, so megatron's grad norm
        # (one data-parallel group per optimizer: utils.get_data_parallel_group_if_dtensor) sees one group.
        meshes = {
            "dense": dense_mesh,
            "expert": dense_mesh if same_ranks else DeviceMesh.from_group(expert_dp_group, device_type),
        }
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        # FSDP2 replaces parameters by DTensors and drops their attributes; megatron's tags (tensor_model_parallel,
        # partition_dim, allreduce, sequence_parallel, ...) are put back after (pytorch/pytorch#136929).
        saved = {name: dict(vars(param)) for name, param in module.named_parameters()}
        units: list[FSDPModule] = []
        for submodule in module.modules():
            if type(submodule).__name__ in _EXPERT_MODULES:
                units.append(self._shard(submodule, meshes["expert"], policy))
        for submodule in module.modules():
            if isinstance(submodule, (TransformerLayer, LanguageModelEmbedding)):
                units.append(self._shard(submodule, meshes["dense"], policy))
        units.append(self._shard(module, meshes["dense"], policy))
        for name, param in module.named_parameters():
            for attribute, value in saved.get(name, {}).items():
                setattr(param, attribute, value)
        for unit in units:
            # Sum, not mean: megatron's per-token loss divides by the global token count (scale_gradients).
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)

    @staticmethod
    def _shard(module: torch.nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> FSDPModule:
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        assert isinstance(module, FSDPModule)
        return module

    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        """Nothing to wait for: FSDP2 reduce-scatters each unit's gradients in its backward and waits for the last
        at the end of backward (``finalize_model_grads`` calls this with megatron's DDP signature)."""

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.module.parameters() if p.grad is not None]

    def scale_gradients(self, scaling_factor: float) -> None:
        """Multiply every (sharded) gradient by ``scaling_factor`` (megatron's per-token-loss normalization)."""
        grads = [local_tensor(g) for g in self._grads()]
        if grads:
            torch._foreach_mul_(grads, scaling_factor)

    def zero_grad_buffer(self) -> None:
        """Drop the gradients: FSDP2 allocates each sharded gradient in the reduce-scatter of the next step."""
        for param in self.module.parameters():
            param.grad = None


def wrap_in_fsdp(
    model_chunks: list[torch.nn.Module],
    config: TransformerConfig,
    *,
    pg_collection: Any,
    param_dtype: torch.dtype | None = None,
) -> list[torch.nn.Module]:
    """Each chunk fully sharded (:class:`FullyShardedChunk`) and hooked into ``config`` as ``wrap_in_ddp`` does:
    megatron's ``finalize_model_grads`` after the last backward. Gradients are reduce-scattered after every
    microbatch (megatron's FSDP2 ``no_sync`` does not defer them), so none is ever held whole."""
    if not model_chunks:
        raise ValueError("model_chunks is empty")
    wrapped = [
        FullyShardedChunk(
            config,
            chunk,
            dp_group=pg_collection.dp_cp,
            expert_dp_group=pg_collection.expt_dp,
            param_dtype=param_dtype,
        )
        for chunk in model_chunks
    ]
    no_sync = [chunk.no_sync for chunk in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    # Typed as model chunks (a list is invariant): callers hand them on wherever megatron's chunks go.
    chunks: list[torch.nn.Module] = list(wrapped)
    return chunks
