"""How evenly the routers spread tokens over the experts: per MoE layer and step, the share of routed token slots
each expert received, and the imbalance max / mean (1 = perfectly balanced; top-k routing over E experts with
all tokens on k experts gives E / k).

A forward hook on each megatron ``TopKRouter`` (a torch module hook, megatron untouched) adds up its routing
map (``[tokens, experts]``, True where a token goes) during training forward passes. The counts of one step
are summed over the ranks that routed different tokens: data/context-parallel replicas and, with sequence
parallelism, the tensor-parallel ranks (each routes its slice of the sequence); pipeline stages hold
different layers, so a sum over the model-parallel group also gathers every layer on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from megatron.core.transformer.moe.router import TopKRouter

__all__ = ["ExpertLoadTracker"]


class ExpertLoadTracker:
    """Counts routed tokens per expert for every MoE layer of ``model_chunks``.

    Args:
        model_chunks: megatron model chunks of this rank.
        num_layers, num_experts: of the whole model.
        dp_cp_group: data × context-parallel group; mp_group: tensor × pipeline-parallel group.
    """

    def __init__(
        self,
        model_chunks: Sequence[torch.nn.Module],
        *,
        num_layers: int,
        num_experts: int,
        dp_cp_group: dist.ProcessGroup | None = None,
        mp_group: dist.ProcessGroup | None = None,
    ) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.num_layers, self.num_experts = num_layers, num_experts
        self.dp_cp_group, self.mp_group = dp_cp_group, mp_group
        first = next((p for chunk in model_chunks for p in chunk.parameters()), None)
        # On the model's device: the hook adds without a host read, and the groups' collectives take device
        # tensors (NCCL on a GPU).
        self.device = first.device if first is not None else torch.device("cpu")
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=self.device)
        self.moe_layers: set[int] = set()
        self._hooks: list[RemovableHandle] = []
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self.moe_layers.add(int(module.layer_number))
                    self._hooks.append(module.register_forward_hook(self._count))
        self.moe_layers = self._all_moe_layers()

    def _all_moe_layers(self) -> set[int]:
        """MoE layer numbers of the whole model (other pipeline stages hold the rest); once, at construction."""
        mask = torch.zeros(self.num_layers, dtype=torch.float64, device=self.device)
        for layer in self.moe_layers:
            mask[layer - 1] = 1.0
        if self.mp_group is not None:
            dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=self.mp_group)
        return {i + 1 for i, v in enumerate(mask.tolist()) if v > 0}

    @torch.no_grad()
    def _count(
        self, router: TopKRouter, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        if not router.training:
            return
        _, routing_map = output
        self.counts[int(router.layer_number) - 1] += routing_map.sum(dim=0).to(torch.float64)

    def remove(self) -> None:
        """Detach the forward hooks from the routers (the counts stay readable)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def reset(self) -> None:
        """Zero the counts (a new step)."""
        self.counts.zero_()

    @torch.no_grad()
    def reduce_counts(self) -> torch.Tensor:
        """This step's routed-slot counts ``[num_layers, num_experts]`` summed over both groups (the same on every
        rank), as a device tensor for the step's one host read; then reset. Collective over both groups."""
        counts = self.counts.clone()
        for group in (self.dp_cp_group, self.mp_group):
            if group is not None:
                dist.all_reduce(counts, group=group)
        self.reset()
        return counts

    def metrics(self, counts: list[float]) -> dict[str, float]:
        """``moe/load_imbalance/layer_NN`` and ``moe/expert_load/layer_NN/expert_EE`` (share of the layer's routed
        slots) from :meth:`reduce_counts`' values read on the host (flat, row-major)."""
        metrics = {}
        for layer in sorted(self.moe_layers):
            row = counts[(layer - 1) * self.num_experts : layer * self.num_experts]
            total = sum(row)
            if total == 0:
                continue
            shares = [count / total for count in row]
            metrics[f"moe/load_imbalance/layer_{layer:02d}"] = max(shares) * self.num_experts
            for expert, share in enumerate(shares):
                metrics[f"moe/expert_load/layer_{layer:02d}/expert_{expert:02d}"] = share
        return metrics

    def collect(self) -> dict[str, float]:
        """This step's metrics (the same on every rank), then reset: :meth:`reduce_counts` read on the host and
        :meth:`metrics`. For callers outside the training loop, which reads the counts with the step."""
        return self.metrics(self.reduce_counts().reshape(-1).tolist())
