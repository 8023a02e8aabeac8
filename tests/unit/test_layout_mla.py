"""The logical matrices of multi-head latent attention on one tensor-parallel shard: ``linear_kv_up_proj`` split
into its K and V parts (or per head) exactly as megatron's ``MLASelfAttention`` reads its rows, the query
projection whole (or per head), the down projections whole. Several TP ranks: tests/distributed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_muon.optim.layout import LayoutConfig, megatron_param_pieces

HEADS, QK, ROPE, V, LATENT, HIDDEN = 3, 4, 2, 5, 6, 7
MODULE_PATH = {"decoder.layers.0": SimpleNamespace(layer_number=1)}
PREFIX = "decoder.layers.0.self_attention"


class FakeLinear(torch.nn.Module):
    """A megatron ColumnParallelLinear on one shard (``tp_group`` None)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1
        self.tp_group = None


def mla_config() -> SimpleNamespace:
    return SimpleNamespace(
        multi_latent_attention=True,
        num_attention_heads=HEADS,
        qk_head_dim=QK,
        qk_pos_emb_head_dim=ROPE,
        v_head_dim=V,
        kv_channels=None,
        gated_linear_unit=True,
        attention_output_gate=False,
    )


def numbered(rows: int, cols: int) -> torch.Tensor:
    return torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)


def megatron_kv_split(weight: torch.Tensor):
    """K and V rows as MLASelfAttention reads them: the output features viewed as (heads, qk + v), split [qk, v]."""
    k, v = weight.view(HEADS, QK + V, -1).split([QK, V], dim=1)
    return k.reshape(-1, weight.shape[-1]), v.reshape(-1, weight.shape[-1])


def pieces_of(module_name: str, weight: torch.Tensor, options: LayoutConfig | None = None):
    module = FakeLinear(weight.clone())
    name = f"{PREFIX}.{module_name}.weight"
    options = options or LayoutConfig()
    return (
        name,
        module,
        megatron_param_pieces(name, module.weight, module, mla_config(), MODULE_PATH, options),
    )


def test_kv_up_projection_splits_into_the_key_and_value_parts_of_every_head():
    weight = numbered(HEADS * (QK + V), LATENT)
    name, module, pieces = pieces_of("linear_kv_up_proj", weight)
    k, v = megatron_kv_split(weight)
    assert [p.key for p in pieces] == [f"{name}/k", f"{name}/v"]
    assert [p.shape for p in pieces] == [(HEADS * QK, LATENT), (HEADS * V, LATENT)]
    rebuilt = torch.zeros_like(weight)
    for piece, expected in zip(pieces, (k, v), strict=True):
        torch.testing.assert_close(piece.read(module.weight.detach()), expected, rtol=0, atol=0)
        piece.write(rebuilt, expected)
    torch.testing.assert_close(rebuilt, weight, rtol=0, atol=0)  # K and V tile the weight exactly


def test_per_head_mode_gives_every_head_its_query_key_and_value_matrices():
    kv = numbered(HEADS * (QK + V), LATENT)
    name, module, pieces = pieces_of("linear_kv_up_proj", kv, LayoutConfig(qkv_per_head=True))
    k, v = megatron_kv_split(kv)
    expected = {f"{name}/k.head{h}": k[h * QK : (h + 1) * QK] for h in range(HEADS)}
    expected |= {f"{name}/v.head{h}": v[h * V : (h + 1) * V] for h in range(HEADS)}
    assert sorted(p.key for p in pieces) == sorted(expected)
    for piece in pieces:
        torch.testing.assert_close(piece.read(module.weight.detach()), expected[piece.key], rtol=0, atol=0)

    q = numbered(HEADS * (QK + ROPE), HIDDEN)
    name, module, pieces = pieces_of("linear_q_proj", q, LayoutConfig(qkv_per_head=True))
    assert [p.key for p in pieces] == [f"{name}/q.head{h}" for h in range(HEADS)]
    for h, piece in enumerate(pieces):
        head_rows = q.view(HEADS, QK + ROPE, HIDDEN)[h]  # [q_C; q_R] of head h
        torch.testing.assert_close(piece.read(module.weight.detach()), head_rows, rtol=0, atol=0)


@pytest.mark.parametrize("module_name", ["linear_q_proj", "linear_q_up_proj"])
def test_the_query_projection_is_one_matrix(module_name):
    weight = numbered(HEADS * (QK + ROPE), LATENT)
    name, _, (piece,) = pieces_of(module_name, weight)
    assert (piece.key, piece.shape) == (name, tuple(weight.shape))


@pytest.mark.parametrize("module_name", ["linear_kv_down_proj", "linear_q_down_proj"])
def test_down_projections_are_one_matrix(module_name):
    weight = numbered(LATENT + ROPE, HIDDEN)
    name, _, (piece,) = pieces_of(module_name, weight, LayoutConfig(qkv_per_head=True))
    assert (piece.key, piece.shape) == (name, (LATENT + ROPE, HIDDEN))


def test_split_qkv_off_keeps_kv_up_whole():
    weight = numbered(HEADS * (QK + V), LATENT)
    name, _, (piece,) = pieces_of("linear_kv_up_proj", weight, LayoutConfig(split_qkv=False))
    assert (piece.key, piece.shape) == (name, tuple(weight.shape))


def test_a_kv_up_weight_of_the_wrong_size_raises():
    with pytest.raises(ValueError, match=r"\(26, 6\).*3 heads x k=4 \+ v=5"):
        pieces_of("linear_kv_up_proj", numbered(26, LATENT))
