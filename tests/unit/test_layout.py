"""How a parameter maps to logical matrices: strided row blocks, whole tensors and stacks, and megatron's fused
QKV and SwiGLU weights on one tensor-parallel shard (several ranks are tested in tests/distributed)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from megatron_muon.optim.layout import (
    LayoutConfig,
    RowBlocks,
    megatron_param_pieces,
    whole_tensor_pieces,
)


def numbered(rows: int, cols: int) -> torch.Tensor:
    """Row r holds r·cols … r·cols + cols − 1, so every value says where it came from."""
    return torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------------------
# RowBlocks


@pytest.mark.parametrize(
    ("blocks", "expected_rows"),
    [
        (RowBlocks(offset=2, length=3, period=10, repeats=3), [2, 3, 4, 12, 13, 14, 22, 23, 24]),
        (RowBlocks(offset=0, length=1, period=5, repeats=6), [0, 5, 10, 15, 20, 25]),
        (RowBlocks(offset=7, length=3, period=30), [7, 8, 9]),
        (RowBlocks(offset=0, length=30, period=30), list(range(30))),
    ],
)
def test_row_blocks_read_and_write_the_rows_they_name(blocks, expected_rows):
    tensor = numbered(30, 4)
    assert blocks.num_rows == len(expected_rows)
    torch.testing.assert_close(blocks.read(tensor), tensor[expected_rows], rtol=0, atol=0)

    target = tensor.clone()
    new_rows = -1.0 - torch.arange(len(expected_rows) * 4, dtype=torch.float32).reshape(-1, 4)
    blocks.write(target, new_rows)
    expected = tensor.clone()
    expected[expected_rows] = new_rows
    torch.testing.assert_close(target, expected, rtol=0, atol=0)  # those rows replaced, no other row touched
    torch.testing.assert_close(blocks.read(target), new_rows, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Whole tensors


def test_a_matrix_is_one_piece_named_after_the_parameter():
    weight = numbered(6, 4)
    (piece,) = whole_tensor_pieces("w", weight)
    assert (piece.key, piece.shape, piece.num_shards, piece.local_shape) == ("w", (6, 4), 1, (6, 4))
    torch.testing.assert_close(piece.read(weight), weight, rtol=0, atol=0)


@pytest.mark.parametrize("batch_shape", [(3,), (2, 3)])
def test_a_stack_is_one_piece_per_matrix(batch_shape):
    count = torch.Size(batch_shape).numel()
    stack = torch.arange(count * 24, dtype=torch.float32).reshape(*batch_shape, 6, 4)
    pieces = whole_tensor_pieces("experts", stack)
    indices = list(itertools.product(*[range(n) for n in batch_shape]))  # row-major, as the keys promise
    assert [p.key for p in pieces] == [f"experts[{'.'.join(map(str, i))}]" for i in indices]
    assert all(p.shape == (6, 4) for p in pieces)
    rebuilt = torch.zeros_like(stack)
    for piece, index in zip(pieces, indices, strict=True):
        torch.testing.assert_close(piece.read(stack), stack[index], rtol=0, atol=0)
        piece.write(rebuilt, piece.read(stack))
    torch.testing.assert_close(rebuilt, stack, rtol=0, atol=0)


def test_a_vector_is_not_a_matrix():
    with pytest.raises(ValueError, match=r"'bias' has shape \(5,\)"):
        whole_tensor_pieces("bias", torch.zeros(5))


# ---------------------------------------------------------------------------------------------------------
# Megatron weights on one TP shard


class FakeLinear(torch.nn.Module):
    """Stands in for a megatron ColumnParallelLinear / RowParallelLinear: a weight with megatron's TP attributes
    and the module's own ``tp_group`` (None: one shard)."""

    def __init__(self, weight: torch.Tensor, *, partition_dim: int = 0, partition_stride: int = 1) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = partition_dim
        self.weight.partition_stride = partition_stride
        self.tp_group = None


def attention_config(heads: int, groups: int, head_dim: int, **overrides) -> SimpleNamespace:
    fields = dict(
        kv_channels=head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        gated_linear_unit=False,
        attention_output_gate=False,
    )
    return SimpleNamespace(**(fields | overrides))


QKV_NAME = "decoder.layers.0.self_attention.linear_qkv.weight"
# module name -> module, as route_parameters collects it; layout reads the global, 1-based layer_number from it
MODULE_PATH = {"decoder.layers.0": SimpleNamespace(layer_number=1)}


def megatron_qkv_split(weight: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Q, K, V rows the way megatron's SelfAttention.get_query_key_value_tensors reads them: the output features
    viewed as (groups, (heads/groups + 2)·head_dim), split [heads/groups·head_dim, head_dim, head_dim]."""
    heads_per_group = heads // groups
    per_group = weight.view(groups, (heads_per_group + 2) * head_dim, weight.shape[-1])
    q, k, v = per_group.split([heads_per_group * head_dim, head_dim, head_dim], dim=1)
    cols = weight.shape[-1]
    return q.reshape(-1, cols), k.reshape(-1, cols), v.reshape(-1, cols)


@pytest.mark.parametrize(("heads", "groups"), [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_fused_qkv_splits_into_q_k_v_as_megatron_lays_them_out(heads, groups):
    head_dim, hidden = 4, 16
    weight = numbered(groups * (heads // groups + 2) * head_dim, hidden)
    module = FakeLinear(weight.clone())
    pieces = megatron_param_pieces(
        QKV_NAME, module.weight, module, attention_config(heads, groups, head_dim), MODULE_PATH
    )

    q, k, v = megatron_qkv_split(weight, heads, groups, head_dim)
    assert [p.key for p in pieces] == [f"{QKV_NAME}/{part}" for part in "qkv"]
    assert [p.shape for p in pieces] == [
        (heads * head_dim, hidden),
        (groups * head_dim, hidden),
        (groups * head_dim, hidden),
    ]
    assert all(p.num_shards == 1 for p in pieces)
    for piece, expected in zip(pieces, (q, k, v), strict=True):
        torch.testing.assert_close(piece.read(module.weight.detach()), expected, rtol=0, atol=0)

    rebuilt = torch.zeros_like(weight)
    for piece, part in zip(pieces, (q, k, v), strict=True):
        piece.write(rebuilt, part)
    torch.testing.assert_close(rebuilt, weight, rtol=0, atol=0)  # the three pieces tile the weight exactly


@pytest.mark.parametrize(("heads", "groups"), [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_per_head_mode_gives_one_piece_per_query_head_and_per_key_value_group(heads, groups):
    head_dim, hidden = 4, 16
    weight = numbered(groups * (heads // groups + 2) * head_dim, hidden)
    module = FakeLinear(weight.clone())
    config = attention_config(heads, groups, head_dim)
    pieces = megatron_param_pieces(
        QKV_NAME, module.weight, module, config, MODULE_PATH, LayoutConfig(qkv_per_head=True)
    )

    q, k, v = megatron_qkv_split(weight, heads, groups, head_dim)
    expected = {f"{QKV_NAME}/q.head{h}": q[h * head_dim : (h + 1) * head_dim] for h in range(heads)}
    for g in range(groups):
        expected[f"{QKV_NAME}/k.group{g}"] = k[g * head_dim : (g + 1) * head_dim]
        expected[f"{QKV_NAME}/v.group{g}"] = v[g * head_dim : (g + 1) * head_dim]
    assert sorted(p.key for p in pieces) == sorted(expected)
    assert len(pieces) == heads + 2 * groups
    for piece in pieces:
        assert piece.shape == (head_dim, hidden)
        torch.testing.assert_close(piece.read(module.weight.detach()), expected[piece.key], rtol=0, atol=0)


def test_split_qkv_off_keeps_the_fused_weight_whole():
    weight = numbered(48, 16)
    module = FakeLinear(weight)
    options = LayoutConfig(split_qkv=False)
    (piece,) = megatron_param_pieces(
        QKV_NAME, module.weight, module, attention_config(8, 2, 4), MODULE_PATH, options
    )
    assert (piece.key, piece.shape) == (QKV_NAME, (48, 16))


def test_a_qkv_weight_of_the_wrong_size_raises():
    module = FakeLinear(numbered(40, 16))
    with pytest.raises(ValueError, match=r"\(40, 16\)"):
        megatron_param_pieces(QKV_NAME, module.weight, module, attention_config(8, 2, 4), MODULE_PATH)


def test_attention_output_gate_is_refused():
    module = FakeLinear(numbered(48, 16))
    config = attention_config(8, 2, 4, attention_output_gate=True)
    with pytest.raises(ValueError, match="attention_output_gate"):
        megatron_param_pieces(QKV_NAME, module.weight, module, config, MODULE_PATH)


FC1_NAME = "decoder.layers.0.mlp.linear_fc1.weight"


@pytest.mark.parametrize("partition_stride", [1, 2])  # megatron gives a gated fc1 stride 2 (mlp.py)
def test_gated_fc1_splits_into_gate_and_up_halves(partition_stride):
    ffn, hidden = 12, 8
    weight = numbered(2 * ffn, hidden)
    module = FakeLinear(weight.clone(), partition_stride=partition_stride)
    config = SimpleNamespace(gated_linear_unit=True)
    pieces = megatron_param_pieces(FC1_NAME, module.weight, module, config, MODULE_PATH)

    # mlp.py's glu reads the output features as torch.chunk(x, 2, dim=-1): gate first, then up
    gate, up = torch.chunk(weight, 2, dim=0)
    assert [p.key for p in pieces] == [f"{FC1_NAME}/gate", f"{FC1_NAME}/up"]
    assert all(p.shape == (ffn, hidden) for p in pieces)
    for piece, expected in zip(pieces, (gate, up), strict=True):
        torch.testing.assert_close(piece.read(module.weight.detach()), expected, rtol=0, atol=0)


def test_ungated_fc1_and_split_gate_up_off_are_one_matrix():
    module = FakeLinear(numbered(24, 8))
    (plain,) = megatron_param_pieces(
        FC1_NAME, module.weight, module, SimpleNamespace(gated_linear_unit=False), MODULE_PATH
    )
    (unsplit,) = megatron_param_pieces(
        FC1_NAME,
        module.weight,
        module,
        SimpleNamespace(gated_linear_unit=True),
        MODULE_PATH,
        LayoutConfig(split_gate_up=False),
    )
    assert plain.shape == unsplit.shape == (24, 8)


def test_row_parallel_weight_on_one_shard_is_one_whole_matrix():
    module = FakeLinear(numbered(16, 32), partition_dim=1)
    name = "decoder.layers.0.self_attention.linear_proj.weight"
    (piece,) = megatron_param_pieces(name, module.weight, module, attention_config(8, 2, 4), MODULE_PATH)
    assert (piece.key, piece.shape, piece.shard_dim, piece.num_shards, piece.local_shape) == (
        name,
        (16, 32),
        1,
        1,
        (16, 32),
    )


def test_a_strided_weight_held_whole_is_one_matrix():
    # The partition stride only says how megatron slices a weight over TP ranks; one shard is the whole matrix.
    module = FakeLinear(numbered(16, 32), partition_stride=2)
    (piece,) = megatron_param_pieces(
        "decoder.layers.0.mlp.linear_fc2.weight", module.weight, module, SimpleNamespace(), MODULE_PATH
    )
    assert piece.shape == (16, 32) and piece.num_shards == 1


def test_keys_use_the_global_layer_number():
    # Megatron numbers layers inside a pipeline stage from 0; layer.layer_number is global and 1-based.
    module = FakeLinear(numbered(16, 32), partition_dim=1)
    name = "module.decoder.layers.0.self_attention.linear_proj.weight"
    module_path = {"module.decoder.layers.0": SimpleNamespace(layer_number=6)}
    (piece,) = megatron_param_pieces(name, module.weight, module, attention_config(8, 2, 4), module_path)
    assert piece.key == "decoder.layers.5.self_attention.linear_proj.weight"


def test_a_layer_without_a_global_number_raises_naming_the_parameter():
    module = FakeLinear(numbered(16, 32), partition_dim=1)
    name = "decoder.layers.0.self_attention.linear_proj.weight"
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        megatron_param_pieces(name, module.weight, module, attention_config(8, 2, 4), {})
