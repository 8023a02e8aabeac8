"""MuonClip's QK-clip on megatron-core attention (Kimi K2; the math and the GQA rule are in ``ops/qk_clip.py``).

:class:`QKClip` does three things around the optimizer step:

1. **Record** each attention head's largest pre-softmax logit during the training forward passes. Megatron's
   local ``DotProductAttention`` records nothing, so a forward pre-hook on each ``core_attention`` (a torch
   module hook: no megatron code is patched) recomputes ``softmax_scale · q·kᵀ`` under the attention mask, without
   autograd, and keeps the running maximum per head in ``core_attention.current_max_attn_logits`` — the
   attribute megatron's Transformer Engine attention fills itself when ``TransformerConfig.qk_clip`` or
   ``log_max_attention_logit`` is set (TE ≥ 2.9 returns it from the fused kernel), so both paths are read the
   same way. The hook costs one extra
   ``[b, heads, s, s]`` score matrix per layer and micro batch; it only runs in training mode.
2. **Reduce** each layer's per-head maxima over the data- and context-parallel ranks (MAX), so every replica
   clips identically. Heads are split over tensor-parallel ranks like the weights, so no TP reduction is needed.
3. **Clip** after the optimizer step: rescale the query and key rows of every head above τ, in the model parameter
   and in the fp32 main parameter megatron's mixed-precision wrapper keeps (``param.main_param``), so the next step
   starts from the clipped weights in both. Standard attention: the rows of ``linear_qkv`` (megatron's
   per-query-group layout ``[q_1 … q_g, k, v]`` per group; GQA rule in ``ops/qk_clip.py``). Multi-head latent
   attention (K2's rule): per head, the non-rotary query rows q_C (``linear_q_proj`` or ``linear_q_up_proj``,
   ``[q_C; q_R]`` per head) by √γ, the rotary query rows q_R by γ, the non-rotary key rows k_C of
   ``linear_kv_up_proj`` (``[k_C; v]`` per head) by √γ; the rotary key k_R, shared by all heads and produced by
   ``linear_kv_down_proj``, and the values are untouched. The logit q_C·k_C + q_R·k_R is thereby scaled by γ.

The per-layer maxima (over heads, TP, PP) are returned for TensorBoard (``attention/max_logit/layer_NN``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_muon.ops.qk_clip import gqa_clip_factors, mla_clip_factors
from megatron_muon.optim.layout import fsdp_row_range, local_tensor

logger = logging.getLogger(__name__)

__all__ = ["QKClip", "max_attention_logits"]


def max_attention_logits(
    query: torch.Tensor,
    key: torch.Tensor,
    softmax_scale: float,
    attention_mask: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    """Largest ``softmax_scale · q·k`` per query head over a micro batch, ignoring blocked positions.

    Args:
        query: ``[sq, b, heads, d]``; key: ``[sk, b, groups, d]`` (megatron's layout; groups divides heads).
        attention_mask: bool, True where attention is blocked, broadcastable to ``[b, heads, sq, sk]``; or None.
        causal: block j > i when no mask is given.

    Returns ``[heads]`` fp32.
    """
    heads, groups = query.shape[2], key.shape[2]
    q = query.detach().float().permute(1, 2, 0, 3)  # [b, heads, sq, d]
    k = key.detach().float().permute(1, 2, 0, 3).repeat_interleave(heads // groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * softmax_scale  # [b, heads, sq, sk]
    if attention_mask is not None:
        scores = scores.masked_fill(attention_mask.bool(), float("-inf"))
    elif causal:
        sq, sk = scores.shape[-2:]
        blocked = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu(diagonal=1 + sk - sq)
        scores = scores.masked_fill(blocked, float("-inf"))
    return scores.amax(dim=(0, 2, 3))


@dataclass(slots=True)
class _Attention:
    """One self-attention module this rank holds."""

    layer_number: int
    """Global, 1-based (megatron's ``TransformerLayer.layer_number`` includes the pipeline offset)."""
    module: Any
    """megatron's ``SelfAttention`` / ``MLASelfAttention`` (its submodules are read by name)."""
    heads: int
    """Query heads on this rank."""
    groups: int
    """Key/value heads on this rank (MLA: one key per head)."""
    head_dim: int
    """Standard attention: the head dim. MLA: the query/key head dim (non-rotary + rotary)."""
    mla: tuple[int, int, int] | None = None
    """MLA only: (qk_head_dim, qk_pos_emb_head_dim, v_head_dim) per head."""


class QKClip:
    """Records the per-head maximum logits of every self-attention in ``model_chunks`` and clips after each step.

    Args:
        model_chunks: megatron model chunks (DDP-wrapped or not) of this rank.
        threshold: τ; alpha: the query's share of the rescaling exponent (K2: 100 and 0.5).
        dp_cp_group: the data- × context-parallel group whose replicas must clip identically.
        mp_group: the tensor- × pipeline-parallel group over which per-layer maxima are gathered for logging.
        num_layers: transformer layers of the whole model (for the logged vector).
        clip: False only records and reports (``log_max_logits`` without clipping).
    """

    def __init__(
        self,
        model_chunks: list[torch.nn.Module],
        *,
        threshold: float = 100.0,
        alpha: float = 0.5,
        dp_cp_group: Any = None,
        mp_group: Any = None,
        num_layers: int,
        clip: bool = True,
    ) -> None:
        if not threshold > 0:
            raise ValueError(f"qk_clip.threshold={threshold!r} must be > 0")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"qk_clip.alpha={alpha!r} must be in [0, 1]")
        self.threshold, self.alpha, self.clip = threshold, alpha, clip
        self.dp_cp_group, self.mp_group, self.num_layers = dp_cp_group, mp_group, num_layers
        self.attentions = [a for chunk in model_chunks for a in _self_attentions(chunk)]
        self._reduced: list[torch.Tensor] = []
        self._hooks = [
            a.module.core_attention.register_forward_pre_hook(_record_hook, with_kwargs=True)
            for a in self.attentions
            if not _records_itself(a.module.core_attention)
        ]

    def remove(self) -> None:
        """Detach the recording hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def reset(self) -> None:
        """Forget what was recorded (a skipped step)."""
        self._reduced = []
        for attention in self.attentions:
            attention.module.core_attention.current_max_attn_logits = None

    @torch.no_grad()
    def reduce_maxima(self) -> torch.Tensor:
        """After the backward, before the update: reduce the recorded per-head maxima (MAX over ``dp_cp_group``, one
        all-reduce for every layer) and keep them for :meth:`clip_`; return the per-layer maxima of the whole model
        (``[num_layers]``, MAX over ``mp_group``; -inf for a layer without attention) as a device tensor, for the
        step's one host read. Collective over both groups; reads nothing on the host."""
        recorded = []
        for attention in self.attentions:
            logits = attention.module.core_attention.current_max_attn_logits
            if logits is None:
                raise RuntimeError(
                    f"QK-clip: layer {attention.layer_number} recorded no attention logits this step (was the "
                    "model run in training mode?)"
                )
            recorded.append(logits.detach().float())
            attention.module.core_attention.current_max_attn_logits = None
        device = (
            self.attentions[0].module.linear_proj.weight.device if self.attentions else torch.device("cpu")
        )
        all_logits = torch.cat(recorded) if recorded else torch.empty(0, device=device)
        if self.dp_cp_group is not None and recorded:
            dist.all_reduce(all_logits, op=dist.ReduceOp.MAX, group=self.dp_cp_group)
        self._reduced = list(torch.split(all_logits, [a.heads for a in self.attentions]))
        per_layer = torch.full((self.num_layers,), float("-inf"), device=device)
        if self.attentions:
            layer_index = torch.tensor([a.layer_number - 1 for a in self.attentions], device=device)
            per_layer[layer_index] = torch.stack([logits.max() for logits in self._reduced])
        if self.mp_group is not None:
            dist.all_reduce(per_layer, op=dist.ReduceOp.MAX, group=self.mp_group)
        return per_layer

    @torch.no_grad()
    def clip_(self) -> None:
        """After the update: scale the query and key rows of every head whose reduced maximum exceeds τ (heads at or
        under τ get the factor 1 exactly, so every head is rescaled without reading on the host which ones need
        it). Uses what :meth:`reduce_maxima` kept; forgets it."""
        reduced, self._reduced = self._reduced, []
        if not self.clip:
            return
        for attention, logits in zip(self.attentions, reduced, strict=True):
            if attention.mla is None:
                q_factor, k_factor = gqa_clip_factors(
                    logits, attention.groups, self.threshold, self.alpha, check_finite=False
                )
                _scale_qkv_rows_(attention, q_factor, k_factor)
            else:
                factors = mla_clip_factors(logits, self.threshold, self.alpha, check_finite=False)
                _scale_mla_rows_(attention, *factors)

    def after_step(self) -> dict[int, float]:
        """:meth:`reduce_maxima` then :meth:`clip_`, with the per-layer maxima read on the host:
        ``{layer number: max logit}`` for every layer of the model (the same on every rank). For callers outside
        the training loop; the loop calls the two halves around the update and reads the maxima with the step."""
        per_layer = self.reduce_maxima()
        self.clip_()
        return {i + 1: float(v) for i, v in enumerate(per_layer.tolist())}


def _self_attentions(chunk: torch.nn.Module) -> list[_Attention]:
    found = []
    module: Any  # megatron attention modules, read by attribute name
    for module in chunk.modules():
        if not hasattr(module, "core_attention"):
            continue
        if hasattr(module, "linear_kv_up_proj"):  # megatron's MLASelfAttention
            config = module.config
            # The q / kv latent norms sit before the up projections, so they do not undo the clip.
            found.append(
                _Attention(
                    layer_number=int(module.layer_number),
                    module=module,
                    heads=module.num_attention_heads_per_partition,
                    groups=module.num_attention_heads_per_partition,
                    head_dim=module.q_head_dim,
                    mla=(config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim),
                )
            )
            continue
        if not hasattr(module, "linear_qkv"):
            continue
        if getattr(module.config, "qk_layernorm", False):
            raise ValueError(
                "qk_clip cannot act with model.qk_layernorm=true: the norm on queries and keys undoes any "
                "rescaling of their weights (turn one of them off)"
            )
        heads = module.num_attention_heads_per_partition
        groups = module.num_query_groups_per_partition
        found.append(
            _Attention(
                layer_number=int(module.layer_number),
                module=module,
                heads=heads,
                groups=groups,
                head_dim=module.hidden_size_per_attention_head,
            )
        )
    return found


def _records_itself(core_attention: Any) -> bool:
    """Transformer Engine's attention fills ``current_max_attn_logits`` itself when ``config.qk_clip`` or
    ``config.log_max_attention_logit`` is set (the trainer sets the latter)."""
    config = core_attention.config
    asked = bool(getattr(config, "qk_clip", False) or getattr(config, "log_max_attention_logit", False))
    return type(core_attention).__name__.startswith("TE") and asked


@torch.no_grad()
def _record_hook(core_attention: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if not core_attention.training:
        return None
    names = ("query", "key", "value", "attention_mask", "attn_mask_type")
    bound = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
    mask_type = bound.get("attn_mask_type") or getattr(core_attention, "attn_mask_type", None)
    causal = mask_type is not None and "causal" in str(mask_type).lower()
    logits = max_attention_logits(
        bound["query"], bound["key"], core_attention.softmax_scale, bound.get("attention_mask"), causal
    )
    previous = getattr(core_attention, "current_max_attn_logits", None)
    core_attention.current_max_attn_logits = logits if previous is None else torch.maximum(previous, logits)
    return None


def _scale_qkv_rows_(attention: _Attention, q_factor: torch.Tensor, k_factor: torch.Tensor) -> None:
    """Multiply the query rows of head h by ``q_factor[h]`` and the key rows of group g by ``k_factor[g]`` in
    ``linear_qkv`` (weight and bias, model and fp32 main copies); value rows are untouched."""
    per_group_heads = attention.heads // attention.groups
    d = attention.head_dim
    rows = torch.ones(attention.groups, per_group_heads + 2, dtype=torch.float32, device=q_factor.device)
    rows[:, :per_group_heads] = q_factor.view(attention.groups, per_group_heads)
    rows[:, per_group_heads] = k_factor
    row_factor = rows.repeat_interleave(d, dim=1).reshape(-1)  # [groups · (heads/group + 2) · d]
    _scale_rows_(attention, "linear_qkv", row_factor, "the per-query-group layout")


def _scale_mla_rows_(
    attention: _Attention, q_compressed: torch.Tensor, q_rotary: torch.Tensor, k_compressed: torch.Tensor
) -> None:
    """K2's MLA rule on this rank's heads: per head h, ``[q_C; q_R]`` rows of the query projection by
    (``q_compressed[h]``, ``q_rotary[h]``) and the ``k_C`` rows of ``linear_kv_up_proj`` by ``k_compressed[h]``;
    the ``v`` rows and the shared rotary key (in ``linear_kv_down_proj``) are untouched."""
    assert attention.mla is not None  # only MLA attentions come here
    qk_dim, rope_dim, v_dim = attention.mla
    device = q_compressed.device
    q_rows = torch.cat(
        [
            q_compressed.float()[:, None].expand(-1, qk_dim),
            q_rotary.float()[:, None].expand(-1, rope_dim),
        ],
        dim=1,
    ).reshape(-1)  # [heads · (qk + rope)]
    kv_rows = torch.cat(
        [
            k_compressed.float()[:, None].expand(-1, qk_dim),
            torch.ones(attention.heads, v_dim, device=device),
        ],
        dim=1,
    ).reshape(-1)  # [heads · (qk + v)]
    q_name = "linear_q_proj" if attention.module.config.q_lora_rank is None else "linear_q_up_proj"
    _scale_rows_(attention, q_name, q_rows, "[q_C; q_R] per head")
    _scale_rows_(attention, "linear_kv_up_proj", kv_rows, "[k_C; v] per head")


def _scale_rows_(attention: _Attention, linear_name: str, row_factor: torch.Tensor, layout: str) -> None:
    """Multiply row r of ``attention.module.<linear_name>``'s weight and bias by ``row_factor[r]``, in the model
    parameter and in megatron's fp32 main parameter when there is one."""
    linear = getattr(attention.module, linear_name)
    for name in ("weight", "bias"):
        param = getattr(linear, name, None)
        if param is None:
            continue
        if param.shape[0] != row_factor.numel():
            raise RuntimeError(
                f"layer {attention.layer_number}: {linear_name}.{name} has {param.shape[0]} rows; {layout} "
                f"needs {row_factor.numel()}"
            )
        rows_here = fsdp_row_range(param)  # FSDP: only this rank's rows of the parameter are here
        held = row_factor if rows_here is None else row_factor[rows_here[0] : rows_here[1]]
        for tensor in (local_tensor(param.data), getattr(param, "main_param", None)):
            if tensor is None:
                continue
            factor = held.to(device=tensor.device, dtype=torch.float32)
            shaped = factor.view(-1, *([1] * (tensor.dim() - 1)))
            tensor.copy_((tensor.float() * shaped).to(tensor.dtype))
