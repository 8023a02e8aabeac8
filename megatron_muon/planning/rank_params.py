"""Exact parameter counts of one rank of a layout, by formula: which of megatron's weights are split over TP,
over EP × expert-TP, which are replicated (norms, the router; MLA's down projections under Transformer Engine), and which layers and
embeddings each pipeline stage holds. Checked against the model built on meta (``meta_build``) in the tests, so the
dry run can print it without building anything."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_muon.config.schema import ModelConfig, ParallelDims, TransformerImpl

__all__ = ["RankParameters", "parameters_of_stage", "stage_layers"]


@dataclass(frozen=True, slots=True)
class RankParameters:
    """Elements of the parameters one rank of a pipeline stage holds (every rank of a stage holds as many)."""

    dense: int
    """Parameters reduced over data parallelism (attention, dense MLPs, shared experts, norms, router, embeddings)."""
    expert: int
    """Routed-expert parameters (reduced over expert data parallelism)."""
    embedding_and_output: int
    """Of ``dense``: the input embedding and output layer on this stage (AdamW in every Muon setting)."""
    replicated: int
    """Of ``dense``: parameters every TP rank holds whole (norms, router, MLA down projections)."""

    @property
    def total(self) -> int:
        """Every parameter element of the rank: dense and routed experts."""
        return self.dense + self.expert


def stage_layers(num_layers: int, pp: int, vpp: int | None, pp_rank: int) -> list[int]:
    """0-based global layer numbers held by pipeline rank ``pp_rank`` (megatron's even split; with ``vpp``
    virtual stages, chunk v holds the layers of virtual stage v·pp + pp_rank)."""
    chunks = vpp or 1
    per_chunk = num_layers // (pp * chunks)
    layers: list[int] = []
    for chunk in range(chunks):
        start = (chunk * pp + pp_rank) * per_chunk
        layers.extend(range(start, start + per_chunk))
    return layers


def _norm(model: ModelConfig, size: int) -> int:
    return size * (2 if model.normalization == "LayerNorm" else 1)


def _attention(model: ModelConfig, tp: int, transformer_impl: str) -> tuple[int, int]:
    """(split over TP, replicated) elements of one attention block with its input norm.

    MLA's down projections are duplicated over TP with Transformer Engine (``TELinear``, parallel_mode
    duplicated) and column-parallel on megatron's local spec (``multi_latent_attention.py``)."""
    down_split = transformer_impl != "transformer_engine"
    h, heads = model.hidden_size, model.num_attention_heads
    replicated = _norm(model, h)
    if model.multi_latent_attention:
        q_head = model.qk_head_dim + model.qk_pos_emb_head_dim
        split = 0
        if model.q_lora_rank is None:
            split += h * heads * q_head
        else:
            if down_split:
                split += h * model.q_lora_rank  # linear_q_down_proj
            else:
                replicated += h * model.q_lora_rank
            split += model.q_lora_rank * heads * q_head
            replicated += _norm(model, model.q_lora_rank) if model.qk_layernorm else 0
        kv_down = h * (model.kv_lora_rank + model.qk_pos_emb_head_dim)  # linear_kv_down_proj
        if down_split:
            split += kv_down
        else:
            replicated += kv_down
        split += model.kv_lora_rank * heads * (model.qk_head_dim + model.v_head_dim)
        replicated += _norm(model, model.kv_lora_rank) if model.qk_layernorm else 0
        split += heads * model.v_head_dim * h
        return split, replicated
    d = model.head_dim
    split = h * (heads + 2 * model.query_groups) * d + heads * d * h
    replicated += 2 * _norm(model, d) if model.qk_layernorm else 0
    return split, replicated


def parameters_of_stage(
    model: ModelConfig, dims: ParallelDims, pp_rank: int, transformer_impl: TransformerImpl | None = None
) -> RankParameters:
    """Parameter elements of any rank of pipeline stage ``pp_rank`` for ``model`` (a ``ModelConfig``) at ``dims``
    (a ``ParallelDims``), built with ``transformer_impl`` (default: the model's)."""
    h, tp = model.hidden_size, dims.tp
    attention_split, attention_replicated = _attention(model, tp, transformer_impl or model.transformer_impl)
    pattern = model.moe_layer_pattern()
    split = replicated = expert = 0
    for layer in stage_layers(model.num_layers, dims.pp, dims.vpp, pp_rank):
        split += attention_split
        replicated += attention_replicated + _norm(model, h)  # pre-MLP norm
        if pattern[layer]:
            replicated += model.num_moe_experts * h  # router weight
            split += 3 * h * model.moe_shared_expert_intermediate_size
            local_experts = model.num_moe_experts // dims.ep
            expert += local_experts * 3 * h * model.moe_ffn_hidden_size // dims.etp
        else:
            split += 3 * h * model.ffn_hidden_size
    embedding = 0
    first, last = pp_rank == 0, pp_rank == dims.pp - 1
    if first:
        embedding += model.vocab_size * h
    if last:
        replicated += _norm(model, h)  # final norm
        # Tied weights: the last stage of a pipeline keeps its own copy of the embedding as the output layer.
        if not model.share_embeddings_and_output_weights or not first:
            embedding += model.vocab_size * h
    dense = (split + embedding) // tp + replicated
    return RankParameters(
        dense=dense, expert=expert, embedding_and_output=embedding // tp, replicated=replicated
    )
