"""The global gradient norm as megatron's optimizers compute it, left on the device.

megatron's ``get_grad_norm`` returns a Python float: it reads the norm on the host (``.item()``; without apex or
Transformer Engine its local L2 kernel even reads one value per gradient). The training step reads the norm together
with the loss in one transfer (``host_values.py``), so here the same sum of squares is formed on the device, over
the same gradients (each optimizer's ``get_grads_for_grad_norm``: tensor-parallel duplicates and shared embeddings
counted once) and the same process groups as megatron 0.19.2's three cases:

* ``LayerWiseDistributedOptimizer``: its members' gradients, summed over the whole world;
* ``ChainedOptimizer``: with one grad-stats group shared by the members, their gradients summed over it; otherwise
  the members' squared norms added up, each from its own group (recursively);
* any other megatron optimizer: its gradients over its ``get_grad_stats_parallel_group()``.

``tests/distributed/test_sync_free_step.py`` checks the result against megatron's ``get_grad_norm`` at several
layouts, with and without the distributed optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_muon.optim.layout import local_tensor

__all__ = ["grad_norm_squared"]


def _sum_of_squares(grads: list[torch.Tensor], group: Any, device: torch.device) -> torch.Tensor:
    # FSDP (DTensor) gradients: this rank's rows, summed over their mesh's data-parallel group first, as megatron's
    # get_grad_norm_fp32 does (one such group per optimizer: it asserts so).
    shard_group = None
    for grad in grads:
        mesh = getattr(grad, "device_mesh", None)
        if mesh is not None:
            shard_group = mesh.get_group()
    grads = [local_tensor(g) for g in grads]
    if grads:
        norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
        total = torch.stack(norms).square().sum().reshape(1)
    else:  # a rank without gradients still joins the all-reduce (megatron's zeros(1))
        total = torch.zeros(1, dtype=torch.float32, device=device)
    if shard_group is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=shard_group)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def grad_norm_squared(optimizer: Any, device: torch.device) -> torch.Tensor:
    """``optimizer.get_grad_norm() ** 2`` as a one-element fp32 tensor on ``device`` (this rank's model device),
    without reading anything on the host. Collective over the optimizer's grad-stats groups."""
    from megatron.core.optimizer import ChainedOptimizer
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

    if isinstance(optimizer, LayerWiseDistributedOptimizer):
        grads = [g for member in optimizer.chained_optimizers for g in member.get_grads_for_grad_norm()]
        return _sum_of_squares(grads, None, device)
    if isinstance(optimizer, ChainedOptimizer):
        members = optimizer.chained_optimizers
        if len(members) == 1:
            return grad_norm_squared(members[0], device)
        if optimizer.grads_states_parallel_group_is_shared():
            grads = [g for member in members for g in member.get_grads_for_grad_norm()]
            return _sum_of_squares(grads, optimizer.get_grad_stats_parallel_group(), device)
        return torch.stack([grad_norm_squared(member, device) for member in members]).sum(dim=0)
    return _sum_of_squares(
        optimizer.get_grads_for_grad_norm(), optimizer.get_grad_stats_parallel_group(), device
    )
