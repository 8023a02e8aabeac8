"""Core attention with separate query/key and value head dims, for megatron-core's ``MLASelfAttention`` on the
local (no Transformer Engine) spec.

Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434 §2.1) gives each head a query/key of
``qk_head_dim + qk_pos_emb_head_dim`` dims (the non-rotary part and the decoupled rotary part) and a value of
``v_head_dim`` dims. megatron-core 0.19.2's local ``DotProductAttention`` assumes one head dim
(``config.kv_channels``) and does not accept the ``k_channels`` / ``v_channels`` that ``MultiLatentAttention``
builds its ``core_attention`` with, so the local MLA spec cannot be built. :class:`MLACoreAttention` takes the
same constructor arguments as megatron's attention modules and computes softmax(scale · q·kᵀ + mask) · v with
torch's ``scaled_dot_product_attention``, honouring:

* ``softmax_scale`` exactly as ``MultiLatentAttention`` computes it (mscale² / √(q head dim), i.e. including
  megatron's YaRN ``mscale_all_dim`` correction when ``rope_type='yarn'``), or 1/√k_channels when None;
* the explicit attention mask (bool, True where attention is *blocked*, megatron's convention), used as given
  (a query whose every key is blocked gets a finite output, as with megatron's -10000 fill, not NaN);
  without one, a causal mask when ``attn_mask_type`` is causal (as megatron's ``FusedScaleMaskSoftmax`` does);
  ``padding_causal`` combines both;
* attention dropout (``config.attention_dropout`` or the constructor's), drawn under the tensor-parallel RNG
  tracker's fork when sequence parallelism is off, as megatron's ``DotProductAttention`` does.

What it does not do is refused with a one-line error: packed sequences, attention bias, context parallelism,
sliding windows, softmax variants other than vanilla.

:class:`LocalMLASelfAttention` is megatron's ``MLASelfAttention`` with two fixes for the local spec (see its
docstring): the q / kv norms without query compression, and the TP gradient of the shared rotary key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

__all__ = ["LocalMLASelfAttention", "MLACoreAttention", "blocked_positions"]

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.causal_bottom_right)


def blocked_positions(
    attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None, sq: int, sk: int, device
) -> torch.Tensor | None:
    """The bool mask (True = blocked, broadcastable to ``[b, heads, sq, sk]``) megatron's local attention applies:
    the explicit mask when given (with ``padding_causal`` also the causal one), else the causal mask for a causal
    ``attn_mask_type`` (queries aligned to the last keys), else None."""
    causal = None
    wants_causal = attn_mask_type in _CAUSAL_TYPES or attn_mask_type == AttnMaskType.padding_causal
    if wants_causal and (attention_mask is None or attn_mask_type == AttnMaskType.padding_causal):
        causal = torch.ones(sq, sk, dtype=torch.bool, device=device).triu(diagonal=1 + sk - sq)
    if attention_mask is None:
        return causal
    blocked = attention_mask.bool()
    return blocked if causal is None else blocked | causal


class MLACoreAttention(MegatronModule):
    """softmax(scale · q·kᵀ, masked) · v per head, with query/key dim ``k_channels`` and value dim ``v_channels``.

    Inputs (megatron's layout): query ``[sq, b, heads, k_channels]``, key ``[sk, b, heads, k_channels]``, value
    ``[sk, b, heads, v_channels]``, heads = this TP rank's heads. Output ``[sq, b, heads · v_channels]``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                f"context_parallel_size={config.context_parallel_size}: MLACoreAttention (local spec) supports 1"
            )
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r}: MLACoreAttention supports 'vanilla'")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError(f"window_size={config.window_size}: MLACoreAttention has no sliding window")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.k_channels = k_channels if k_channels is not None else config.kv_channels
        self.v_channels = v_channels if v_channels is not None else config.kv_channels
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, pg_collection.tp.size())
        # megatron reads this name when it pads values for packed sequences (multi_latent_attention.py).
        self.hidden_size_per_attention_head_v = self.v_channels
        self.softmax_scale = 1.0 / math.sqrt(self.k_channels) if softmax_scale is None else softmax_scale
        # apply_query_key_layer_scaling divides the scores by the layer number before an fp16 softmax and
        # multiplies them back inside it: an identity in the fp32 softmax SDPA computes, so nothing to do here.
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("MLACoreAttention does not support packed sequences (packed_seq_params is set)")
        if attention_bias is not None:
            raise ValueError("MLACoreAttention does not support an attention bias")
        heads = query.shape[2]
        if query.shape[-1] != self.k_channels or key.shape[-1] != self.k_channels:
            raise ValueError(
                f"query/key head dims {query.shape[-1]}/{key.shape[-1]} != k_channels={self.k_channels}"
            )
        if value.shape[-1] != self.v_channels or key.shape[2] != heads or value.shape[2] != heads:
            raise ValueError(
                f"value {tuple(value.shape)} / key {tuple(key.shape)} do not match {heads} heads x "
                f"v_channels={self.v_channels}"
            )
        sq, sk = query.shape[0], key.shape[0]
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        blocked = blocked_positions(attention_mask, mask_type, sq, sk, query.device)
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        # SDPA's bool mask is True where attention is *allowed*; megatron's is True where it is blocked. A query
        # with every key blocked (a padding row) would give NaN; megatron's -10000 fill gives it a finite
        # average of the values, so here it attends to all keys (its output is finite and unused either way).
        allowed = None if blocked is None else ~blocked | blocked.all(dim=-1, keepdim=True)
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=self.softmax_scale
                )
        else:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=self.softmax_scale
            )
        # [b, heads, sq, dv] -> [sq, b, heads · dv]
        return context.permute(2, 0, 1, 3).reshape(sq, query.shape[1], heads * self.v_channels)


class LocalMLASelfAttention(MLASelfAttention):
    """megatron's ``MLASelfAttention`` on the local spec, with the rotary key's gradient summed over TP
    (``_qkv_down_projection``) and able to build ``qk_layernorm`` without query compression.

    With ``q_lora_rank=None`` the query is projected straight from the (already normalized) layer input, so there
    is no query latent to normalize; with ``qk_layernorm`` only the kv latent gets its norm (DeepSeek-V2-Lite,
    Moonlight). megatron-core 0.19.2: MLA's norm resolver (``mla_qk_norm_config.py``) demands a fused
    norm+linear ``linear_q_proj`` in that case, which only Transformer Engine provides, so the local spec cannot be
    built; here the plain projection and the kv norm are used. Every other case is megatron's own resolution.
    """

    def _qkv_down_projection(self, hidden_states):
        """megatron's down projections, with the shared rotary key's gradient summed over TP.

        megatron-core 0.19.2: with a column-parallel ``linear_kv_down_proj`` (the local spec), megatron gathers
        the output columns over TP and takes the rotary key ``k_R`` from them, but ``k_R`` feeds only this rank's
        heads and nothing sums its gradient over the TP ranks, so at TP > 1 the ``linear_kv_down_proj`` rows of
        ``k_R`` learn from a fraction of the heads (the forward is right; TP1 and TP2 gradients differ). Here the
        gathered ``[latent; k_R]`` is handed on in the form of a duplicated down projection (megatron's other
        branch): under sequence parallelism scattered back to this rank's tokens, so megatron's own
        gather of ``k_R`` from the sequence-parallel region reduce-scatters its gradient; without it, ``k_R``
        passes a copy-to-TP region whose backward all-reduces."""
        q_compressed, kv_combined = super()._qkv_down_projection(hidden_states)
        full = self.config.kv_lora_rank + self.config.qk_pos_emb_head_dim
        if kv_combined.size(-1) == full:
            return q_compressed, kv_combined
        kv_combined = gather_from_tensor_model_parallel_region(kv_combined, group=self.tp_group)
        if self.config.sequence_parallel:
            return q_compressed, scatter_to_sequence_parallel_region(kv_combined, group=self.tp_group)
        latent, rotary_key = torch.split(
            kv_combined, [self.config.kv_lora_rank, self.config.qk_pos_emb_head_dim], -1
        )
        rotary_key = copy_to_tensor_model_parallel_region(rotary_key, group=self.tp_group)
        return q_compressed, torch.cat([latent, rotary_key], dim=-1)

    def _resolve_qk_norm_config(self, submodules):
        if self.config.q_lora_rank is None and self.config.qk_layernorm:
            return dict(
                linear_q_proj=submodules.linear_q_proj,
                linear_q_up_proj=IdentityOp,
                linear_kv_up_proj=submodules.linear_kv_up_proj,
                q_layernorm=IdentityOp,
                kv_layernorm=submodules.kv_layernorm,
            )
        return super()._resolve_qk_norm_config(submodules)
